"""§1 The model: shapes, causality, RoPE, GQA, KV-cached forward, generation, bad input."""

import copy
import gc
import math
import weakref

import conftest
import pytest
import torch


@pytest.fixture(scope="module")
def tiny(llm):
    return llm.build_model("tiny", seed=0, device="cpu")


def test_presets_and_derived_sizes(llm):
    cfg = llm.ModelConfig.from_name("llama-2-7b")
    assert cfg.head_dim == 128 and cfg.gqa_group == 1
    assert abs(cfg.n_params - 6.738e9) / 6.738e9 < 1e-3  # Llama-2-7B: 6,738,415,616 parameters
    smol = llm.ModelConfig.from_name("smollm2-135m")
    assert smol.head_dim == 64 and smol.gqa_group == 3
    assert smol.n_params == 134_515_008  # HF reports 134,515,008 for SmolLM2-135M
    assert set(llm.ModelConfig.presets()) >= {"tiny", "smollm2-135m", "llama-3-70b", "mistral-7b"}


def test_forward_shapes(llm, tiny):
    tokens = torch.randint(0, tiny.cfg.vocab_size, (3, 7))
    logits = tiny.forward_batch(tokens)
    assert logits.shape == (3, 7, tiny.cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_causality(llm, tiny):
    """Changing a later token never changes the logits of earlier positions."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, tiny.cfg.vocab_size, (1, 12), generator=g)
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % tiny.cfg.vocab_size
    la, lb = tiny.forward_batch(a), tiny.forward_batch(b)
    assert torch.equal(la[0, :8], lb[0, :8])
    assert not torch.allclose(la[0, 8:], lb[0, 8:])


def test_rope_is_relative(llm):
    """q·k after RoPE depends only on the position difference."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g)

    def score(pq, pk):
        cq, sq = llm.rope_cos_sin(torch.tensor([pq]), 16, 10000.0)
        ck, sk = llm.rope_cos_sin(torch.tensor([pk]), 16, 10000.0)
        return float((llm.apply_rope(q, cq, sq) * llm.apply_rope(k, ck, sk)).sum())

    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4, abs=1e-5)
    assert score(7, 7) == pytest.approx(score(0, 0), rel=1e-5, abs=1e-6)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)



def test_rope_rotation_by_hand(llm):
    cos, sin = llm.rope_cos_sin(torch.tensor([1]), 2, 10000.0)
    x = torch.tensor([[[1.0, 0.0]]])
    y = llm.apply_rope(x, cos, sin)
    assert torch.allclose(y, torch.tensor([[[math.cos(1.0), math.sin(1.0)]]]), atol=1e-6)


@pytest.mark.parametrize("H,Hkv,Tq,Tk", [(4, 4, 5, 5), (4, 2, 5, 5), (6, 2, 1, 9), (8, 1, 3, 11)])
def test_sdpa_matches_naive_attention(llm, H, Hkv, Tq, Tk):
    g = torch.Generator().manual_seed(H * 100 + Tk)
    q = torch.randn(Tq, H, 8, generator=g)
    k, v = torch.randn(Tk, Hkv, 8, generator=g), torch.randn(Tk, Hkv, 8, generator=g)
    ref = llm.naive_attention(q, k, v)
    fast = llm.sdpa_attention(q[None], k[None], v[None])[0]
    assert torch.allclose(ref, fast, atol=1e-5)


def test_gqa_with_all_heads_equals_plain_multihead(llm):
    """Hkv = H is ordinary multi-head attention: softmax(q kᵀ/√D) v per head."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 4, 8, generator=g) for _ in range(3))
    out = llm.naive_attention(q, k, v)
    mask = torch.ones(6, 6).tril().bool()
    for h in range(4):
        s = (q[:, h] @ k[:, h].T / math.sqrt(8)).masked_fill(~mask, float("-inf"))
        assert torch.allclose(out[:, h], s.softmax(-1) @ v[:, h], atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_weights(llm):
    """A GQA model equals an MHA model whose K/V projections repeat each KV head g times."""
    gqa = llm.build_model("tiny", seed=4, device="cpu")
    cfg = gqa.cfg
    mha_cfg = llm.ModelConfig.from_name("tiny", n_kv_heads=cfg.n_heads)
    mha = llm.Transformer(mha_cfg).eval()
    sd = gqa.state_dict()
    D, g = cfg.head_dim, cfg.gqa_group
    for key in list(sd):
        if key.endswith(("attn.wk.weight", "attn.wv.weight")):
            sd[key] = sd[key].view(cfg.n_kv_heads, D, -1).repeat_interleave(g, 0).reshape(-1, cfg.dim)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.allclose(gqa.forward_batch(tokens), mha.forward_batch(tokens), atol=1e-5)


def test_kv_cached_forward_equals_full_forward(llm, tiny):
    """Prefill a chunk, then decode chunks and single tokens: same logits as one full pass."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, tiny.cfg.vocab_size, (2, 14), generator=g)
    full = tiny.forward_batch(tokens)
    cache = llm.ContiguousKVCache(tiny.cfg, 2, 32)
    got, start = [], 0
    for n in (6, 3, 1, 1, 3):
        pos, meta = cache.metadata_at([0, 1], [start, start], [n, n])
        out = tiny(tokens[:, start:start + n].reshape(-1), pos, meta, cache)
        got.append(out.view(2, n, -1))
        start += n
    assert torch.allclose(torch.cat(got, 1), full, atol=1e-5)


