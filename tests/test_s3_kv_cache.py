"""§3 The KV cache: cached and uncached generation agree, on the tiny model and the real one."""

import pytest
import torch


def test_cached_equals_uncached_tiny_logits(llm):
    model = llm.build_model("tiny", seed=7, device="cpu")
    ids = [5, 17, 99, 3, 250, 41]
    cache = llm.ContiguousKVCache(model.cfg, 1, 16)
    logits = [llm.prefill(model, cache, ids[:3])]
    for pos in range(3, len(ids)):
        logits.append(llm.decode_one_token(model, cache, ids[pos], pos))
    for n, got in zip(range(3, len(ids) + 1), logits):
        assert torch.allclose(got, llm.forward_without_cache(model, ids[:n]), atol=1e-5)


def test_cache_writes_only_its_slots(llm):
    """After prefill of 4 tokens, positions 4.. of the cache are untouched (still zero)."""
    model = llm.build_model("tiny", seed=1, device="cpu")
    cache = llm.ContiguousKVCache(model.cfg, 2, 10)
    llm.prefill(model, cache, [1, 2, 3, 4], row=1)
    assert cache.k[:, 1, :, :4].abs().sum() > 0
    assert cache.k[:, 1, :, 4:].abs().sum() == 0 and cache.k[:, 0].abs().sum() == 0


def test_cached_equals_uncached_real_model(llm, smollm2_gguf):
    model, tok = llm.get_model(smollm2_gguf, device="cpu")
    ids = tok.encode_chat([{"role": "user", "content": "Name three colors."}])
    with_cache = llm.generate(model, ids, 12)
    assert with_cache == llm.generate(model, ids, 12, use_cache=False)
    # Logits of every cached step (prefill, then one decode step per token) vs recomputation.
    full = ids + with_cache
    cache = llm.ContiguousKVCache(model.cfg, 1, len(full))
    cached = [llm.prefill(model, cache, ids)]
    cached += [llm.decode_one_token(model, cache, full[p], p) for p in range(len(ids), len(full) - 1)]
    for n, got in zip(range(len(ids), len(full)), cached):
        expected = llm.forward_without_cache(model, full[:n])
        assert (got - expected).abs().max().item() <= 1e-3
        assert got.argmax() == expected.argmax()


def test_analyze_kv_cache_rows(llm):
    rows, per_step = llm.analyze_kv_cache("tiny", new_tokens=(4, 8), device="cpu")
    assert [r["new tokens"] for r in rows] == [4, 8]
    assert all(r["identical tokens"] for r in rows)
    assert len(per_step["cached"]) == len(per_step["naive"]) == 8
    with pytest.raises(llm.InvalidArgumentError):
        llm.analyze_kv_cache("tiny", new_tokens=(0,))
