"""GPU code paths (skipped without CUDA): the same model, caches and attention on the GPU agree
with the CPU reference. CI has no GPU; run these on a machine with one."""

import pytest
import torch
from conftest import chi2_pvalue, engine_tokens, sample_first_two_tokens, sharp_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def pair(llm):
    return llm.build_model("tiny", seed=5, device="cpu"), llm.build_model("tiny", seed=5, device="cuda")


def test_logits_match_cpu(llm, pair):
    cpu, gpu = pair
    tokens = torch.randint(0, cpu.cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cpu.forward_batch(tokens), gpu.forward_batch(tokens.cuda()).cpu(), atol=1e-4)


def test_cached_generation_matches_cpu(llm, pair):
    cpu, gpu = pair
    prompt = [3, 14, 15, 92, 65]
    assert llm.generate(gpu, prompt, 24) == llm.generate(cpu, prompt, 24)
    assert llm.generate(gpu, prompt, 24) == llm.generate(gpu, prompt, 24, use_cache=False)
    sampled = dict(temperature=0.8, top_p=0.9, seed=4)
    assert llm.generate(gpu, prompt, 24, **sampled) == llm.generate(cpu, prompt, 24, **sampled)


def test_paged_generation_on_gpu(llm, pair):
    _, gpu = pair
    prompts = [list(range(30, 70)) + [1], list(range(30, 70)) + [2, 3], [9, 8, 7]]
    outs, stats = llm.paged_generate(gpu, prompts, 12, block_size=8)
    assert outs == [llm.generate(gpu, p, 12) for p in prompts]
    assert stats["prompt tokens skipped"] == 40


def test_paged_attention_on_gpu_matches_naive(llm):
    g = torch.Generator().manual_seed(1)
    bs, Hkv, H, D, T = 4, 2, 6, 16, [13, 5]
    k_cache = torch.randn(16, bs, Hkv, D, generator=g)
    v_cache = torch.randn(16, bs, Hkv, D, generator=g)
    tables = torch.tensor([[3, 9, 0, 12], [7, 2, -1, -1]])
    q = torch.randn(3, H, D, generator=g)  # sequence 0: 2 new tokens, sequence 1: 1
    got = llm.paged_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), tables.cuda(), T, [0, 2, 3])
    for s, (a, b) in enumerate(((0, 2), (2, 3))):
        k = llm.gather_kv(k_cache, tables[s], T[s])
        v = llm.gather_kv(v_cache, tables[s], T[s])
        assert torch.allclose(got[a:b].cpu(), llm.naive_attention(q[a:b], k, v), atol=1e-5)


def test_bf16_model_close_to_fp32(llm):
    fp32 = llm.build_model("tiny", seed=2, device="cuda")
    bf16 = llm.build_model("tiny", seed=2, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, fp32.cfg.vocab_size, (2, 9), device="cuda")
    a, b = fp32.forward_batch(tokens), bf16.forward_batch(tokens)
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_cuda_graph_decode_equals_eager(llm, batch):
    """§9: the CUDA-graph replay of the static step (a batch of 3 is padded to the captured 4)
    gives the eager path's greedy tokens, in fp32 and in bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        model = llm.build_model("tiny", seed=7, device="cuda", dtype=dtype)
        prompts = [list(range(3 + i, 10 + 2 * i)) for i in range(batch)]
        eager = llm.static_generate(model, prompts, 12, "eager")
        assert llm.static_generate(model, prompts, 12, "graph") == eager
        if dtype == torch.float32:
            assert eager == [llm.generate(model, p, 12) for p in prompts]


def test_prefill_graph_per_prompt_length_is_reused(llm):
    """§9: with graphs, the prefill is replayed from one CUDA graph per padded prompt length (a
    power of two, at least 16), kept and reused; the tokens equal plain generation's."""
    model = llm.build_model("tiny", seed=7, device="cuda")
    dec = llm.StaticDecoder(model, 4, 128, "graph")
    for prompts in ([[1, 2, 3]], [list(range(5, 40)), [7] * 20], [[9, 8, 7, 6], [3] * 16]):
        assert dec.generate(prompts, 8) == [llm.generate(model, p, 8, cuda_graphs=False) for p in prompts]
    assert sorted(dec._prefills) == [16, 64]


def test_generate_uses_cuda_graphs_with_the_same_tokens(llm, pair):
    """§9: generate() on a GPU replays a captured decode step by default; the tokens equal the
    eager path's, greedy and sampled, and a second call reuses the captured graph."""
    _, gpu = pair
    prompt = [3, 14, 15, 92, 65]
    for kw in ({}, {"temperature": 0.8, "top_k": 20, "seed": 3}):
        eager = llm.generate(gpu, prompt, 20, cuda_graphs=False, **kw)
        assert llm.generate(gpu, prompt, 20, **kw) == eager
        assert llm.generate(gpu, prompt, 20, **kw) == eager


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_engine_with_cuda_graphs_equals_without(llm, mode):
    """The §5 engine with its decode steps replayed from CUDA graphs (batches padded to the
    captured sizes) gives the same tokens as without, under preemption."""
    gpu = llm.build_model("tiny", seed=5, device="cuda")
    packed, _ = engine_tokens(llm, gpu, mode, "packed", sampled=False)
    graph, engine = engine_tokens(llm, gpu, mode, "graph", sampled=False)
    assert engine.scheduler.num_preemptions > 0 and engine.decode_runner._graphs
    assert graph == packed
    assert llm.LLMEngine(gpu).decode_runner.graphs  # on by default on a GPU


