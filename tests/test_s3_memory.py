"""§3a KV-cache memory analysis: formulas on published figures, a real cache's bytes, what fits."""

import math

import pytest
import torch

GiB, KiB = 2**30, 2**10
RIGHT, NAIVE = "KV/token 2·L·Hkv·D (KiB)", "KV/token 2·L·d (KiB)"


def row_for(llm, model, **kwargs):
    (row,) = llm.analyze_memory_requirements(model, verbose=False, **kwargs)
    return row


def test_kv_bytes_per_token_published_figures(llm):
    # Llama-2-7B (MHA): 2 · 32 layers · 32 KV heads · 128 dims · 2 bytes = 524,288 B = 512 KiB.
    assert row_for(llm, "llama-2-7b")[RIGHT] == 2 * 32 * 32 * 128 * 2 / KiB == 512
    # Llama-3-8B (GQA, 8 KV heads): 2 · 32 · 8 · 128 · 2 = 131,072 B = 128 KiB.
    assert row_for(llm, "llama-3-8b")[RIGHT] == 128
    # SmolLM2-135M: 2 · 30 · 3 · 64 · 2 = 23,040 B = 22.5 KiB.
    assert row_for(llm, "smollm2-135m")[RIGHT] == 22.5


def test_parameter_counts(llm):
    assert row_for(llm, "llama-2-7b")["params (B)"] == pytest.approx(6.74, abs=0.005)
    assert row_for(llm, "smollm2-135m")["params (B)"] == pytest.approx(0.1345, abs=5e-5)
    row = row_for(llm, "llama-2-7b")
    assert row["fp16 (GiB)"] == pytest.approx(6_738_415_616 * 2 / GiB)  # ≈ 12.55 GiB
    assert row["fp32 (GiB)"] == 2 * row["fp16 (GiB)"] == 4 * row["int8 (GiB)"] == 8 * row["int4 (GiB)"]


def test_naive_formula_overstates_by_the_gqa_group(llm):
    """2·L·d·b assumes Hkv·D = d, true only for MHA; under GQA it is g = H/Hkv times too big."""
    l3 = row_for(llm, "llama-3-8b")
    assert l3[NAIVE] == 512 and l3[NAIVE] / l3[RIGHT] == 4
    for row in llm.analyze_memory_requirements(verbose=False):
        cfg = llm.ModelConfig.from_name(row["model"])
        assert row[NAIVE] / row[RIGHT] == cfg.n_heads / cfg.n_kv_heads
    assert row_for(llm, "llama-2-7b")[NAIVE] == row_for(llm, "llama-2-7b")[RIGHT]  # MHA: same


@pytest.mark.parametrize("dtype, kv_name", [(torch.float16, "fp16"), (torch.float32, "fp32")])
def test_formula_matches_a_real_cache(llm, dtype, kv_name):
    cfg = llm.ModelConfig.from_name("tiny")
    cache = llm.ContiguousKVCache(cfg, batch_size=3, max_seq_len=50, dtype=dtype)
    assert cache.nbytes == llm.kv_cache_bytes(cfg, 50, 3, kv_name) == 3 * 50 * cfg.kv_bytes_per_token(
        dtype.itemsize)
    row = row_for(llm, "tiny", seq_len=50, batch_size=3, dtype=kv_name)
    assert row["KV cache (GiB)"] * GiB == pytest.approx(cache.nbytes)
    assert row[RIGHT] * KiB * 3 * 50 == cache.nbytes


def test_fits_on_gpu_by_hand(llm):
    # Llama-2-7B fp16 at 4096 tokens, 90% of each GPU:
    #   weights 6,738,415,616 · 2 B = 12.551 GiB;  one sequence's KV = 512 KiB · 4096 = 2 GiB
    #   24 GiB: (21.6 − 12.551) / 2 = 4.52 → 4;  40: (36 − 12.551) / 2 = 11.72 → 11;
    #   80 GiB: (72 − 12.551) / 2 = 29.72 → 29
    row = row_for(llm, "llama-2-7b", seq_len=4096)
    assert [row[f"seqs on {g} GiB"] for g in (24, 40, 80)] == [4, 11, 29]
    assert row["KV cache (GiB)"] == 2
    assert llm.max_concurrent_sequences("llama-2-7b", 4096, 80) == 29
    # All of an 80 GiB GPU: (80 − 12.551) / 2 = 33.7 → 33.
    assert llm.max_concurrent_sequences("llama-2-7b", 4096, 80, gpu_memory_utilization=1.0) == 33


