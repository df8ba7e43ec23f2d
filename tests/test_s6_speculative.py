"""§6 Speculative decoding: the warping matches HF's processors, rejection sampling equals its
one-token-at-a-time reference and emits tokens distributed exactly as the target's p (chi-square,
with a check that the test would catch a 1% error), greedy speculative output is token-identical
to plain greedy decoding for every draft and γ, caches roll back to what a fresh prefill writes,
and bad input fails with named errors."""

import numpy as np
import pytest
import torch
from conftest import chi2_pvalue, load_lesson, sample_first_two_tokens, sharp_tiny

llm_module = load_lesson()


@pytest.fixture(scope="module")
def tiny(llm):
    return llm.build_model("tiny", seed=0, device="cpu")


# ----------------------------------------------------------------------------- warping
@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.7, None, None), (1.3, 50, None), (0.8, None, 0.9), (1.0, 20, 0.5), (0.5, 1, None)])
def test_logits_to_probs_matches_hf_warpers(llm, temperature, top_k, top_p):
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    scores = logits.clone()
    if temperature != 1.0:
        scores = transformers.TemperatureLogitsWarper(temperature)(None, scores)
    if top_k is not None:
        scores = transformers.TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = transformers.TopPLogitsWarper(top_p)(None, scores)
    ours = llm.logits_to_probs(logits, temperature, top_k, top_p)
    torch.testing.assert_close(ours, scores.softmax(-1), atol=1e-6, rtol=1e-5)
    assert ((ours > 0) == (scores.softmax(-1) > 0)).all()  # the same support, exactly


def test_filter_logits_batched_equals_row_by_row(llm):
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for k, p in [(3, None), (None, 0.6), (10, 0.8)]:
        batched = llm.filter_logits(logits, k, p)
        for row, out in zip(logits, batched):
            assert torch.equal(llm.filter_logits(row, k, p), out)


def test_logits_to_probs_greedy_is_one_hot(llm):
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    probs = llm.logits_to_probs(logits, 0.0)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.equal(probs.sum(-1), torch.ones(3))


# ----------------------------------------------------------------------------- rejection sampling
def random_probs(gen, rows, V, sparsity=0.3):
    p = torch.rand(rows, V, generator=gen) * (torch.rand(rows, V, generator=gen) > sparsity)
    p[:, 0] += 1e-3  # never all zero
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", range(40))
def test_rejection_sample_equals_naive_reference(llm, seed):
    gen = torch.Generator().manual_seed(seed)
    gamma, V = 1 + seed % 6, 12
    p, q = random_probs(gen, gamma + 1, V), random_probs(gen, gamma, V)
    tokens = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(gamma)]
    if seed % 5 == 0:
        tokens[0] = int((p[0] == 0).nonzero()[0]) if (p[0] == 0).any() else tokens[0]  # p(x) = 0
    a = llm.rejection_sample(p, q, tokens, torch.Generator().manual_seed(seed))
    b = llm.rejection_sample_naive(p, q, tokens, torch.Generator().manual_seed(seed))
    assert a == b and 1 <= len(a) <= gamma + 1 and a[:-1] == tokens[:len(a) - 1]


def test_rejection_sample_with_one_hots_is_greedy_accept(llm):
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        logits = torch.randn(4, 6, generator=gen)
        best = logits.argmax(-1).tolist()
        tokens = [best[i] if torch.rand(1, generator=gen) < 0.6 else (best[i] + 1) % 6 for i in range(3)]
        q = torch.nn.functional.one_hot(torch.tensor(tokens), 6).float()
        assert llm.rejection_sample(llm.logits_to_probs(logits, 0.0), q, tokens, gen) == \
            llm.greedy_accept(logits, tokens)


P = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0])
CASES = {
    "p != q": (P, torch.tensor([0.1, 0.2, 0.3, 0.2, 0.1, 0.1])),
    "q = 0 where p > 0": (P, torch.tensor([0.0, 0.5, 0.0, 0.25, 0.0, 0.25])),
    "p = q": (P, P.clone()),
    "disjoint supports": (torch.tensor([0.55, 0.3, 0.1, 0.05, 0.0, 0.0]),
                          torch.tensor([0.0, 0.0, 0.0, 0.0, 0.6, 0.4])),
}


def first_token_counts(llm, p, q, n, gamma, seed):
    """Counts of the first emitted token: draft tokens drawn from q, verified against p."""
    gen = torch.Generator().manual_seed(seed)
    P, Q = p.expand(gamma + 1, -1).contiguous(), q.expand(gamma, -1).contiguous()
    drafts = torch.multinomial(Q, n, replacement=True, generator=gen).T.tolist()  # (n, γ)
    counts = torch.zeros(len(p))
    for tokens in drafts:
        counts[llm.rejection_sample(P, Q, tokens, gen)[0]] += 1
    return counts


@pytest.mark.parametrize("case", list(CASES))
def test_first_emitted_token_is_distributed_as_p(llm, case):
    p, q = CASES[case]
    counts = first_token_counts(llm, p, q, 30_000, gamma=1 if case != "p != q" else 3, seed=7)
    assert chi2_pvalue(counts, p) > 1e-3
    # The test has the power to see a 1% error: 1% of the mass moved from the likeliest token to
    # the least likely one (the most visible direction) is rejected.
    shifted = p.clone()
    hi, lo = int(p.argmax()), int((p > 0).nonzero()[-1])
    shifted[hi] -= 0.01
    shifted[lo] += 0.01
    assert chi2_pvalue(counts, shifted) < 1e-3


def test_joint_distribution_of_two_sampled_tokens_matches_target(llm, tiny):
    """On the tiny model: the first two tokens of speculative sampling (a 1-layer self-draft,
    γ = 2) are distributed as the target's own p(t1) p(t2 | t1)."""
    counts, probs, acceptance = sample_first_two_tokens(llm, tiny, 1500)
    assert 0.05 < acceptance < 0.95  # both the accept and the residual paths ran
    assert chi2_pvalue(counts, probs) > 1e-3


# ----------------------------------------------------------------------------- greedy identity
REPEATING = [1, 2, 3, 4, 5, 6, 7, 8] * 3 + [1, 2, 3]


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
def test_greedy_speculative_equals_generate_tiny(llm, tiny, gamma):
    drafts = [llm.NgramDraft(), llm.NgramDraft(max_ngram=1), llm.ModelDraft(llm.build_model("tiny", seed=1)),
              llm.ModelDraft(llm.truncated_model(tiny, 1))]
    for prompt in (REPEATING, [9, 8, 7], [42]):
        base = llm.generate(tiny, prompt, 30)
        for draft in drafts:
            out, stats = llm.speculative_generate(tiny, draft, prompt, 30, gamma=gamma)
            assert out == base, (draft.name, prompt)
            assert stats.accepted + stats.rounds == stats.new_tokens == 30  # each round: k accepted + 1
            assert stats.accepted <= stats.drafted and stats.rejected <= stats.rounds


def test_greedy_speculative_stops_at_stop_token(llm, tiny):
    base = llm.generate(tiny, REPEATING, 30)
    stop = base[7]
    expected = base[:base.index(stop) + 1]
    for gamma in (1, 4):
        out, stats = llm.speculative_generate(tiny, llm.NgramDraft(), REPEATING, 30, gamma=gamma,
                                              stop_ids=[stop])
        assert out == expected and stats.new_tokens == len(expected)


