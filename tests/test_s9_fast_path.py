"""§9 The fast path: the static-shape decode step gives the tokens of plain generation, eagerly
and compiled (CPU; skipped with a reason where torch.compile cannot build), for batches of
prompts of unequal length; bad input gets named errors. The CUDA-graph mode is tested in
tests/test_gpu.py."""

import pytest
import torch
from conftest import engine_tokens, lesson_with_triton, sharp_tiny

_, DEVICE, needs_triton = lesson_with_triton()
PROMPTS = [[5, 17, 99, 3, 8, 1], [42], list(range(30, 52))]


@pytest.fixture(scope="module")
def tiny(llm):
    return llm.build_model("tiny", seed=3, device="cpu")


def test_static_step_equals_generate(llm, tiny):
    reference = [llm.generate(tiny, p, 12) for p in PROMPTS]
    assert llm.static_generate(tiny, PROMPTS, 12, "eager") == reference
    assert llm.static_generate(tiny, PROMPTS[:1], 12, "eager") == reference[:1]


def test_static_step_logits_equal_packed_step(llm, tiny):
    """One static step over the padded cache gives the logits of the ordinary decode step."""
    dec = llm.StaticDecoder(tiny, 2, 32)
    cache = llm.ContiguousKVCache(tiny.cfg, 2, 32)
    seqs = [llm.SequenceState(i, list(p)) for i, p in enumerate(PROMPTS[:2])]
    for c in (dec.cache, cache):
        llm.run_step(tiny, c, [llm.SequenceState(i, list(p)) for i, p in enumerate(PROMPTS[:2])],
                     [len(p) for p in PROMPTS[:2]])
    static = dec.step_eager(torch.tensor([7, 9]), torch.tensor([len(p) for p in PROMPTS[:2]]))
    for seq, t in zip(seqs, (7, 9)):
        seq.token_ids.append(t)
        seq.num_computed_tokens = len(seq.token_ids) - 1
    packed = llm.run_step(tiny, cache, seqs, [1, 1])
    torch.testing.assert_close(static, packed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec.cache.k, cache.k, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("length", [22, 32])
def test_static_prefill_equals_packed_prefill(llm, tiny, length):
    """The static prefill (prompts padded at their end to one length, the batch padded with
    one-token rows) gives the packed prefill's last-token logits, and writes the same cache rows
    for every prompt token; it leaves the first picks and their positions in the decode buffers."""
    dec = llm.StaticDecoder(tiny, 4, 64)
    cache = llm.ContiguousKVCache(tiny.cfg, 3, 64)
    packed = llm.run_step(tiny, cache, [llm.SequenceState(i, list(p)) for i, p in enumerate(PROMPTS)],
                          [len(p) for p in PROMPTS])
    tokens = torch.zeros(4, length, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in PROMPTS] + [1])
    static = dec.prefill_and_pick(tokens, lens)
    torch.testing.assert_close(static[:3], packed, atol=1e-5, rtol=1e-5)
    for i, p in enumerate(PROMPTS):
        for ours, theirs in ((dec.cache.k, cache.k), (dec.cache.v, cache.v)):
            torch.testing.assert_close(ours[:, i, :, :len(p)], theirs[:, i, :, :len(p)], atol=1e-6, rtol=1e-5)
    assert dec.tokens.tolist() == static.argmax(-1).tolist() and dec.positions.tolist() == lens.tolist()


