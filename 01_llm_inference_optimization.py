# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
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

1. **As a script**: `python 01_llm_inference_optimization.py` runs every section's demo in order.
   `--list` shows the sections, `--section kv_cache` runs one (repeatable), `--quick` uses small
   sizes, `--model tiny` runs offline on a random-weight model, `--device cuda`, `--seed 1`,
   `--no-plots`.
2. **Interactively**: `python -i 01_llm_inference_optimization.py --section none` (or just
   `python -i` and Ctrl-C after the first demo) then call `analyze_memory_requirements()`,
   `demonstrate_generation()`, `generate(...)`, ...
3. **As a notebook**: the file is in jupytext "percent" format (`# %%` cells). Open it in VS Code
   or JupyterLab with jupytext and run the cells top to bottom.

Table of contents (`grep -n "## §"` finds them; each section names its test file):

- §0 Setup: devices, timing, tables, plots, notation ................ tests/test_s0_setup.py
- §1 The model: a LLaMA-architecture transformer, generation ........ tests/test_s1_model.py
- §1b Real weights: the GGUF format, dequantization, the tokenizer ... tests/test_s1b_gguf.py
- §2 Memory-bound vs compute-bound: prefill, decode, roofline ........ (not yet written)
- §3 The KV cache: memory analysis and implementation ............... (not yet written)
- §4 PagedAttention: block manager, copy-on-write, prefix caching ... (not yet written)
- §5 Continuous batching: scheduler, preemption, chunked prefill .... (not yet written)
- §6 Speculative decoding: draft, verify, exact rejection sampling .. (not yet written)
- §7 Flash-decoding: split-K attention with a log-sum-exp merge ...... (not yet written)
- §8 Quantization: INT8, INT4, GPTQ, AWQ, GGUF block formats ......... (not yet written)
- §9 Summary: every technique's speedup and memory saving, measured .. (not yet written)
"""

# %%
import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# %% [markdown]
"""
## §0 Setup: devices, timing, tables, plots, notation

Nothing in this file runs at import: no seeding, no global torch settings, no downloads.
Demos take `seed=` and `device=` and are deterministic for a given seed.

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
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


class LessonError(Exception):
    """Base class of every error this module raises on purpose (bad input, missing files)."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`cuda` if present, else `cpu`; an explicit `device` (e.g. "cpu") always wins."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LessonError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work, so that a wall-clock timer measures the work itself."""
    if device is not None and torch.device(device).type == "cuda":
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


def benchmark(fn: Callable[[], object], device=None, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of `fn()` in seconds over `repeat` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
    return float(np.median(times))


def print_table(rows: Sequence[dict], title: str, floatfmt: str = ".3g") -> str:
    """Print `rows` (dicts sharing keys; put units in the keys) under a title; return the text."""
    from tabulate import tabulate

    text = f"\n{title}\n" + tabulate(list(rows), headers="keys", floatfmt=floatfmt, tablefmt="github")
    print(text)
    return text


def save_plot(fig, name: str) -> Path:
    """Save a matplotlib figure as `assets/<name>.png`, close it, and return the path."""
    import matplotlib.pyplot as plt

    ASSETS_DIR.mkdir(exist_ok=True)
    path = ASSETS_DIR / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def new_figure(*args, **kwargs):
    """A matplotlib figure on the non-interactive Agg backend (works without a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private random generator, so demos are deterministic without touching global state."""
    return torch.Generator(device=device).manual_seed(seed)


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
sequence's context). The contiguous cache here, the paged cache of §4 and the split-K attention
of §7 all implement those verbs, so the model never changes.
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
        return list(_PRESETS)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        key = name.lower().replace("_", "-")
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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (as HF does), then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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
globals). Simple generation builds it with `AttentionMetadata.uniform(...)`; the engine of §5
builds ragged ones.
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


def attend_within_step(q, k, v, meta: AttentionMetadata) -> torch.Tensor:
    """Attention when the whole context is in this step (no cache): q (N, H, D), k/v (N, Hkv, D)."""
    if meta.is_uniform:
        S, T = meta.num_seqs, meta.query_lens[0]
        shape = lambda x: x.view(S, T, *x.shape[1:])  # noqa: E731
        return sdpa_attention(shape(q), shape(k), shape(v)).reshape(q.shape)
    out = torch.empty_like(q)
    for a, b in zip(meta.query_start[:-1], meta.query_start[1:]):
        out[a:b] = sdpa_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0]
    return out


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

    def metadata(self, rows: Sequence[int], start_pos: Sequence[int], query_lens: Sequence[int]):
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

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store this step's k, v (N, Hkv, D) at their slots."""
        rows, pos = meta.slot_mapping // self.max_seq_len, meta.slot_mapping % self.max_seq_len
        self.k[layer, rows, :, pos] = k.to(self.k.dtype)
        self.v[layer, rows, :, pos] = v.to(self.v.dtype)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of this step's queries q (N, H, D) over each sequence's cached context."""
        K, V = self.k[layer], self.v[layer]  # (B, Hkv, T_max, D)
        if meta.is_uniform:
            S, Tq, T = meta.num_seqs, meta.query_lens[0], meta.context_lens[0]
            rows = meta.seq_rows
            if rows == list(range(rows[0], rows[0] + S)):  # a slice is a view: no copy
                k, v = K[rows[0]:rows[0] + S, :, :T], V[rows[0]:rows[0] + S, :, :T]
            else:
                k, v = K[rows, :, :T], V[rows, :, :T]
            out = sdpa_attention(q.view(S, Tq, *q.shape[1:]), k.transpose(1, 2), v.transpose(1, 2))
            return out.reshape(q.shape)
        out = torch.empty_like(q)
        for s, (a, b) in enumerate(zip(meta.query_start[:-1], meta.query_start[1:])):
            row, T = meta.seq_rows[s], meta.context_lens[s]
            k, v = K[row, :, :T].transpose(0, 1), V[row, :, :T].transpose(0, 1)  # (T, Hkv, D)
            out[a:b] = sdpa_attention(q[None, a:b], k[None], v[None])[0]
        return out


# %% [markdown]
"""
### The transformer
Shapes in comments: N tokens in the step, d model width, H/Hkv heads, D head dim.
"""


# %%
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * D, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.wo = nn.Linear(cfg.n_heads * D, cfg.dim, bias=False)

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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
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
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                cache=None, logits_at: Sequence[int] | None = None) -> torch.Tensor:
        """tokens, positions: (N,). Returns logits (N, V), or (len(logits_at), V) when given."""
        if tokens.dim() != 1 or tokens.shape != positions.shape:
            raise InvalidArgumentError(
                f"tokens and positions must be 1-D and of equal length (a packed step), got "
                f"{tuple(tokens.shape)} and {tuple(positions.shape)}")
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ContextOverflowError(
                f"position {int(positions.max())} is past {self.cfg.name}'s context window of "
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
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue  # norms start at 1
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=pick_device(device), dtype=dtype).eval()


# %% [markdown]
"""
### Generation: prefill once, then decode one token at a time
`prefill` runs the whole prompt through the model in one step, filling the cache; each
`decode_one_token` step then feeds only the newest token and attends over the cache. The naive
alternative (`use_cache=False`) re-runs the whole prefix every step; §3 measures the difference.

