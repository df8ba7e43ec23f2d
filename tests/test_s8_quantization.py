"""§8 Quantization I: packing round-trips, RTN error is at most half a step, the fused matvec
equals dequantize-then-matmul, GPTQ beats RTN on correlated inputs and equals a plain
one-column-at-a-time implementation written here, act-order keeps every group on its own grid,
AWQ's folded scales leave the model's function unchanged and never lose to α = 0, INT4 g32
reproduces the GGUF's Q4_1 weights exactly, and bad input gets named errors."""

import pytest
import torch
from conftest import load_lesson

llm_module = load_lesson()


@pytest.fixture(scope="module")
def tiny(llm):
    return llm.build_model("tiny", seed=0, device="cpu")


def step_of(qw, K):
    """The grid step of every element of a groupwise QuantizedWeight, (O, K)."""
    return qw.scales.float().repeat_interleave(qw.group_size, 1)[:, :K]


@pytest.mark.parametrize("bits,group,K", [(4, 32, 128), (4, 128, 100), (3, 16, 50), (2, 8, 24), (4, 64, 576)])
def test_groupwise_error_is_at_most_half_a_step(llm, bits, group, K):
    w = torch.randn(24, K, generator=torch.Generator().manual_seed(bits * K)) * 0.05
    qw = llm.quantize_groupwise(w, bits, group)
    err = (w - qw.dequantize()).abs()
    # half a step, plus the fp16 rounding of the group's offset (its min)
    assert (err <= 0.5 * step_of(qw, K) * (1 + 1e-3) + 1e-3 * w.abs().max()).all()
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (24, -(-K // group), group // 2)
    n_groups = -(-K // group)  # a partial last group is stored padded, and counted so
    assert qw.bits_per_weight == pytest.approx((bits * n_groups * group + 32 * n_groups) / K)
    if bits == 4:  # nibbles: the bits agree with the bytes stored
        assert qw.bits_per_weight == pytest.approx(8 * qw.nbytes / (24 * K))
    assert torch.equal(llm.fake_quantize_groupwise(w, bits, group), qw.dequantize())  # AWQ's shortcut


def test_nibble_packing_round_trips(llm):
    codes = torch.randint(0, 16, (5, 3, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = llm._pack_nibbles(codes)
    assert packed.shape == (5, 3, 16)
    assert torch.equal(torch.cat([packed & 15, packed >> 4], -1), codes)


def test_int8_per_channel(llm):
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))
    qw = llm.quantize_int8(w)
    assert qw.codes.dtype == torch.int8 and qw.codes.abs().max() <= 127
    assert ((w - qw.dequantize()).abs() <= 0.5 * qw.scales.float()[:, None] * (1 + 1e-6)).all()


def test_constant_rows_and_zeros(llm):
    w = torch.zeros(3, 64)
    w[1] = 0.25
    assert torch.equal(llm.quantize_groupwise(w, 4, 32).dequantize(), w)  # the offset holds a constant group
    q8 = llm.quantize_int8(w)
    assert torch.equal(q8.dequantize()[[0, 2]], w[[0, 2]]) and torch.isfinite(q8.scales).all()
    assert (q8.dequantize()[1] - 0.25).abs().max() <= 0.5 * q8.scales[1].float()


@pytest.mark.parametrize("bits,group", [(8, None), (4, 128), (4, 32), (3, 64)])
def test_fused_matvec_equals_dequantize_then_matmul(llm, bits, group):
    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(2))
    qw = llm.quantize_int8(w) if bits == 8 else llm.quantize_groupwise(w, bits, group)
    fast, ref = llm.QuantizedLinear(qw, fast=True), llm.QuantizedLinear(qw, fast=False)
    fast.builtin = False  # this test is about the compiled fused matvec; the next one, the built-ins
    for n in (1, 3, 9):  # 9 tokens take the dequantize path even when fast
        x = torch.randn(n, 200, generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(fast(x), ref(x), atol=1e-4, rtol=1e-4)
    kernel = llm._int8_matvec if bits == 8 else llm._int4_matvec
    args = (qw.codes, qw.scales) + (() if bits == 8 else (qw.offsets,))
    x = torch.randn(2, 200)
    torch.testing.assert_close(kernel(x, *args), x @ qw.dequantize().T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 128), (4, 32), (3, 64)])
def test_builtin_lowbit_kernels_equal_dequantize_then_matmul(llm, bits, group):
    """PyTorch's int8/int4 CPU kernels with bf16 activations (rows of 200 end in partial groups,
    padded for the int4 kernel): within bf16's precision of the fp32 reference."""
    if not llm.builtin_lowbit_kernels():
        pytest.skip("this PyTorch build has no CPU int8/int4 weight-only kernels")
    K = 208 if bits == 8 else 200  # the int8 kernel needs K % 16 == 0; int4 rows are padded to whole groups
    w = torch.randn(48, K, generator=torch.Generator().manual_seed(2))
    qw = llm.quantize_int8(w) if bits == 8 else llm.quantize_groupwise(w, bits, group)
    fast, ref = llm.QuantizedLinear(qw, fast=True), llm.QuantizedLinear(qw, fast=False)
    assert fast.builtin
    for n in (1, 2, 3, 4):
        x = torch.randn(n, K, generator=torch.Generator().manual_seed(n))
        expected = ref(x)
        assert (fast(x) - expected).abs().max() <= 1e-2 * expected.abs().max()
    assert not llm.QuantizedLinear(llm.quantize_groupwise(w, 4, 16)).builtin  # a group size it does not take
    assert not llm.QuantizedLinear(llm.quantize_int8(w[:, :200])).builtin  # a width it gets wrong


def test_quantize_model_works_on_a_copy(llm, tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    q = llm.quantize_model(tiny, llm.rtn_quantizer(8))
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert isinstance(q.lm_head, llm.QuantizedLinear)
    assert isinstance(q.layers[0].mlp.w_down, llm.QuantizedLinear)
    assert q.embed.weight.data_ptr() != tiny.embed.weight.data_ptr()
    ids = [1, 2, 3, 4, 5, 6]
    a, b = llm.forward_without_cache(tiny, ids), llm.forward_without_cache(q, ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # INT8 is close
    reference_path = llm.quantize_model(tiny, llm.rtn_quantizer(8), fast=False)
    assert llm.generate(q, ids, 6) == llm.generate(reference_path, ids, 6)


# ----------------------------------------------------------------------------- GPTQ
def gptq_reference(W, H, bits, group, percdamp=0.01):
    """GPTQ written plainly: no lazy blocks, no Cholesky trick; the inverse Hessian of the
    remaining columns is updated by eliminating one column at a time."""
    W, H = W.double().clone(), H.double().clone()
    K = W.shape[1]
    H += percdamp * torch.diagonal(H).mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    out = torch.zeros_like(W)
    for i in range(K):
        if i % group == 0:
            scale, offset = llm_module.group_grid(W[:, i:i + group].float(), bits)
        q = llm_module._codes_on_grid(W[:, i:i + 1].float(), scale, offset, bits)[:, 0]
        out[:, i] = offset.double() + scale.double() * q.double()
        err = (W[:, i] - out[:, i]) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]  # eliminate column i
    return out


def correlated_layer(seed, O=24, K=64, N=512):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 6, generator=g) @ torch.randn(6, K, generator=g) + 0.1 * torch.randn(N, K, generator=g)
    return torch.randn(O, K, generator=g), X, 2 * X.T @ X / N


@pytest.mark.parametrize("seed", range(3))
def test_gptq_beats_rtn_on_correlated_inputs(llm, seed):
    W, X, H = correlated_layer(seed)
    rtn = llm.quantize_groupwise(W, 4, 16).dequantize()
    for act_order in (False, True):
        w_hat, qw = llm.gptq_quantize(W, H, 4, 16, act_order=act_order)
        assert torch.equal(w_hat, qw.dequantize())
        assert ((X @ (W - w_hat).T) ** 2).sum() < 0.5 * ((X @ (W - rtn).T) ** 2).sum()


@pytest.mark.parametrize("block_size", [128, 16, 5])
def test_gptq_equals_plain_reference(llm, block_size):
    W, X, H = correlated_layer(7, K=48)
    w_hat, _ = llm.gptq_quantize(W, H, 4, 16, block_size=block_size)
    ref = gptq_reference(W, H, 4, 16)
    # same codes except where fp32 vs fp64 rounding lands a value on the other side of a midpoint
    assert (w_hat.double() - ref).abs().gt(1e-4).float().mean() < 0.01


def test_gptq_act_order_keeps_every_group_on_its_grid(llm):
    W, X, H = correlated_layer(3, K=64)
    w_hat, qw = llm.gptq_quantize(W, H, 3, 16, act_order=True)
    grid = qw.offsets.float()[..., None] + qw.scales.float()[..., None] * torch.arange(8.0)  # (O, G, 8)
    groups = w_hat.view(W.shape[0], 4, 16)
    dist = (groups[..., None] - grid[:, :, None, :]).abs().amin(-1)  # distance to the group's own grid
    assert dist.max() < 1e-5


def test_gptq_bad_input(llm):
    W = torch.randn(4, 32)
    with pytest.raises(llm.QuantizationError, match="Hessian"):
        llm.gptq_quantize(W, torch.eye(16))
    with pytest.raises(llm.QuantizationError, match="bits"):
        llm.gptq_quantize(W, torch.eye(32), bits=5)
    with pytest.raises(llm.QuantizationError, match="group_size"):
        llm.quantize_groupwise(W, 4, 7)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(llm.QuantizationError, match="NaN"):
        llm.quantize_int8(bad)
    for value in (float("inf"), -float("inf")):  # the check looks at the min and the max
        bad[0, 0] = value
        with pytest.raises(llm.QuantizationError, match="infinite"):
            llm.quantize_groupwise(bad, 4, 32)
    H = torch.eye(32)
    H[3, 5] = float("nan")
    with pytest.raises(llm.QuantizationError, match="finite"):
        llm.gptq_quantize(W, H)
    with pytest.raises(llm.QuantizationError, match="2-D"):
        llm.quantize_int4(torch.randn(3, 4, 5))


def test_group_size_none_and_empty_weights_get_named_errors(llm):
    W = torch.randn(4, 32)
    for call in (lambda: llm.quantize_groupwise(W, 4, None), lambda: llm.quantize_int4(W, None),
                 lambda: llm.fake_quantize_groupwise(W, 3, None), lambda: llm.rtn_quantizer(4, None)("x", W),
                 lambda: llm.gptq_quantize(W, torch.eye(32), 4, None)):
        with pytest.raises(llm.QuantizationError, match="group_size"):
            call()
    for shape in ((0, 32), (4, 0)):
        gptq = lambda w: llm.gptq_quantize(w, torch.eye(w.shape[1]))  # noqa: E731
        for call in (llm.quantize_int8, llm.quantize_int4, gptq):
            with pytest.raises(llm.QuantizationError, match="nothing to quantize"):
                call(torch.zeros(shape))


def test_gptq_hessian_that_is_not_positive_definite(llm):
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(8, 64, generator=g), torch.randn(64, 3, generator=g)
    with pytest.raises(llm.QuantizationError, match="negative diagonal"):
        llm.gptq_quantize(W, -torch.eye(64), 4, 32)
    H = torch.eye(64)
    H[0, 1] = H[1, 0] = 1e3  # symmetric, positive diagonal, indefinite even with damping 1
    with pytest.raises(llm.QuantizationError, match="positive definite.*calibration tokens"):
        llm.gptq_quantize(W, H, 4, 32)
    # Three tokens for 64 inputs: a singular H. Undamped Cholesky fails; the damping grows to 1%.
    singular = 2 * X @ X.T
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(singular)
    w0, _ = llm.gptq_quantize(W, singular, 4, 32, percdamp=0.0)
    w1, _ = llm.gptq_quantize(W, singular, 4, 32, percdamp=0.01)
    assert torch.equal(w0, w1)


@pytest.mark.parametrize("quantize,big", [(llm_module.quantize_int4, 7e4), (llm_module.quantize_int8, 1e7)])
def test_fp16_scale_overflow_is_refused(llm, quantize, big):
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    w[2, 5] = big  # int4: the group's min/max past 65504; int8: max|row| / 127 past 65504
    w[2, 6] = -big
    with pytest.raises(llm.QuantizationError, match="row 2.*65504"):
        quantize(w)
    w[2] /= 2 if quantize is llm.quantize_int8 else 1.1  # just representable: finite and accurate
    w_hat = quantize(w).dequantize()
    assert torch.isfinite(w_hat).all() and (w - w_hat).abs().max() <= big / 10


@pytest.mark.parametrize("magnitude", [1e-3, 1e-5, 1e-6, 1e-8, 1e-12])
def test_tiny_rows_have_a_bounded_error(llm, magnitude):
    """Steps below fp16's normal range are rounded up, never to 0: every value stays within half a
    step of its code, plus 2^-24 for the fp16 offset, and nothing becomes inf or NaN."""
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(1)) * magnitude
    w[0] = 0
    q8, q4 = llm.quantize_int8(w), llm.quantize_int4(w, 32)
    for qw, step in ((q8, q8.scales.float()[:, None].expand_as(w)), (q4, step_of(q4, 128))):
        w_hat = qw.dequantize()
        assert torch.isfinite(w_hat).all() and (qw.scales > 0).all()
        assert ((w - w_hat).abs() <= 0.5 * step * (1 + 1e-3) + 2**-24).all()
        assert torch.equal(w_hat[0], w[0])
    if magnitude >= 1e-6:  # |w| well above fp16's smallest subnormal: the relative error stays small
        assert (w - q8.dequantize()).abs().max() <= 0.02 * w.abs().max()