def test_fused_projections_are_views_and_change_nothing(llm):
    """q/k/v and gate/up become row blocks of one matrix each: the modules' weights alias it (no
    extra memory), the model's logits do not move, the fused step equals the unfused one, and a
    model whose weights moved (`.to`) or a quantized copy is handled."""
    model = llm.build_model("tiny", seed=5, device="cpu")
    tokens = torch.tensor([3, 14, 15, 92, 65])
    before = model.forward_batch(tokens[None])
    fused = llm.fuse_projections(model)
    assert len(fused) == model.cfg.n_layers and all(a is not None and b is not None for a, b in fused)
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    w_qkv, w_gate_up = fused[0]
    assert w_qkv.shape[0] == attn.wq.weight.shape[0] + 2 * attn.wk.weight.shape[0]
    assert attn.wk.weight.data_ptr() == w_qkv[attn.wq.weight.shape[0]:].data_ptr()
    assert mlp.w_up.weight.data_ptr() == w_gate_up[mlp.w_gate.weight.shape[0]:].data_ptr()
    assert torch.equal(model.forward_batch(tokens[None]), before)
    assert llm.fuse_projections(model)[0][0] is w_qkv  # idempotent: no second copy

    dec = llm.StaticDecoder(model, 2, 16)
    llm.run_step(model, dec.cache, [llm.SequenceState(i, [5 + i, 6]) for i in range(2)], [2, 2])
    t, pos = torch.tensor([7, 8]), torch.tensor([2, 2])
    k0 = dec.cache.k.clone()
    with_fused = dec.step_eager(t, pos)
    dec.cache.k.copy_(k0), dec.fused.clear(), dec.fused.extend([(None, None)] * model.cfg.n_layers)
    torch.testing.assert_close(with_fused, dec.step_eager(t, pos), atol=1e-5, rtol=1e-5)

    model.to(torch.float64)  # the parameters are new tensors now: fusing again lays them out anew
    refused = llm.fuse_projections(model)
    assert refused[0][0].dtype == torch.float64 and refused[0][0].data_ptr() == attn.wq.weight.data_ptr()
    q = llm.quantize_model(llm.build_model("tiny", seed=5, device="cpu"), llm.rtn_quantizer(8))
    assert all(pair == (None, None) for pair in llm.fuse_projections(q))


def test_compiled_step_equals_eager(llm, tiny):
    try:
        out = llm.static_generate(tiny, PROMPTS, 8, "compile")
    except Exception as exc:  # no C++ compiler here: the lesson falls back to eager, the test cannot run
        pytest.skip(f"torch.compile cannot build on this machine: {type(exc).__name__}")
    assert out == llm.static_generate(tiny, PROMPTS, 8, "eager")


# ---------------------------------------------------------------------------------------------
# The CPU matrix-vector path of a compiled batch-1 step: BLAS or a compiled product-and-sum
# ---------------------------------------------------------------------------------------------
def test_reduce_matvec_equals_linear_on_every_smollm2_shape(llm):
    """Every weight shape of SmolLM2's step (fused q/k/v, wo, fused gate/up, down, the head), eagerly
    and compiled, within fp32 rounding of F.linear (sums of 576 or 1,536 products)."""
    cfg = llm.ModelConfig.from_name("smollm2-135m")
    H, Hkv, D, d, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.ffn_dim
    shapes = [((H + 2 * Hkv) * D, d), (d, H * D), (2 * f, d), (d, f), (cfg.vocab_size, d)]
    g = torch.Generator().manual_seed(0)
    try:
        compiled = torch.compile(llm.reduce_matvec, dynamic=False)
        compiled(torch.ones(1, 4), torch.ones(3, 4))
    except Exception as exc:  # no C++ compiler here
        pytest.skip(f"torch.compile cannot build on this machine: {type(exc).__name__}")
    for n, k in shapes:
        w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(1, k, generator=g)
        ref = torch.nn.functional.linear(x.double(), w.double()).float()
        for fn in (llm.reduce_matvec, compiled):
            assert torch.allclose(fn(x, w), ref, rtol=1e-4, atol=1e-5), (n, k)


def test_cpu_matvec_choice_forced_and_measured(llm, tiny):
    fused = llm.fuse_projections(tiny)
    shapes = {tuple(w.shape) for layer, pair in zip(tiny.layers, fused)
              for w in llm.layer_matrices(layer, pair)}
    shapes.add(tuple(tiny.lm_head.weight.shape))
    for path in llm.MATVEC_PATHS:
        assert llm.choose_cpu_matvec(tiny, fused, force=path) == dict.fromkeys(shapes, path)
    # the measured choice: the BLAS wherever it reaches `threshold` of the read roof
    assert set(llm.choose_cpu_matvec(tiny, fused, threshold=0.0, repeat=1).values()) == {"blas"}
    assert set(llm.choose_cpu_matvec(tiny, fused, threshold=float("inf"), repeat=1).values()) == {"reduce"}
    with pytest.raises(llm.InvalidArgumentError, match="force"):
        llm.choose_cpu_matvec(tiny, fused, force="mkl")