def test_speculative_on_smollm2_is_token_identical(llm, smollm2_gguf):
    net, tok = llm.get_model(smollm2_gguf)
    ids = tok.encode_chat([{"role": "user", "content": llm.SPECULATIVE_TASKS["copy a passage"]}])
    base = llm.generate(net, ids, 20, stop_ids=[tok.eos_id])
    for draft, gamma in [(llm.NgramDraft(), 1), (llm.NgramDraft(), 3), (llm.NgramDraft(), 8),
                         (llm.ModelDraft(llm.truncated_model(net, 8)), 3)]:
        out, stats = llm.speculative_generate(net, draft, ids, 20, gamma=gamma, stop_ids=[tok.eos_id])
        assert out == base, (draft.name, gamma)
        if isinstance(draft, llm.NgramDraft) and gamma > 1:
            assert stats.tokens_per_round > 1.5  # the answer copies the prompt: lookups are accepted


# ----------------------------------------------------------------------------- caches roll back
def test_target_cache_after_rejection_equals_fresh_prefill(llm, tiny):
    cache = llm.ContiguousKVCache(tiny.cfg, 1, 40)
    seq = llm.SequenceState(0, [3, 1, 4, 1, 5, 9])
    llm.run_step(tiny, cache, [seq], [5])  # all but the newest token
    n, drafted = seq.num_tokens, [2, 6, 5, 3]
    seq.token_ids.extend(drafted)
    logits = llm.score_step(tiny, cache, seq, 1 + len(drafted))
    assert logits.shape == (5, tiny.cfg.vocab_size)
    cache.truncate(seq, n + 1)  # keep one draft, reject the rest
    assert seq.token_ids == [3, 1, 4, 1, 5, 9, 2] and seq.num_computed_tokens == 7
    fresh = llm.ContiguousKVCache(tiny.cfg, 1, 40)
    llm.run_step(tiny, fresh, [llm.SequenceState(0, seq.token_ids[:7])], [7])
    torch.testing.assert_close(cache.k, fresh.k, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cache.v, fresh.v, atol=1e-6, rtol=1e-5)


def test_draft_cache_after_rounds_equals_fresh_prefill(llm, tiny):
    draft = llm.ModelDraft(llm.truncated_model(tiny, 1))
    out, stats = llm.speculative_generate(tiny, draft, REPEATING, 25, gamma=4, temperature=0.1, top_k=3)
    assert stats.rejected > 0  # rollbacks happened
    seq = draft.seq
    fresh = llm.ContiguousKVCache(draft.model.cfg, 1, draft.cache.max_seq_len)
    llm.run_step(draft.model, fresh, [llm.SequenceState(0, seq.token_ids[:seq.num_computed_tokens])],
                 [seq.num_computed_tokens])
    torch.testing.assert_close(draft.cache.k, fresh.k, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(draft.cache.v, fresh.v, atol=1e-6, rtol=1e-5)


def test_contiguous_truncate_rejects_bad_length(llm, tiny):
    cache, seq = llm.ContiguousKVCache(tiny.cfg, 1, 8), llm.SequenceState(0, [1, 2, 3])
    with pytest.raises(llm.InvalidArgumentError, match="truncate to 4"):
        cache.truncate(seq, 4)


# ----------------------------------------------------------------------------- drafts
def test_ngram_draft_prefers_longest_latest_match(llm):
    d = llm.NgramDraft(max_ngram=3)
    assert d.propose([1, 2, 3, 7, 0, 2, 3, 8, 9, 2, 3], 2) == ([8, 9], None)  # latest "2 3"
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3, 6, 1, 2, 3], 3) == ([4, 5, 9], None)  # "1 2 3" wins
    assert d.propose([4, 5, 6], 3) == ([], None)  # nothing repeats
    assert d.propose([7, 7], 4) == ([7], None)  # continuation cut by the context's end


def test_truncated_model_shares_weights_and_equals_target_at_full_depth(llm, tiny):
    full = llm.truncated_model(tiny, tiny.cfg.n_layers)
    assert full.embed is tiny.embed and full.layers[0] is tiny.layers[0]
    ids = [1, 2, 3, 4]
    assert torch.equal(llm.forward_without_cache(full, ids), llm.forward_without_cache(tiny, ids))