def test_ragged_step_equals_separate_runs(llm, tiny):
    """One packed step with a 5-token prefill and a 1-token decode equals running each alone."""
    g = torch.Generator().manual_seed(6)
    a = torch.randint(0, tiny.cfg.vocab_size, (5,), generator=g)
    b = torch.randint(0, tiny.cfg.vocab_size, (4,), generator=g)
    cache = llm.ContiguousKVCache(tiny.cfg, 2, 16)
    pos, meta = cache.metadata_at([1], [0], [3])
    tiny(b[:3], pos, meta, cache)  # row 1 already holds 3 tokens
    pos, meta = cache.metadata_at([0, 1], [0, 3], [5, 1])
    packed = tiny(torch.cat([a, b[3:]]), pos, meta, cache)
    assert torch.allclose(packed[:5], tiny.forward_batch(a[None])[0], atol=1e-5)
    assert torch.allclose(packed[5], tiny.forward_batch(b[None])[0, -1], atol=1e-5)


def test_generate_cached_equals_uncached(llm, tiny):
    prompt = [1, 5, 9, 200]
    with_cache = llm.generate(tiny, prompt, 20)
    without = llm.generate(tiny, prompt, 20, use_cache=False)
    assert with_cache == without
    sampled = dict(temperature=1.0, top_k=20, seed=3)
    assert llm.generate(tiny, prompt, 20, **sampled) == llm.generate(tiny, prompt, 20, use_cache=False,
                                                                     **sampled)


def test_generation_deterministic_for_a_seed(llm, tiny):
    kw = dict(temperature=1.0, top_p=0.9)
    a = llm.generate(tiny, [3, 4], 30, seed=11, **kw)
    assert a == llm.generate(tiny, [3, 4], 30, seed=11, **kw)
    assert a != llm.generate(tiny, [3, 4], 30, seed=12, **kw)


def test_greedy_is_argmax_of_full_forward(llm, tiny):
    prompt = [7, 8, 9]
    out = llm.generate(tiny, prompt, 1)
    logits = tiny.forward_batch(torch.tensor([prompt]))[0, -1]
    assert out == [int(logits.argmax())]


def test_stop_ids_and_streaming(llm, tiny):
    full = llm.generate(tiny, [1, 2], 15)
    stop = full[4]
    first = full.index(stop)
    seen = []
    out = llm.generate(tiny, [1, 2], 15, stop_ids=[stop], on_token=seen.append)
    assert out == full[:first + 1] == seen
    assert list(llm.stream_generate(tiny, [1, 2], 15)) == full


def test_top_k_restricts_support(llm):
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    kept = llm.filter_logits(logits, top_k=2)
    assert torch.isfinite(kept).tolist() == [False, True, False, True, False]
    gen = torch.Generator().manual_seed(0)
    draws = {llm.sample_next_token(logits, 1.0, top_k=2, generator=gen) for _ in range(200)}
    assert draws == {1, 3}