def test_compiled_batch1_step_with_the_reduction_equals_eager(llm, tiny):
    """The BLAS path compiles as any F.linear does (test_compiled_step_equals_eager)."""
    prompt, path = PROMPTS[2], "reduce"
    eager = llm.StaticDecoder(tiny, 1, 40).generate([prompt], 8)
    dec = llm.StaticDecoder(tiny, 1, 40, "compile", cpu_matvec=path)
    assert set(dec.matvec_paths.values()) == {path}
    try:
        compiled = dec.generate([prompt], 8)
    except Exception as exc:
        pytest.skip(f"torch.compile cannot build on this machine: {type(exc).__name__}")
    assert compiled == eager


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_compiled_quantized_step_matches_eager(llm, tiny, bits, group):
    """§8's quantized layers inside the compiled step. They round activations to bf16 for PyTorch's
    low-bit kernels, and the compiled step computes the values it rounds in another order, so a
    value can land one bf16 step away: logits agree to bf16's precision, not bit for bit (on
    SmolLM2 INT4 g128, 22 of 23 teacher-forced greedy tokens agreed; the one flip was at a top-2
    gap of 0.10 against a logit difference of 0.17)."""
    q = llm.quantize_model(tiny, llm.rtn_quantizer(bits, group or 128))
    decoders = [llm.StaticDecoder(q, 2, 32, mode) for mode in ("eager", "compile")]
    seqs = [list(p) for p in PROMPTS[:2]]
    logits = []
    with torch.inference_mode():
        for dec in decoders:
            llm.run_step(q, dec.cache, [llm.SequenceState(i, list(p)) for i, p in enumerate(seqs)],
                         [len(p) for p in seqs])
            try:
                logits.append(dec.step(torch.tensor([7, 9]), torch.tensor([len(p) for p in seqs])).clone())
            except Exception as exc:
                pytest.skip(f"torch.compile cannot build on this machine: {type(exc).__name__}")
    eager, compiled = logits
    scale = float(eager.abs().max())
    assert float((eager - compiled).abs().max()) <= 2 ** -7 * scale  # bf16 keeps 8 significant bits


def test_stop_ids_and_limits(llm, tiny):
    full = llm.static_generate(tiny, PROMPTS[:1], 10)[0]
    stop = full[3]
    assert llm.static_generate(tiny, PROMPTS[:1], 10, stop_ids=[stop])[0] == full[:full.index(stop) + 1]
    assert llm.static_generate(tiny, PROMPTS[:1], 0)[0] == []


@pytest.mark.parametrize("check_every", [1, 3, 8, 100])
def test_rows_stop_independently(llm, tiny, check_every):
    """The host looks at the tokens only every `check_every` steps: whatever that is, each row ends
    at its own first stop token."""
    full = llm.static_generate(tiny, PROMPTS, 16)
    stops = {full[0][2], full[2][9]}
    dec = llm.StaticDecoder(tiny, 4, 64)
    out = dec.generate(PROMPTS, 16, stop_ids=stops, check_every=check_every)
    expected = [next((row[:i + 1] for i, t in enumerate(row) if t in stops), row) for row in full]
    assert out == expected


