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
    rows = llm.measure_kv_cache("tiny", new_tokens=(4, 8, 10_000), device="cpu", checked_tokens=6,
                                num_positions=3)
    steps = rows.steps
    assert rows[0]["identical tokens"] is True and rows[0]["new tokens"] == 6
    prompt = llm.ByteTokenizer().encode_chat([{"role": "user", "content": "Explain why the sky is blue."}])
    assert [r["new tokens"] for r in rows[1:]] == [4, 8, 512 - len(prompt)]  # capped to the context
    assert all(r["no cache (ms)"] > 0 and r["KV cache (ms)"] > 0 for r in steps)
    with pytest.raises(llm.InvalidArgumentError):
        llm.measure_kv_cache("tiny", new_tokens=(0,))


def test_integrate_steps_is_the_sum_over_positions(llm):
    """Hand-worked: linear per-step costs, summed exactly by the interpolation."""
    steps = [{"context (tokens)": 10, "no cache (ms)": 10.0, "KV cache (ms)": 1.0},
             {"context (tokens)": 20, "no cache (ms)": 20.0, "KV cache (ms)": 2.0}]
    no_cache, kv = llm._integrate_steps(steps, 10, 11)  # contexts 10..20
    assert no_cache == pytest.approx(sum(range(10, 21)) / 1e3)
    assert kv == pytest.approx((10 + sum(c / 10 for c in range(11, 21))) / 1e3)


@pytest.mark.parametrize("start_pos, query_lens", [
    ([3, 9, 0], [1, 1, 1]),  # decode, contexts of unequal length: one masked call
    ([0, 4, 2], [5, 1, 3]),  # a mixed step: prefill, decode, chunk
    ([2, 2], [3, 3]),  # a rectangle
])
def test_contiguous_attend_batches_unequal_contexts(llm, start_pos, query_lens):
    cfg = llm.ModelConfig.from_name("tiny")
    gen = torch.Generator().manual_seed(0)
    cache = llm.ContiguousKVCache(cfg, 4, 16)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    rows = [3, 0, 1][:len(query_lens)]
    _, meta = cache.metadata_at(rows, start_pos, query_lens)
    q = torch.randn(sum(query_lens), cfg.n_heads, cfg.head_dim, generator=gen)
    torch.testing.assert_close(cache.attend(1, q, meta), cache.attend_naive(1, q, meta))
    a, b = meta.query_start[1], meta.query_start[2]  # sequence 1 against the textbook formula
    k = cache.k[1, rows[1], :, :meta.context_lens[1]].transpose(0, 1)
    v = cache.v[1, rows[1], :, :meta.context_lens[1]].transpose(0, 1)
    torch.testing.assert_close(cache.attend(1, q, meta)[a:b], llm.naive_attention(q[a:b], k, v))
