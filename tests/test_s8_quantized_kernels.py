"""§8 on a GPU (Appendix D): the W8A16 and W4A16 Triton kernels equal dequantize-then-`F.linear`
for group sizes that divide the row and that do not, odd N and K, 1 to 32 rows of x, in fp32 and
bf16 (one row only, through the interpreter), for several launch configurations; bad input gets
a named error.

The kernels run on a GPU when there is one, else through Triton's CPU interpreter
(TRITON_INTERPRET=1, set here before the kernels are first built), else they are skipped."""

import pytest
import torch
from conftest import lesson_with_triton

_, DEVICE, needs_triton = lesson_with_triton()


def quantized(llm, bits, group, N, K, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    qw = llm.quantize_int8(w) if bits == 8 else llm.quantize_groupwise(w, bits, group)
    return llm.dataclasses.replace(qw, codes=qw.codes.to(DEVICE), scales=qw.scales.to(DEVICE),
                                   offsets=None if qw.offsets is None else qw.offsets.to(DEVICE))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 128), (4, 48), (3, 64)])
@pytest.mark.parametrize("N,K", [(37, 301), (64, 256)])
def test_quant_kernels_equal_dequantize_then_linear(llm, bits, group, N, K, dtype):
    """Every row count class (one row: elementwise; 3, 8, 32 rows: tl.dot), the first two launch
    configurations of each INT4 tiling (columns; whole groups where G/2 is a power of two; the
    first one on a GPU, where each is a compile) plus its widest tile: to 1e-5 of the output's scale in fp32,
    and in bf16 to the rounding of x and of the tile (w rounded to bf16 before tl.dot) and the output."""
    qw = quantized(llm, bits, group, N, K, seed=N + K + bits)
    w = qw.dequantize().double()
    for M in (1, 3, 8, 32):
        if DEVICE == "cpu" and dtype == torch.bfloat16 and M > 1:
            continue  # Triton's CPU interpreter returns garbage for a bf16 tl.dot; the GPU run checks it
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE, dtype)
        ref = torch.nn.functional.linear(x.double(), w)
        tol = (1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps) * ref.abs().max().item()
        kind = "vec" if M == 1 else "dot"
        key = llm.quant_tuning_key(x, N, K, bits, qw.group_size)
        picks, first = [], 1 if DEVICE == "cuda" else 2  # on a GPU each configuration is a compile
        for tiles in ("columns", "groups"):  # whole-group tiles apply where G/2 is a power of two
            own = [c for c in llm.quant_configs(kind, bits, qw.group_size) if c[4] == tiles]
            picks += own[:first] + [max(own, key=lambda c: c[1])] if own else []
        assert len(picks) == (first + 1) * (2 if bits < 8 and group in (32, 64, 128) else 1)
        try:
            for cfg in picks:
                llm.QUANT_TUNED[key] = cfg
                tuned = dict(llm.QUANT_TUNED)
                out = llm.triton_quant_matmul(x, qw.codes, qw.scales, qw.offsets, bits, qw.group_size, K)
                assert llm.QUANT_TUNED == tuned  # the call ran the forced configuration, tuned nothing
                assert out.shape == (M, N) and out.dtype == dtype
                assert (out.double() - ref).abs().max().item() < tol, (M, cfg)
        finally:
            llm.QUANT_TUNED.pop(key, None)


@needs_triton
def test_quant_kernel_rejects_bad_input(llm):
    qw = quantized(llm, 4, 32, 16, 64, seed=0)
    args = (qw.codes, qw.scales, qw.offsets, 4, 32, 64)
    with pytest.raises(llm.InvalidArgumentError, match="M ≤ 32"):
        llm.triton_quant_matmul(torch.randn(33, 64, device=DEVICE), *args)
    with pytest.raises(llm.InvalidArgumentError, match="64"):
        llm.triton_quant_matmul(torch.randn(1, 63, device=DEVICE), *args)


def test_a_variant_that_does_not_build_is_left_out_of_tuning(llm):
    """Tuning launches each configuration once first: a whole-group variant that this GPU's Triton
    cannot build is skipped with a warning; a failure of the general kernel is raised."""
    def launch(cfg):
        raise RuntimeError("no such layout")

    groups = next(c for c in llm.QUANT_CONFIGS["vec"] if c[4] == "groups")
    columns = next(c for c in llm.QUANT_CONFIGS["vec"] if c[4] == "columns")
    with pytest.warns(UserWarning, match="does not build here"):
        assert llm._compiles(launch, groups) is False
    with pytest.raises(RuntimeError, match="no such layout"):
        llm._compiles(launch, columns)
    with pytest.warns(UserWarning, match="does not build here"):  # a folded variant falls back instead
        assert llm._compiles(launch, columns, required=False) is False
    assert llm._compiles(lambda cfg: None, groups) is True
    assert all(c[4] == "columns" for c in llm.quant_configs("vec", 4, 48) + llm.quant_configs("dot", 8, 128))