def test_speculative_speedup_formula(llm):
    assert llm.speculative_speedup(0.0, 4, 0.0) == 1.0  # every draft rejected, free draft
    assert llm.speculative_speedup(1.0, 4, 0.0) == 5.0  # every draft accepted
    assert abs(llm.speculative_speedup(0.8, 4, 0.05) - (1 - 0.8 ** 5) / 0.2 / 1.2) < 1e-12


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gets_named_errors(llm, tiny):
    with pytest.raises(llm.InvalidArgumentError, match="gamma"):
        llm.speculative_generate(tiny, llm.NgramDraft(), [1, 2], 5, gamma=0)
    with pytest.raises(llm.InvalidArgumentError, match="max_new_tokens"):
        llm.speculative_generate(tiny, llm.NgramDraft(), [1, 2], -1)
    other = llm.build_model(llm.ModelConfig.from_name("tiny", vocab_size=300))
    with pytest.raises(llm.DraftMismatchError, match="vocabulary"):
        llm.speculative_generate(tiny, llm.ModelDraft(other), [1, 2], 5)
    with pytest.raises(llm.InvalidArgumentError, match="n_layers"):
        llm.truncated_model(tiny, 0)
    with pytest.raises(llm.InvalidArgumentError, match="min_ngram"):
        llm.NgramDraft(max_ngram=0)
    with pytest.raises(llm.InvalidArgumentError, match="draft_probs"):
        llm.rejection_sample(torch.ones(3, 4) / 4, torch.ones(1, 4) / 4, [0, 1])
    assert llm.speculative_generate(tiny, llm.NgramDraft(), [1, 2], 0)[0] == []
    with pytest.raises(llm.InvalidArgumentError, match="propose"):
        llm.speculative_generate(tiny, None, [1, 2], 5)


class FixedDraft:
    """A draft that proposes the given ids whatever the context."""

    def __init__(self, ids):
        self.ids = ids

    def propose(self, context, gamma):
        return self.ids[:gamma], None


@pytest.mark.parametrize("ids", [[1, 10**6, 2], [-1], [1.5], [True]])
def test_a_draft_proposing_non_token_ids_gets_a_named_error(llm, tiny, ids):
    with pytest.raises(llm.DraftMismatchError, match="not token ids of the target's vocabulary"):
        llm.speculative_generate(tiny, FixedDraft(ids), [1, 2, 3], 5, gamma=3)


def test_a_draft_may_propose_numpy_or_tensor_ids(llm, tiny):
    expected = llm.generate(tiny, [1, 2, 3], 5)
    for ids in (np.array(expected), torch.tensor(expected)):
        assert llm.speculative_generate(tiny, FixedDraft(ids), [1, 2, 3], 5, gamma=3)[0] == expected


def test_demo_on_tiny_model(llm):
    rows = llm.demonstrate_speculative_decoding(model="tiny", quick=True, plots=False)["measured"]
    assert rows and all(r["same tokens"] for r in rows)
    assert {r["draft"].split(" (")[0] for r in rows} == {"prompt lookup", "self-draft"}
    assert all(r["measured (×)"] > 0 and 1 <= r["tokens/round"] <= r["γ"] + 1 for r in rows)