def test_top_p_restricts_support(llm):
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps the first two (0.5 < 0.75 ≤ 0.8)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = llm.filter_logits(probs.log(), top_p=0.75)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    kept = llm.filter_logits(probs.log(), top_p=0.5)  # the top token alone already reaches 0.5
    assert torch.isfinite(kept).tolist() == [True, False, False, False]
    gen = torch.Generator().manual_seed(0)
    draws = [llm.sample_next_token(probs.log(), 1.0, top_p=0.75, generator=gen) for _ in range(2000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / 2000 - 0.5 / 0.8) < 0.05  # renormalized over the kept set


def test_unknown_preset_raises(llm):
    with pytest.raises(llm.ConfigError, match="unknown model preset"):
        llm.ModelConfig.from_name("gpt-5")


@pytest.mark.parametrize("kw,match", [
    (dict(dim=65, n_heads=4), "divisible"),
    (dict(n_heads=4, n_kv_heads=3), "multiple"),
    (dict(n_layers=0), "positive"),
])
def test_bad_config_raises(llm, kw, match):
    with pytest.raises(llm.ConfigError, match=match):
        llm.ModelConfig.from_name("tiny", **kw)


def test_bad_generation_input_raises(llm, tiny):
    with pytest.raises(llm.InvalidArgumentError, match="max_new_tokens"):
        llm.generate(tiny, [1, 2], -1)
    with pytest.raises(llm.ContextOverflowError, match="context window"):
        llm.generate(tiny, [1] * tiny.cfg.max_seq_len, 1)
    with pytest.raises(llm.InvalidArgumentError, match="outside the vocabulary"):
        llm.generate(tiny, [tiny.cfg.vocab_size], 1)
    with pytest.raises(llm.InvalidArgumentError, match="empty"):
        llm.generate(tiny, [], 1)
    with pytest.raises(llm.InvalidArgumentError, match="top_p"):
        llm.generate(tiny, [1], 2, temperature=1.0, top_p=1.5)
    assert llm.generate(tiny, [1, 2], 0) == []


def test_cache_overflow_raises(llm, tiny):
    cache = llm.ContiguousKVCache(tiny.cfg, 1, 8)
    with pytest.raises(llm.ContextOverflowError, match="cache holds 8"):
        cache.metadata_at([0], [5], [4])


def test_text_prompt_gets_a_clear_error(llm, tiny):
    with pytest.raises(llm.InvalidArgumentError, match="encode text first"):
        llm.generate(tiny, "hello", 5)


def test_batched_generate_equals_one_at_a_time(llm, tiny):
    prompts = [[1, 2, 3], [9] * 11, [100, 7]]
    outs, cache = llm.batched_generate(tiny, prompts, 8)
    assert outs == [llm.generate(tiny, p, 8) for p in prompts]
    assert cache.k.shape[1:4:2] == (3, 11 + 8)  # a row per prompt, longest prompt + max_new
    stop = outs[1][2]
    outs, _ = llm.batched_generate(tiny, prompts, 8, stop_ids=[stop])
    assert outs == [llm.generate(tiny, p, 8, stop_ids=[stop]) for p in prompts]
    assert llm.batched_generate(tiny, prompts, 0)[0] == [[], [], []]


# ------------------------------------------------------------- generation through a kept decoder
def sharp_tiny(llm, seed=4):
    return conftest.sharp_tiny(llm, seed)


@pytest.fixture
def kept_path(llm, monkeypatch):
    """`stream_generate` through a kept §9 decoder (on a GPU: "graph"), here run eagerly on the
    CPU; yields a fresh model and a function listing its kept decoders."""
    monkeypatch.setattr(llm, "_kept_decode_mode", lambda model: "eager")
    model = sharp_tiny(llm)
    return model, lambda: [d for ds in model.__dict__.get("_kept_decoders", {}).values() for d in ds]


def test_interleaved_generators_get_their_own_cache(llm, kept_path):
    """Two generators consumed in turn each decode from a decoder of their own (one cache row
    each), and give the tokens of plain generation; both decoders are idle afterwards, and a
    later generation reuses one instead of building a third."""
    model, decoders = kept_path
    prompts = [[5, 17, 99, 3], [42, 7, 8, 1]]  # same length: the same kept decoder shape
    expected = [llm.generate(model, p, 6, cuda_graphs=False) for p in prompts]
    gens = [llm.stream_generate(model, p, 6) for p in prompts]
    got = [[], []]
    for _ in range(6):
        for out, gen in zip(got, gens):
            out.append(next(gen))
    assert got == expected and [next(gen, None) for gen in gens] == [None, None]  # both finished
    assert len(decoders()) == 2 and not any(d.busy for d in decoders())
    assert llm.generate(model, prompts[0], 6) == expected[0] and len(decoders()) == 2


def test_generate_inside_on_token_gets_its_own_cache(llm, kept_path):
    model, decoders = kept_path
    outer, inner = [5, 17, 99, 3], [42, 7, 8, 1]
    expected_outer = llm.generate(model, outer, 4, cuda_graphs=False)
    expected_inner = llm.generate(model, inner, 3, cuda_graphs=False)
    nested = []
    got = llm.generate(model, outer, 4, on_token=lambda t: nested.append(llm.generate(model, inner, 3)))
    assert got == expected_outer and nested == [expected_inner] * 4
    assert not any(d.busy for d in decoders())


def test_generator_closed_or_dropped_returns_its_decoder(llm, kept_path):
    model, decoders = kept_path
    gen = llm.stream_generate(model, [1, 2, 3], 8)
    next(gen)
    assert [d.busy for d in decoders()] == [True]
    gen.close()
    assert [d.busy for d in decoders()] == [False]
    gen = llm.stream_generate(model, [1, 2, 3], 8)
    next(gen)
    del gen
    gc.collect()
    assert [d.busy for d in decoders()] == [False]


def test_kept_decoders_do_not_keep_the_model_alive(llm, monkeypatch):
    """Kept decoders live on their model: deleting the model frees them and it (a module-level
    cache would keep both); a deep copy of the model starts with none."""
    monkeypatch.setattr(llm, "_kept_decode_mode", lambda model: "eager")
    model = llm.build_model("tiny", seed=4, device="cpu")
    llm.generate(model, [1, 2, 3], 4)
    llm.static_generate(model, [[1, 2], [3]], 4)
    assert sum(map(len, model._kept_decoders.values())) == 2
    assert copy.deepcopy(model)._kept_decoders == {}
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