def test_weights_that_do_not_fit_give_zero(llm):
    row = row_for(llm, "llama-2-70b", seq_len=4096)  # 128.5 GiB of fp16 weights
    assert row["fp16 (GiB)"] > 80 and row["seqs on 80 GiB"] == 0
    # int4 weights (32.1 GiB) leave (72 − 32.12) / 1.25 = 31.9 → 31 sequences; KV stays fp16.
    int4 = row_for(llm, "llama-2-70b", seq_len=4096, dtype="int4")
    assert int4["seqs on 80 GiB"] == 31 and int4[RIGHT] == 320
    # An int8 KV cache halves the per-token bytes and roughly doubles what fits.
    int8kv = row_for(llm, "llama-2-70b", seq_len=4096, dtype="int4", kv_dtype="int8")
    assert int8kv[RIGHT] == 160 and int8kv["seqs on 80 GiB"] == math.floor((72 * GiB - 68_976_648_192 / 2)
                                                                          / (160 * KiB * 4096))


def test_model_forms_and_survey(llm, capsys):
    cfg = llm.ModelConfig.from_name("mistral-7b")
    assert row_for(llm, cfg) == row_for(llm, "mistral-7b")
    rows = llm.analyze_memory_requirements()  # prints nothing: the REPL shows the returned table
    assert [r["model"] for r in rows] == list(llm.MEMORY_PRESETS) and not capsys.readouterr().out
    shown = repr(rows)  # what `>>> analyze_memory_requirements()` echoes: the table, not dicts
    assert "seqs on 80 GiB" in shown and "{" not in shown and "e+" not in shown
    # 8192 tokens is past Llama-2's 4096-token window: those rows are skipped in the survey.
    long_rows = llm.analyze_memory_requirements(seq_len=8192, verbose=True)
    names = {r["model"] for r in long_rows}
    assert "llama-2-7b" not in names and "llama-3-8b" in names
    assert "skipped" in capsys.readouterr().out


def test_demonstrate_memory_requirements(llm, capsys):
    rows = llm.demonstrate_memory_requirements()["memory"]
    out = capsys.readouterr().out
    assert "Takeaway" in out and "512 KiB" in out and "128 KiB" in out
    assert len(rows) == len(llm.MEMORY_PRESETS)


@pytest.mark.parametrize("kwargs, error", [
    ({"seq_len": 0}, "InvalidArgumentError"),
    ({"batch_size": -1}, "InvalidArgumentError"),
    ({"dtype": "fp12"}, "InvalidArgumentError"),
    ({"kv_dtype": "int3"}, "InvalidArgumentError"),
    ({"gpu_memory_utilization": 0}, "InvalidArgumentError"),
    ({"gpu_memory_utilization": 1.5}, "InvalidArgumentError"),
    ({"gpu": (0,)}, "InvalidArgumentError"),
    ({"gpu": -8}, "InvalidArgumentError"),
    ({"model": "gpt-17"}, "ConfigError"),
    ({"model": "llama-2-7b", "seq_len": 8192}, "ContextOverflowError"),
    ({"seq_len": 10**6}, "ContextOverflowError"),  # past every preset's window
])
def test_bad_inputs(llm, kwargs, error):
    with pytest.raises(getattr(llm, error)) as info:
        llm.analyze_memory_requirements(verbose=False, **kwargs)
    assert any(w in str(info.value) for w in ("choose", "use", "must", "positive", "fraction"))


def test_single_gpu_size(llm):
    row = llm.analyze_memory_requirements("llama-2-7b", seq_len=4096, gpu=80, verbose=False)[0]
    assert row["seqs on 80 GiB"] == 29 and "seqs on 24 GiB" not in row