def test_bad_input(llm, tiny):
    with pytest.raises(llm.InvalidArgumentError, match="mode"):
        llm.StaticDecoder(tiny, 1, 16, mode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(llm.InvalidArgumentError, match="CUDA"):
            llm.StaticDecoder(tiny, 1, 16, mode="graph")
    dec = llm.StaticDecoder(tiny, 1, 16)
    with pytest.raises(llm.ContextOverflowError, match="max_seq_len"):
        dec.generate([list(range(10))], 10)
    with pytest.raises(llm.InvalidArgumentError, match="batch size"):
        dec.generate([[1], [2]], 2)


def test_op_count_equals_a_plain_dispatch_mode(llm):
    """count_dispatched_ops opts out of PyTorch's Dynamo wrapper; it counts what a plain mode sees."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Plain(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    def fn():
        return torch.nn.functional.silu(torch.arange(6.0).view(2, 3)) @ torch.ones(3, 2)

    with Plain():
        fn()
    assert llm.count_dispatched_ops(fn) == len(seen) >= 3


def test_launch_overhead_counts_ops(llm):
    rows = llm.measure_launch_overhead("tiny", "cpu", context=16)
    row = rows[0]
    cfg = llm.ModelConfig.from_name("tiny")
    assert row["ops per step"] > 10 * cfg.n_layers  # a dozen or more operations per layer
    assert row["eager step (ms)"] > 0 and row["bandwidth limit (ms)"] > 0
    assert 0 < row["matmuls alone (ms)"] < row["eager step (ms)"]
    n_matmuls = 4 * cfg.n_layers + 1  # fused q/k/v, wo, fused gate/up, down; the head
    others = (row["eager step (ms)"] - row["matmuls alone (ms)"]) * 1e3 / (row["ops per step"] - n_matmuls)
    assert row["other ops (µs each)"] == pytest.approx(others)


def test_compiled_equals_eager_on_smollm2(llm, smollm2_gguf):
    net, tok = llm.get_model(smollm2_gguf)
    prompt = tok.encode_chat([{"role": "user", "content": "Name a colour."}])
    eager = llm.static_generate(net, [prompt], 8)
    assert eager == [llm.generate(net, prompt, 8)]
    short = llm.truncated_model(net, 3)  # SmolLM2's real weights and shapes, 3 layers: compiles in seconds
    eager = llm.static_generate(short, [prompt], 8)
    try:
        compiled = llm.static_generate(short, [prompt], 8, "compile")
    except Exception as exc:
        pytest.skip(f"torch.compile cannot build on this machine: {type(exc).__name__}")
    assert compiled == eager


# ----------------------------------------------------------------------------- the engine's decode step
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_engine_static_decode_step_equals_packed(llm, tiny, mode):
    """The static-shape paged decode step (batches padded to 1, 2, 4, 8) gives the packed step's
    tokens, also when a small pool forces preemption."""
    packed, _ = engine_tokens(llm, tiny, mode, "packed")
    static, engine = engine_tokens(llm, tiny, mode, "static")
    assert engine.scheduler.num_preemptions > 0 and engine.decode_runner.sizes == [1, 2, 4, 8]
    assert static == packed


def test_padding_rows_touch_only_the_scratch_block(llm, tiny):
    cache = llm.PagedKVCache(tiny.cfg, 8, 4, scratch_block=True)
    bm = llm.BlockManager(8, 4)
    seqs = [llm.SequenceState(i, list(p)) for i, p in enumerate(([3, 4, 5, 6, 7], [8, 9]))]
    for s in seqs:
        bm.allocate(s)
    llm.run_step(tiny, cache, seqs, [5, 2])
    for s, t in zip(seqs, (1, 2)):
        s.token_ids.append(t)
        bm.append_slot(s)
    before_k = cache.k.clone()
    runner = llm.PagedDecodeRunner(tiny, cache, 4)
    logits = runner.step(seqs)  # 2 sequences padded to... 2; then 3 rows padded to 4 below
    owned = {b for s in seqs for b in s.block_table}
    changed = {b for b in range(9) if not torch.equal(cache.k[:, b], before_k[:, b])}
    assert changed <= owned and logits.shape == (2, tiny.cfg.vocab_size)
    third = llm.SequenceState(2, [1, 2, 3])
    bm.allocate(third)
    llm.run_step(tiny, cache, [third], [3])
    third.token_ids.append(4)
    bm.append_slot(third)
    for s, t in zip(seqs, (5, 6)):
        s.token_ids.append(t)
        bm.append_slot(s)
    before_k = cache.k.clone()
    runner.step([*seqs, third])  # 3 rows, padded to 4: the pad row writes the scratch block (8)
    owned = {b for s in (*seqs, third) for b in s.block_table}
    changed = {b for b in range(9) if not torch.equal(cache.k[:, b], before_k[:, b])}
    assert changed - owned == {8}


def test_engine_decode_step_bad_input(llm, tiny):
    with pytest.raises(llm.InvalidArgumentError, match="decode_step"):
        llm.LLMEngine(tiny, decode_step="fast")
    with pytest.raises(llm.InvalidArgumentError, match="CUDA"):
        llm.LLMEngine(tiny, decode_step="graph")
    with pytest.raises(llm.InvalidArgumentError, match="scratch_block"):
        llm.PagedDecodeRunner(tiny, llm.PagedKVCache(tiny.cfg, 4, 4), 2)


def test_fast_path_rows_use_their_own_limit(llm):
    """Each batch-1 row of the decode-mode table is set against the limit measured right before it."""
    rows = llm.measure_fast_path("tiny", "cpu", new_tokens=6, prompt_len=4, compile_step=False)
    assert [r["mode"] for r in rows] == ["generate (§1)", "eager"]
    for r in rows:
        assert r["same tokens"] and r["bandwidth limit (tok/s)"] > 0
        assert r["% of bandwidth limit"] == pytest.approx(100 * r["tokens/s"] / r["bandwidth limit (tok/s)"])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (37, 300), (8, 1024), (100, 64)])
def test_triton_matvec_equals_linear(llm, shape, dtype):
    """The batch-1 matrix-vector kernel equals F.linear for every launch configuration it may pick,
    for shapes that fill its tiles exactly and shapes that do not (masked loads): to fp32 rounding,
    and in bf16 to the rounding of its output (it accumulates in fp32)."""
    N, K = shape
    g = torch.Generator().manual_seed(N)
    w, x = (torch.randn(n, K, generator=g).to(DEVICE, dtype) for n in (N, 1))
    ref = torch.nn.functional.linear(x.double(), w.double())
    tol = (1e-4 if dtype == torch.float32 else torch.finfo(dtype).eps) * ref.abs().max().item()
    key = llm.matvec_key(w)
    try:
        for cfg in llm.MATVEC_CONFIGS:
            llm.MATVEC_TUNED[key] = cfg
            out = llm.triton_matvec(x, w)
            assert out.shape == (1, N) and out.dtype == x.dtype
            assert (out.double() - ref).abs().max().item() < tol
        assert llm.triton_matvec(x[0], w).shape == (N,)
    finally:
        llm.MATVEC_TUNED.pop(key, None)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (37, 300)])
def test_triton_matvec_fusions_equal_their_pytorch_ops(llm, shape, dtype):
    """The neighbours folded into the kernel give what the step's PyTorch ops give: RMSNorm before
    the product, silu(gate) · up after a stacked gate/up weight, the residual add after; for the
    first launch configurations (tiles filled and masked). In fp32 to 1e-4 of the largest value, in
    bf16 to 4 roundings of it (the kernel rounds fewer times than the ops)."""
    N, K = shape
    g = torch.Generator().manual_seed(K)
    w, x, res = (torch.randn(*s, generator=g).to(DEVICE, dtype) for s in ((2 * N, K), (1, K), (1, N)))
    norm = llm.RMSNorm(K, 1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(K, generator=g) + 0.5)
    norm = norm.to(dtype)

    def rms(v):  # the model's RMSNorm in float64
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()

    def swiglu(h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    xd, wd, lin = x.double(), w.double(), torch.nn.functional.linear
    cases = {  # kwargs → reference in float64
        "norm": (dict(norm=norm.weight, eps=norm.eps), lin(rms(xd), wd)),
        "norm+swiglu": (dict(norm=norm.weight, eps=norm.eps, swiglu=True), swiglu(lin(rms(xd), wd))),
        "swiglu": (dict(swiglu=True), swiglu(lin(xd, wd))),
        "residual": (dict(residual=res), res.double() + lin(xd, wd[:N])),
    }
    for name, (kwargs, ref) in cases.items():
        weight = w[:N] if name == "residual" else w
        tol = (1e-4 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps) * ref.abs().max().item()
        key = llm.matvec_key(weight, kwargs.get("norm"), kwargs.get("residual"), kwargs.get("swiglu", False))
        try:
            for cfg in llm.MATVEC_CONFIGS[:3]:
                llm.MATVEC_TUNED[key] = cfg
                out = llm.triton_matvec(x, weight, **kwargs)
                assert out.shape == ref.shape and out.dtype == dtype, name
                assert (out.double() - ref).abs().max().item() < tol, (name, cfg)
        finally:
            llm.MATVEC_TUNED.pop(key, None)


@needs_triton
def test_triton_matvec_rejects_bad_input(llm):
    w = torch.randn(16, 32, device=DEVICE)
    with pytest.raises(llm.InvalidArgumentError, match="one row"):
        llm.triton_matvec(torch.randn(2, 32, device=DEVICE), w)
    with pytest.raises(llm.InvalidArgumentError, match="unit"):
        llm.triton_matvec(torch.randn(1, 16, device=DEVICE), w.t())
    with pytest.raises(llm.InvalidArgumentError, match="residual"):
        llm.triton_matvec(torch.randn(1, 32, device=DEVICE), w, residual=torch.randn(1, 8, device=DEVICE))
    with pytest.raises(llm.InvalidArgumentError, match="even"):
        llm.triton_matvec(torch.randn(1, 32, device=DEVICE), w[:15], swiglu=True)


@needs_triton
def test_matvec_operator_inside_torch_compile_and_static_decoder(llm):
    """As a PyTorch operator the kernel compiles opaquely inside a compiled function, and a batch-1
    StaticDecoder whose projections run it (the default at batch 1 on a GPU)
    decodes plain generation's tokens, eagerly and (on a GPU) compiled and captured."""
    op = llm.matvec_operator()
    w, x = torch.randn(48, 96, device=DEVICE), torch.randn(1, 96, device=DEVICE)
    ref = x @ w.T
    torch.testing.assert_close(op(x, w, None, 0.0, None, False), ref, atol=1e-4, rtol=1e-4)
    try:
        out = torch.compile(lambda x, w: op(x * 2.0, w, None, 0.0, None, False) + 1.0, dynamic=False,
                            fullgraph=True)(x, w)
    except Exception as exc:  # no C++ compiler here
        pytest.skip(f"torch.compile cannot build on this machine: {type(exc).__name__}")
    torch.testing.assert_close(out, 2 * ref + 1, atol=1e-4, rtol=1e-4)
    model = llm.build_model("tiny", seed=4, device=DEVICE)
    modes = ("eager", "compile+graph") if DEVICE == "cuda" else ("eager",)
    for mode in modes:
        dec = llm.StaticDecoder(model, 1, 40, mode)
        dec.matvec_op = op
        for prompt in PROMPTS:
            assert dec.generate([prompt], 8) == [llm.generate(model, prompt, 8, cuda_graphs=False)]
    # A StaticDecoder takes it at batch 1 wherever it can run (a GPU), never for a batch
    assert llm.use_matvec(model, 1) == (DEVICE == "cuda")
    assert not llm.use_matvec(model, 2)
    # §8's quantized layers keep their own forward; the kernel runs only where a weight is plain
    q = llm.quantize_model(model, llm.rtn_quantizer(8, 128))
    ref = llm.StaticDecoder(q, 1, 40).generate(PROMPTS[:1], 6)
    dec = llm.StaticDecoder(q, 1, 40)
    dec.matvec_op = op
    assert dec.generate(PROMPTS[:1], 6) == ref


def test_demonstrate_fast_path_tiny(llm, capsys):
    """The §9 demo measures the launch overhead and the decode modes; every mode's tokens equal
    plain generation's."""
    report = llm.demonstrate_fast_path(model="tiny", device="cpu", quick=True, seed=1)
    overhead, modes = report["overhead"][0], report["modes"]
    assert overhead["ops per step"] > 50 and overhead["eager step (ms)"] > 0
    assert {r["mode"] for r in modes} >= {"generate (§1)", "eager"}
    assert all(r["same tokens"] is True and r["tokens/s"] > 0 for r in modes)
    assert "Takeaway" in capsys.readouterr().out


# ------------------------------------------------------------------ kept decoders follow the weights
FUSED_SOURCES = ("wq.weight", "wk.weight", "wv.weight", "w_gate.weight", "w_up.weight")




def change_weights(model, how):
    """New values for the weights a decoder fuses (q/k/v, gate/up), put in `how`."""
    if how == "to(float64) then new weights":
        model.to(torch.float64)
    g = torch.Generator().manual_seed(99)
    new = {n: (torch.randn(p.shape, generator=g) * 0.3).to(p.dtype) for n, p in model.named_parameters()
           if n.endswith(FUSED_SOURCES)}
    if how in ("load_state_dict(assign=True)", "to(float64) then new weights"):
        model.load_state_dict({**model.state_dict(), **new}, assign=True)
    elif how == "new nn.Parameter":
        for name, value in new.items():
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.weight = torch.nn.Parameter(value)
    elif how == "in-place copy_":
        with torch.no_grad():
            for name, value in new.items():
                model.get_parameter(name).copy_(value)
    elif how == "double()":
        model.double()


WEIGHT_CHANGES = ["load_state_dict(assign=True)", "new nn.Parameter", "in-place copy_", "double()",
                  "to(float64) then new weights"]


@pytest.mark.parametrize("how", WEIGHT_CHANGES)
def test_kept_decoder_follows_changed_weights(llm, how):
    """A kept decoder built before the weights change (replaced, written in place, moved to
    another dtype) rebuilds what it derived from them: `static_generate` equals `generate` on the
    new weights, which differ from the old ones' tokens."""
    model = sharp_tiny(llm, seed=6)
    prompts = [[5, 17, 99, 3], [42, 7]]
    before = llm.static_generate(model, prompts, 6)
    assert before == [llm.generate(model, p, 6) for p in prompts]
    change_weights(model, how)
    after = [llm.generate(model, p, 6) for p in prompts]
    assert after != before or how == "double()"  # float64 keeps the tokens; the cache must follow
    assert llm.static_generate(model, prompts, 6) == after
    (decoder,) = [d for ds in model._kept_decoders.values() for d in ds]
    assert decoder.signature == llm.weights_signature(model) and decoder.cache.k.dtype == model.dtype


@pytest.mark.parametrize("how", ["load_state_dict(assign=True)", "in-place copy_"])
def test_engine_static_step_follows_changed_weights(llm, how):
    """An engine whose decode steps run `PagedDecodeRunner` ("static"), built before the weights
    change, gives the new weights' tokens."""
    model = sharp_tiny(llm, seed=6)
    prompts, params = [[5, 17, 99, 3], [42, 7]], llm.SamplingParams(max_tokens=6)
    engine = llm.LLMEngine(model, block_size=4, max_num_seqs=2, decode_step="static")
    before = [o.token_ids for o in engine.generate(prompts, [params] * 2)]
    assert before == [llm.generate(model, p, 6) for p in prompts]
    change_weights(model, how)
    after = [llm.generate(model, p, 6) for p in prompts]
    assert after != before
    assert [o.token_ids for o in engine.generate(prompts, [params] * 2)] == after


def test_weights_signature_is_cheap_and_complete(llm):
    """The signature changes with every kind of change a kept decoder must notice, and is
    Python attribute reads only (a tuple per parameter)."""
    model = llm.build_model("tiny", seed=1, device="cpu")
    seen = [llm.weights_signature(model)]
    assert {id(p) for p in model.parameters()} == {entry[0] for entry in seen[0]}
    for how in WEIGHT_CHANGES[:4]:
        change_weights(model, how)
        seen.append(llm.weights_signature(model))
    assert all(a != b for a, b in zip(seen, seen[1:]))
    assert llm.weights_signature(model) == seen[-1]  # reading it changes nothing
    with torch.inference_mode():  # weights without a version counter (as get_model's demos make)
        made_in_inference = llm.build_model("tiny", seed=1, device="cpu")
    assert llm.weights_signature(made_in_inference) == llm.weights_signature(made_in_inference)
    assert llm.static_generate(made_in_inference, [[1, 2, 3]], 3) == [llm.generate(made_in_inference,
                                                                                   [1, 2, 3], 3)]


def test_static_generate_takes_tensors_of_prompts(llm, tiny):
    """A (B, T) tensor or a list of 1-D tensors gives what the lists give; a 1-D tensor or a
    flat list of ids (one prompt, not wrapped) gets a named error saying what to pass."""
    lists = [[5, 17, 99], [42, 7, 8]]
    expected = llm.static_generate(tiny, lists, 4)
    assert llm.static_generate(tiny, torch.tensor(lists), 4) == expected
    assert llm.static_generate(tiny, [torch.tensor(p) for p in lists], 4) == expected
    for bad in (torch.tensor(lists[0]), lists[0], "hello"):
        with pytest.raises(llm.InvalidArgumentError, match="for one prompt pass"):
            llm.static_generate(tiny, bad, 4)