Sampling: temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature,
`top_k` keeps the k most likely tokens, `top_p` keeps the smallest set whose probability mass
reaches p (nucleus sampling), and one token is drawn. Sampling uses a private generator seeded
by `seed` and runs on the CPU, so the same seed gives the same text on any device.
"""


# %%
def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None):
    """Set to -inf every logit outside the top-k / nucleus (top-p) support. logits: (V,)."""
    if top_k is not None and not 1 <= top_k:
        raise InvalidArgumentError(f"top_k must be >= 1 (or None to disable), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidArgumentError(f"top_p must be in (0, 1] (or None to disable), got {top_p}")
    logits = logits.clone()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass *before* this token already ≥ p
        logits[order[drop]] = float("-inf")
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """One token id from logits (V,): greedy when temperature == 0, else sampled."""
    if temperature < 0:
        raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    logits = logits.detach().float().cpu()
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def prefill(model: Transformer, cache: ContiguousKVCache, prompt_ids: Sequence[int], row: int = 0):
    """Run the prompt through the model, filling `cache` row `row`. Returns last logits (V,)."""
    positions, meta = cache.metadata([row], [0], [len(prompt_ids)])
    tokens = torch.tensor(list(prompt_ids), device=model.device)
    return model(tokens, positions, meta, cache, logits_at=meta.last_token_indices)[0]


@torch.inference_mode()
def decode_one_token(model: Transformer, cache: ContiguousKVCache, token: int, pos: int, row: int = 0):
    """Feed one token at position `pos`, attending over the cache. Returns logits (V,)."""
    positions, meta = cache.metadata([row], [pos], [1])
    return model(torch.tensor([token], device=model.device), positions, meta, cache)[0]


@torch.inference_mode()
def forward_without_cache(model: Transformer, ids: Sequence[int]) -> torch.Tensor:
    """The naive step: recompute the whole sequence, return the last position's logits (V,)."""
    tokens = torch.tensor(list(ids), device=model.device)
    positions = torch.arange(len(ids), device=model.device)
    meta = AttentionMetadata.without_cache([len(ids)])
    return model(tokens, positions, meta, logits_at=[len(ids) - 1])[0]


def _check_generation_args(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int):
    if max_new_tokens < 0:
        raise InvalidArgumentError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt_ids) == 0:
        raise InvalidArgumentError("the prompt is empty; pass at least one token id (e.g. BOS)")
    bad = [t for t in prompt_ids if not 0 <= int(t) < model.cfg.vocab_size]
    if bad:
        raise InvalidArgumentError(
            f"token ids {bad[:5]} are outside the vocabulary [0, {model.cfg.vocab_size}); "
            "were they made by another model's tokenizer?")
    if len(prompt_ids) + max_new_tokens > model.cfg.max_seq_len:
        raise ContextOverflowError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"{model.cfg.name}'s context window of {model.cfg.max_seq_len}; shorten one of them")


def stream_generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int = 0, stop_ids: Sequence[int] = (), use_cache: bool = True):
    """Yield new token ids one at a time (an iterator: print them as they come).

    Stops after `max_new_tokens` or right after yielding a token in `stop_ids` (e.g. EOS).
    """
    _check_generation_args(model, prompt_ids, max_new_tokens)
    if max_new_tokens == 0:
        return
    gen = seeded_generator(seed)
    ids = list(prompt_ids)
    if use_cache:
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
        if use_cache:
            logits = decode_one_token(model, cache, token, len(ids) - 1)
        else:
            logits = forward_without_cache(model, ids)


def generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop_ids: Sequence[int] = (), use_cache: bool = True,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Generate up to `max_new_tokens` new token ids after `prompt_ids`; returns only the new ids.

    `on_token(id)` is called for each token as it is produced (streaming). Example:

    >>> model = build_model("tiny")
    >>> len(generate(model, [1, 2, 3], max_new_tokens=5))
    5
    """
    out = []
    for token in stream_generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                                 seed, stop_ids, use_cache):
        out.append(token)
        if on_token is not None:
            on_token(token)
    return out