# ----------------------------------------------------------------------------- static verify steps
def test_static_verify_step_equals_packed_verify(llm, tiny):
    """Appendix D's verify step in static shapes (eager, on the decoder's contiguous cache) gives the
    packed verify's logits at every row, its argmax, and the count of drafts that equal it."""
    prompt, drafted = [3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]
    dec = llm.StaticDecoder(tiny, 1, 64, "eager")
    dec._prefill([prompt[:-1]])  # the cache holds all but the newest token
    n = len(prompt) - 1
    head, logits = llm.static_verify_step(dec, torch.tensor([prompt[-1]] + drafted + [0, n, len(drafted)]))
    cache, seq = llm.ContiguousKVCache(tiny.cfg, 1, 64), llm.SequenceState(0, list(prompt[:-1]))
    llm.run_step(tiny, cache, [seq], [n])
    seq.token_ids += [prompt[-1]] + drafted
    packed = llm.score_step(tiny, cache, seq, 1 + len(drafted))
    torch.testing.assert_close(logits[:4], packed, atol=1e-5, rtol=1e-5)
    picked = packed.argmax(-1).tolist()
    assert head[1:5].tolist() == picked
    assert head[0] == len(llm.greedy_accept(packed, drafted)) - 1
    torch.testing.assert_close(dec.cache.k[:, 0, :, :n + 4], cache.k[:, 0, :, :n + 4], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
def test_static_speculative_equals_generate_tiny(llm, tiny, gamma):
    """Greedy speculation through static verify steps gives plain greedy decoding's tokens for every
    draft, also one that is always right (the target itself: every round accepts all γ)."""
    drafts = [llm.NgramDraft(), llm.ModelDraft(llm.truncated_model(tiny, 1)),
              llm.ModelDraft(llm.truncated_model(tiny, tiny.cfg.n_layers))]
    for prompt in (REPEATING, [9, 8, 7]):
        base = llm.generate(tiny, prompt, 30)
        for draft in drafts:
            out, stats = llm.speculative_generate(tiny, draft, prompt, 30, gamma=gamma, static="eager")
            assert out == base, (draft.name, prompt)
            # the prefill emits the first token, each round k accepted + 1
            assert stats.accepted + stats.rounds + 1 == stats.new_tokens == 30
    assert stats.accepted == stats.drafted > 0


def test_static_speculative_compiled_equals_generate(llm, tiny):
    base = llm.generate(tiny, REPEATING, 24)
    draft = llm.ModelDraft(llm.truncated_model(tiny, tiny.cfg.n_layers))
    out, stats = llm.speculative_generate(tiny, draft, REPEATING, 24, gamma=4, static="compile")
    assert out == base and stats.accepted > 0


def test_static_speculative_sampling_matches_target(llm, tiny):
    """With sampling, static verify steps keep the target's distribution of the first two tokens."""
    counts, probs, acceptance = sample_first_two_tokens(llm, tiny, 1500, static="eager")
    assert 0.05 < acceptance < 0.95  # both the accept and the residual paths ran
    assert chi2_pvalue(counts, probs) > 1e-3


def test_static_cache_after_rejections_equals_fresh_prefill(llm, tiny):
    """After rounds with rejections, the decoder's cache holds, at every position up to the last
    token fed, what a fresh prefill of the emitted text writes: rejected drafts were overwritten."""
    model = sharp_tiny(llm, 6)  # its tokens depend on the context: prompt lookup is often wrong
    stats = llm.SpeculativeStats("prompt lookup", 4)  # adaptive=False: every round speculates
    out = llm.static_speculative_generate(model, llm.NgramDraft(), REPEATING, 20, 4, "eager", stats,
                                          adaptive=False)
    assert out == llm.generate(model, REPEATING, 20)
    assert stats.rejected > 0 and stats.accepted > 0
    text = REPEATING + out[:-1]  # the last token's k, v are never written
    with llm.kept_decoder(model, 1, len(REPEATING) + 20, "eager") as dec:
        cache = dec.cache.k[:, 0, :, :len(text)].clone()
    fresh = llm.StaticDecoder(model, 1, 64, "eager")
    fresh._prefill([text])
    torch.testing.assert_close(cache, fresh.cache.k[:, 0, :, :len(text)], atol=1e-5, rtol=1e-5)


def test_static_speculative_bad_mode(llm, tiny):
    with pytest.raises(llm.InvalidArgumentError, match="static"):
        llm.speculative_generate(tiny, llm.NgramDraft(), [1, 2], 4, static="fast")