def test_gptq_model_runs_and_beats_rtn_on_calibration_error(llm, tiny):
    calib = torch.randint(0, tiny.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    g = llm.gptq_quantize_model(tiny, calib, 3, 16, show_progress=False)
    r = llm.quantize_model(tiny, llm.rtn_quantizer(3, 16))
    tokens = calib[0].tolist()
    ref = tiny.forward_batch(calib)
    err = lambda m: float(((m.forward_batch(calib) - ref) ** 2).mean())  # noqa: E731
    assert err(g) < err(r)
    assert all(isinstance(m, llm.QuantizedLinear) for n, m in g.named_modules()
               if n.endswith(("wq", "w_down")))
    assert llm.generate(g, tokens[:5], 4) == llm.generate(g, tokens[:5], 4, use_cache=False)


def test_decode_speed_times_the_decode_steps_and_not_the_prefill(llm, tiny, monkeypatch):
    """A fake generation on a fake clock: the prefill costs 100 s, each decode step 0.5 s, so
    `decode_speed` must report 2 tok/s whatever the prefill costs."""
    import types

    clock = [0.0]

    def fake_stream(model, prompt, n, *args, **kwargs):
        clock[0] += 100.0  # the prefill, then the first token
        for i in range(n):
            if i:
                clock[0] += 0.5  # one decode step per later token
            yield 7

    monkeypatch.setattr(llm, "stream_generate", fake_stream)
    monkeypatch.setattr(llm, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert llm.decode_speed(tiny, [1, 2, 3], new_tokens=5, repeat=3) == 2.0
    with pytest.raises(llm.InvalidArgumentError, match="at least 2"):
        llm.decode_speed(tiny, [1, 2, 3], new_tokens=1)


# ----------------------------------------------------------------------------- AWQ
def test_awq_scales_never_lose_to_rtn_on_their_objective(llm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 30  # an outlier channel
    weights = [torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)]
    s, alpha, errors = llm.awq_search_scales(x, weights, 4, 16, grid=10)
    assert errors[0] == min(errors[0], *errors) or min(errors) <= errors[0]
    assert min(errors) < errors[0]  # with an outlier channel, scaling helps
    assert errors[round(alpha * 10)] == min(errors) and s.shape == (64,)


def test_awq_clip_never_loses_to_no_clipping(llm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 72, generator=g)  # 72 = 4 groups of 16 and a partial group of 8
    w = torch.randn(24, 72, generator=g)
    w[:, 5] *= 8  # a few large weights stretch their groups' grids
    clipped = llm.awq_search_clip(x, w, 4, 16, n_tokens=300)
    assert clipped.shape == w.shape and (clipped.abs() <= w.abs() + 1e-7).all()
    assert not torch.equal(clipped, w)  # some group chose to clip

    def group_errors(v):  # the objective, per (row, group): that group's share of the output error
        q = llm.quantize_groupwise(v, 4, 16).dequantize()
        return torch.stack([((x[:, k:k + 16] @ (q[:, k:k + 16] - w[:, k:k + 16]).T) ** 2).mean(0)
                            for k in range(0, 72, 16)], 1)

    assert (group_errors(clipped) <= group_errors(w) * (1 + 1e-5) + 1e-6).all()
    assert group_errors(clipped).sum() < group_errors(w).sum()


def test_awq_folding_leaves_the_model_unchanged(llm, tiny):
    calib = torch.randint(0, tiny.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    scaled, chosen = llm.awq_scale_model(tiny, calib, 4, 16, grid=5, show_progress=False)
    tokens = torch.randint(0, tiny.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(scaled.forward_batch(tokens), tiny.forward_batch(tokens), atol=1e-4, rtol=1e-4)
    assert torch.equal(scaled.embed.weight, tiny.embed.weight)  # the embedding is not rescaled
    assert len(chosen) == tiny.cfg.n_layers


def test_awq_reads_only_the_first_max_tokens_windows(llm, tiny):
    """Windows do not attend to each other, so the search runs the blocks on the first
    max_tokens (whole windows) alone: what comes after them changes nothing."""
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(0, tiny.cfg.vocab_size, (4, 32), generator=g)
    other = torch.cat([calib[:2], torch.randint(0, tiny.cfg.vocab_size, (2, 32), generator=g)])
    a, chosen_a = llm.awq_scale_model(tiny, calib, 4, 16, grid=5, max_tokens=64, show_progress=False)
    b, chosen_b = llm.awq_scale_model(tiny, other, 4, 16, grid=5, max_tokens=64, show_progress=False)
    assert chosen_a == chosen_b
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    c, _ = llm.awq_scale_model(tiny, calib, 4, 16, grid=5, max_tokens=128, show_progress=False)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


# ----------------------------------------------------------------------------- the real model
def test_int4_g32_reproduces_q4_1_weights(llm, smollm2_gguf):
    """SmolLM2's weights are dequantized Q4_1 (d·q + m in blocks of 32, fp16 d and m): INT4 with
    groups of 32 and an fp16 min-max grid lands on the same values."""
    net, _ = llm.get_model(smollm2_gguf)
    gguf = llm.read_gguf(smollm2_gguf)
    q4_1 = [n for n, t in gguf.tensors.items() if t.ggml_type == llm.GGMLType.Q4_1 and "attn_q" not in n
            and "attn_k" not in n][:3]
    assert q4_1
    for name in q4_1:
        w = torch.from_numpy(gguf.dequantize(name))
        back = llm.quantize_groupwise(w, 4, 32).dequantize()
        assert (back - w).abs().max() <= 1e-3 * w.abs().max()
        assert (back == w).float().mean() > 0.99


def test_demo_on_tiny_model(llm):
    report = llm.demonstrate_quantization(model="tiny", quick=True)
    table = {r["scheme"]: r for r in report["schemes"]}
    assert table["fp32"]["bits/weight"] == 32
    assert table["INT4 RTN g128"]["bits/weight"] < table["INT8 per channel"]["bits/weight"] < 9
    assert table["INT8 per channel"]["weight SQNR (dB)"] > table["INT4 RTN g128"]["weight SQNR (dB)"]
    assert all(r["perplexity"] > 1 for r in report["schemes"])
    assert all("decode (tok/s)" not in r for r in report["schemes"])  # quick skips compiling the kernels
    assert report["outliers"] and all(r["max |x|"] >= r["median channel max |x|"] for r in report["outliers"])


def test_gptq_on_stacked_rows_equals_gptq_per_layer(llm):
    """Layers reading one input (q/k/v, gate/up) share one Hessian; GPTQ treats rows
    independently, so quantizing them stacked gives each layer its own result."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    H = 2 * X.T @ X / len(X)
    a, b = torch.randn(16, 64, generator=g), torch.randn(32, 64, generator=g)
    for act_order in (False, True):
        both, _ = llm.gptq_quantize(torch.cat([a, b]), H, 4, 16, act_order)
        alone = torch.cat([llm.gptq_quantize(w, H, 4, 16, act_order)[0] for w in (a, b)])
        torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)