@needs_triton
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 128), (4, 48)])
@pytest.mark.parametrize("N,K", [(38, 301), (64, 256)])
def test_folded_norm_swiglu_residual_equal_the_unfolded_step(llm, bits, group, N, K):
    """One row of x with the step's neighbours folded into the kernel (whole-group INT4 and INT8;
    INT4 groups whose half is no power of two apply them in torch around the kernel): equal to
    rms_norm, then the product, then silu(gate) · up, then + residual, to 1e-5 of the output's scale."""
    qw = quantized(llm, bits, group, N, K, seed=N + K)
    w = qw.dequantize().double()
    g = torch.Generator().manual_seed(K)
    x = torch.randn(1, K, generator=g).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(K, generator=g)).to(DEVICE)
    for norm, swiglu, residual in [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, False)]:
        h = llm.rms_norm(x.double(), weight.double(), 1e-5) if norm else x.double()
        ref = torch.nn.functional.linear(h, w)
        if swiglu:
            gate, up = ref.chunk(2, dim=-1)
            ref = torch.nn.functional.silu(gate) * up
        res = torch.randn(ref.shape, generator=g).to(DEVICE) if residual else None
        ref = ref + res.double() if residual else ref
        key_folds = (norm, swiglu, residual)
        key = llm.quant_tuning_key(x, N, K, bits, qw.group_size, key_folds)
        configs = [c for c in llm.quant_configs("vec", bits, qw.group_size) if bits == 8 or c[4] == "groups"]
        picks = (configs[:1] + [max(configs, key=lambda c: c[1])]) if configs else []
        try:
            for cfg in picks + [None]:  # None: as when no folded variant builds (the unfolded path)
                llm.QUANT_TUNED[key] = cfg
                tuned = dict(llm.QUANT_TUNED)
                out = llm.triton_quant_matmul(x, qw.codes, qw.scales, qw.offsets, bits, qw.group_size, K,
                                              weight if norm else None, 1e-5, res, swiglu)
                assert cfg is None or llm.QUANT_TUNED == tuned  # the forced configuration ran
                assert out.shape == ref.shape
                err = (out.double() - ref).abs().max().item()
                assert err < 1e-5 * ref.abs().max().item(), (key_folds, cfg)
        finally:
            llm.QUANT_TUNED.pop(key, None)
    with pytest.raises(llm.InvalidArgumentError, match="one row"):
        llm.triton_quant_matmul(torch.randn(2, K, device=DEVICE), qw.codes, qw.scales, qw.offsets, bits,
                                qw.group_size, K, weight, 1e-5, None, False)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_static_step_folds_the_neighbours_of_quantized_layers(llm, bits, monkeypatch):
    """§9's static step at batch 1 with a quantized model: with the folds (norms, SiLU·up and
    residual adds inside the kernels, q/k/v and gate/up stacked) the logits equal the same model's
    on the reference path, dequantize then F.linear (fp32, 1e-4 of their scale). On a CPU the
    kernels run in Triton's interpreter."""
    base = llm.build_model("tiny", seed=3)
    reference = llm.quantize_model(base, llm.rtn_quantizer(bits, 32), fast=False).to(DEVICE)
    model = llm.quantize_model(base, llm.rtn_quantizer(bits, 32)).to(DEVICE)
    tokens, positions = torch.tensor([7], device=DEVICE), torch.tensor([0], device=DEVICE)
    with torch.inference_mode():
        unfolded = llm.StaticDecoder(reference, 1, 16, "eager").step_eager(tokens, positions)
        dec = llm.StaticDecoder(model, 1, 16, "eager")
        monkeypatch.setattr(llm, "_quant_kernel_applies",
                            lambda m, x: isinstance(m, llm.QuantizedLinear) and m.fast and x.shape[0] == 1)
        dec.matvec_op = lambda x, w, norm, eps, residual, swiglu: llm.triton_matvec(x, w, norm, eps, residual,
                                                                                   swiglu)
        dec.fused = [(llm.stack_quantized([layer.attn.wq, layer.attn.wk, layer.attn.wv]),
                      llm.stack_quantized([layer.mlp.w_gate, layer.mlp.w_up])) for layer in model.layers]
        calls = []
        kernel = llm.triton_quant_matmul
        monkeypatch.setattr(llm, "triton_quant_matmul", lambda *a: calls.append(a[7:]) or kernel(*a))
        folded = dec.step_eager(tokens, positions)
    assert {(n is not None, swiglu, r is not None) for n, _, r, swiglu in calls} >= {
        (True, False, False), (True, True, False), (False, False, True)}  # norm, SiLU·up, residual folded
    assert (folded - unfolded).abs().max().item() < 1e-4 * unfolded.abs().max().item()