def test_compiled_step_in_a_cuda_graph_equals_eager(llm):
    gpu = llm.build_model("tiny", seed=5, device="cuda")
    prompts = [[5, 17, 99, 3, 8, 1], [42], list(range(30, 52))]
    eager = llm.static_generate(gpu, prompts, 10, "eager")
    assert llm.static_generate(gpu, prompts, 10, "compile+graph") == eager


def _sharp_tiny(llm, seed=6):
    return sharp_tiny(llm, seed, device="cuda")


def _new_fused_weights(model, seed=99):
    g = torch.Generator().manual_seed(seed)
    fused = ("wq.weight", "wk.weight", "wv.weight", "w_gate.weight", "w_up.weight")
    return {n: (torch.randn(p.shape, generator=g) * 0.3).to(p.device, p.dtype)
            for n, p in model.named_parameters() if n.endswith(fused)}


def test_captured_decoders_follow_changed_weights(llm):
    """§9 on a GPU: the kept decoders of generate() and static_generate(mode="graph") and an
    engine's captured decode steps, all captured before the weights are replaced, give the new
    weights' tokens; after a change of dtype the kept decoder is rebuilt in it."""
    model = _sharp_tiny(llm)
    prompts = [[5, 17, 99, 3], [42, 7]]
    params = llm.SamplingParams(max_tokens=6)
    engine = llm.LLMEngine(model, block_size=4, max_num_seqs=2)  # decode_step "graph" on a GPU
    before = llm.static_generate(model, prompts, 6, "graph")
    assert before == [llm.generate(model, p, 6) for p in prompts] == \
        [o.token_ids for o in engine.generate(prompts, [params] * 2)]
    model.load_state_dict({**model.state_dict(), **_new_fused_weights(model)}, assign=True)
    after = [llm.generate(model, p, 6, cuda_graphs=False) for p in prompts]
    assert after != before
    assert llm.static_generate(model, prompts, 6, "graph") == after
    assert [llm.generate(model, p, 6) for p in prompts] == after
    assert [o.token_ids for o in engine.generate(prompts, [params] * 2)] == after
    model.to(torch.bfloat16)
    fresh = llm.StaticDecoder(model, 2, 256, "eager").generate(prompts, 6)
    assert llm.static_generate(model, prompts, 6, "graph") == fresh
    assert all(d.cache.k.dtype == torch.bfloat16 for ds in model._kept_decoders.values() for d in ds
               if not d.busy and d.mode == "graph" and d.batch_size == 2)


def test_interleaved_generators_on_gpu_get_their_own_cache(llm):
    """Two `generate` streams consumed in turn on a GPU (each through a captured decoder) give
    plain generation's tokens: each is lent a decoder of its own."""
    model = _sharp_tiny(llm, seed=4)
    prompts = [[5, 17, 99, 3], [42, 7, 8, 1]]
    expected = [llm.generate(model, p, 6, cuda_graphs=False) for p in prompts]
    gens = [llm.stream_generate(model, p, 6) for p in prompts]
    got = [[], []]
    for _ in range(6):
        for out, gen in zip(got, gens):
            out.append(next(gen))
    assert got == expected
    nested = []
    outer = llm.generate(model, prompts[0], 3,
                         on_token=lambda t: nested.append(llm.generate(model, prompts[1], 3)))
    assert outer == expected[0][:3] and nested == [expected[1][:3]] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_on_gpu_decodes_through_the_kernels(llm, bits, dtype):
    """§8 on a GPU: a quantized model decodes through Appendix D's kernels (eagerly, in CUDA graphs,
    compiled and captured, at batch 1 with the neighbours folded in) with the tokens of the same
    model on the reference path (dequantize, then F.linear); a sharp model, so that a wrong
    product changes the tokens."""
    model = _sharp_tiny(llm, seed=7).to(dtype)
    fast = llm.quantize_model(model, llm.rtn_quantizer(bits, 32))
    reference = llm.quantize_model(model, llm.rtn_quantizer(bits, 32), fast=False)
    prompts = [[5, 17, 99, 3, 8, 1], [42, 7]]
    expected = [llm.generate(reference, p, 10, cuda_graphs=False) for p in prompts]
    calls = []
    kernel = llm.triton_quant_matmul
    llm.triton_quant_matmul = lambda *a: calls.append(a[0].shape[0]) or kernel(*a)
    try:
        got = [llm.generate(fast, p, 10, cuda_graphs=False) for p in prompts]
    finally:
        llm.triton_quant_matmul = kernel
    _same_or_near_tie(llm, fast, reference, prompts, got, expected, dtype)
    assert calls and max(calls) <= llm.QUANT_MAX_ROWS
    qkv, gate_up = llm.fuse_projections(fast)[0]  # one kernel for q/k/v, one for gate/up
    assert isinstance(qkv, llm.QuantizedLinear) and qkv.out_features == sum(
        m.out_features for m in (fast.layers[0].attn.wq, fast.layers[0].attn.wk, fast.layers[0].attn.wv))
    assert isinstance(gate_up, llm.QuantizedLinear) and llm.fuse_projections(fast)[0][0] is qkv
    for mode in ("graph", "compile+graph"):
        _same_or_near_tie(llm, fast, reference, prompts, llm.static_generate(fast, prompts, 10, mode),
                          expected, dtype)
    # batch 1 in a CUDA graph: the norm, SiLU·up and residual folded into the kernels
    _same_or_near_tie(llm, fast, reference, prompts, [llm.generate(fast, p, 10) for p in prompts],
                      expected, dtype)


def _same_or_near_tie(llm, fast, reference, prompts, got, expected, dtype):
    """fp32: the same tokens. bf16: the kernels form each weight exactly in fp32 (the reference rounds
    it to bf16 first), so a near tie may flip: where the tokens first differ, both models' logits
    agree to 2% of their scale and the reference's two best logits are that close too."""
    if dtype == torch.float32:
        assert got == expected
        return
    for prompt, a, b in zip(prompts, got, expected):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if n is None:
            assert a == b
            continue
        with torch.inference_mode():
            ref = llm.forward_without_cache(reference, prompt + b[:n]).float()
            ours = llm.forward_without_cache(fast, prompt + b[:n]).float()
        scale, top2 = ref.abs().max().item(), ref.topk(2).values
        assert (ours - ref).abs().max().item() <= 0.02 * scale, (prompt, n)
        assert (top2[0] - top2[1]).item() <= 0.02 * scale, f"token {n} differs without a near tie"


REPEATING = [1, 2, 3, 4, 5, 6, 7, 8] * 3 + [1, 2, 3]


@pytest.mark.parametrize("mode,gammas", [("graph", [1, 2, 4, 8]), ("compile+graph", [4])])
def test_static_speculative_on_gpu_equals_generate_in_fp32(llm, mode, gammas):
    """§6 on a GPU (Appendix D): greedy speculation through captured verify steps gives plain greedy
    decoding's tokens in fp32, for prompt lookup, a 1-layer self-draft and a self-draft that is always
    right; speculative_generate takes this path on a GPU by default."""
    model = _sharp_tiny(llm, seed=6)
    drafts = [llm.NgramDraft(), llm.ModelDraft(llm.truncated_model(model, 1)),
              llm.ModelDraft(llm.truncated_model(model, model.cfg.n_layers))]
    for prompt in (REPEATING, [9, 8, 7]):
        base = llm.generate(model, prompt, 24, cuda_graphs=False)
        for gamma in gammas:
            for draft in drafts:
                out, stats = llm.speculative_generate(model, draft, prompt, 24, gamma=gamma, static=mode)
                assert out == base, (mode, gamma, draft.name, prompt)
                assert stats.accepted + stats.rounds + 1 == 24
    default, _ = llm.speculative_generate(model, llm.NgramDraft(), REPEATING, 24, gamma=4)
    assert default == llm.generate(model, REPEATING, 24, cuda_graphs=False)


def test_static_speculative_bf16_emits_the_verify_steps_argmax(llm):
    """In bf16 each emitted token is the verify step's own argmax: every round's accepted drafts and
    its last token are what the step's logits say, at the positions the round wrote."""
    model = _sharp_tiny(llm, seed=6).to(torch.bfloat16)
    calls, real = [], llm.static_verify_step

    def spy(decoder, inputs):
        head, logits = real(decoder, inputs)
        calls.append((inputs.tolist(), head.tolist(), logits.argmax(-1).tolist()))
        return head, logits

    llm.static_verify_step = spy
    try:
        out, stats = llm.speculative_generate(model, llm.NgramDraft(), REPEATING, 24, gamma=4, static="eager")
    finally:
        llm.static_verify_step = real
    assert calls and stats.accepted > 0
    for inputs, head, argmax in calls:
        L = len(inputs) - 2
        drafted, start, n = inputs[1:1 + inputs[-1]], inputs[L], inputs[-1]
        assert head[1:] == argmax
        k = head[0]
        assert k <= n and drafted[:k] == argmax[:k] and (k == n or drafted[k] != argmax[k])
        at = start + 1 - len(REPEATING)  # where this round's tokens go in the output
        assert out[at:at + k + 1] == drafted[:k] + [argmax[k]]


def test_static_speculative_sampling_on_gpu_matches_target(llm):
    """Sampling through captured verify steps (the default on a GPU) keeps the target's joint
    distribution of the first two tokens (chi-square over 1,000 runs, a 1-layer self-draft, γ = 2)."""
    model = llm.build_model("tiny", seed=0, device="cuda")
    counts, probs, _ = sample_first_two_tokens(llm, model, 1000)
    assert chi2_pvalue(counts, probs) > 1e-3
