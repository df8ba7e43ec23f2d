"""§7 Flash-decoding: every decode-attention variant (online softmax, PyTorch split-K, paged, and
the Triton kernels) equals the naive reference for random shapes, split counts (more splits than
tokens too), lengths, GQA ratios and fp16-overflowing logits; the merge is associative; the paged
variants equal the contiguous ones through shuffled block tables.

The Triton kernels run on a GPU when there is one, else through Triton's CPU interpreter
(TRITON_INTERPRET=1, set here before the kernels are first built), else they are skipped."""

import pytest
import torch
from conftest import lesson_with_triton, sharp_tiny

_, DEVICE, needs_triton = lesson_with_triton()


def random_case(seed, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    B, Hkv, group = pick(1, 2, 3), pick(1, 2, 4), pick(1, 3, 4, 8)
    T, D = pick(1, 5, 64, 130, 257), pick(16, 32, 64)
    q = torch.randn(B, Hkv * group, D, generator=g) * scale
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    splits = pick(1, 2, 3, 7, T + 3)  # more splits than tokens leaves some empty
    return [x.to(device, dtype) for x in (q, k, v)], lens, splits


@pytest.mark.parametrize("seed", range(30))
def test_pytorch_variants_equal_naive_fp32(llm, seed):
    (q, k, v), lens, splits = random_case(seed)
    ref = llm.naive_decode_attention(q.double(), k.double(), v.double(), lens).float()
    assert torch.allclose(llm.naive_decode_attention(q, k, v, lens), ref, atol=1e-5)
    assert torch.allclose(llm.online_softmax_decode_attention(q, k, v, lens, block=16), ref, atol=1e-5)
    assert torch.allclose(llm.flash_decode(q, k, v, lens, splits), ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_logits_that_overflow_exp(llm, dtype):
    """q scaled so that scores reach ±60: exp(60) overflows fp16 (max ≈ e^11). Each variant
    upcasts to fp32 internally, so the only error left is the output's rounding to `dtype`."""
    (q, k, v), lens, _ = random_case(3, dtype, scale=8.0)
    ref = llm.naive_decode_attention(q.double(), k.double(), v.double(), lens)
    tol = 2 * torch.finfo(dtype).eps * ref.abs().max().item()
    for out in (llm.naive_decode_attention(q, k, v, lens), llm.online_softmax_decode_attention(q, k, v, lens),
                llm.flash_decode(q, k, v, lens, 5)):
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.double() - ref).abs().max().item() <= tol


def test_merge_is_associative(llm):
    g = torch.Generator().manual_seed(0)
    o, lse = torch.randn(2, 3, 6, 8, generator=g), torch.randn(2, 3, 6, generator=g) * 5
    lse[0, 0, 2] = float("-inf")  # an empty split
    whole, whole_lse = llm.merge_partials(o, lse)
    for cut in (1, 2, 4):
        a, la = llm.merge_partials(o[..., :cut, :], lse[..., :cut])
        b, lb = llm.merge_partials(o[..., cut:, :], lse[..., cut:])
        two, two_lse = llm.merge_partials(torch.stack([a, b], -2), torch.stack([la, lb], -1))
        assert torch.allclose(two, whole, atol=1e-5) and torch.allclose(two_lse, whole_lse, atol=1e-5)
    perm = torch.randperm(6, generator=g)
    assert torch.allclose(llm.merge_partials(o[..., perm, :], lse[..., perm])[0], whole, atol=1e-5)


def test_merge_equals_softmax_over_all_keys(llm):
    """lse of the merged partials is the log-sum-exp of all scores (checked against the naive pass)."""
    (q, k, v), lens, _ = random_case(5)
    o, lse = llm.split_attention(q, k, v, lens, num_splits=4)
    B, H, D = q.shape
    scores = (q.view(B, k.shape[1], -1, D).double() @ k.double().transpose(-1, -2)).view(B, H, -1) * D**-0.5
    scores = scores.masked_fill(torch.arange(k.shape[2]) >= lens.view(B, 1, 1), float("-inf"))
    assert torch.allclose(llm.merge_partials(o, lse)[1].double(), torch.logsumexp(scores, -1), atol=1e-5)


def scatter_to_blocks(k, v, block_size, seed):
    """Write contiguous (B, Hkv, T, D) K/V into a paged cache through a shuffled block table."""
    B, Hkv, T, D = k.shape
    nb = -(-T // block_size)
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(B * nb + 3, generator=g)[:B * nb].view(B, nb)
    kc = torch.zeros(B * nb + 3, block_size, Hkv, D, dtype=k.dtype)
    vc = torch.zeros_like(kc)
    for b in range(B):
        for j in range(nb):
            rows = k[b, :, j * block_size:(j + 1) * block_size].transpose(0, 1)
            kc[table[b, j], :len(rows)] = rows
            vc[table[b, j], :len(rows)] = v[b, :, j * block_size:(j + 1) * block_size].transpose(0, 1)
    table = torch.cat([table, torch.full((B, 2), -1)], 1)  # padded like §4's tables
    return kc.to(k.device), vc.to(k.device), table.to(k.device)


@pytest.mark.parametrize("seed", range(10))
def test_paged_equals_contiguous_through_shuffled_tables(llm, seed):
    (q, k, v), lens, splits = random_case(seed)
    kc, vc, table = scatter_to_blocks(k, v, block_size=(4, 16)[seed % 2], seed=seed)
    assert torch.allclose(llm.paged_flash_decode(q, kc, vc, table, lens, splits),
                          llm.flash_decode(q, k, v, lens, splits), atol=1e-5)


@needs_triton
@pytest.mark.parametrize("seed", [0, 1, 4, 7])
def test_triton_kernels_equal_naive(llm, seed):
    (q, k, v), lens, splits = random_case(seed, device=DEVICE)
    ref = llm.naive_decode_attention(q.double(), k.double(), v.double(), lens)
    for fused in (True, False):  # the merge inside the split kernel, or as its own kernel
        out = llm.triton_flash_decode(q, k, v, lens, num_splits=min(splits, 9), block_n=16, fused=fused)
        assert (out.double() - ref).abs().max().item() < 1e-4
    kc, vc, table = scatter_to_blocks(k.cpu(), v.cpu(), block_size=(4, 16)[seed % 2], seed=seed)
    paged = llm.triton_paged_flash_decode(q, kc.to(DEVICE), vc.to(DEVICE), table.to(DEVICE), lens,
                                          num_splits=min(splits, 9), block_n=16)
    assert (paged.double() - ref).abs().max().item() < 1e-4


@needs_triton
@pytest.mark.skipif(DEVICE == "cpu", reason="Triton's CPU interpreter gets tl.dot wrong on bf16 (3.9)")
def test_triton_default_splits_and_bf16(llm):
    (q, k, v), lens, _ = random_case(11, torch.bfloat16, device=DEVICE, scale=8.0)
    ref = llm.naive_decode_attention(q.double(), k.double(), v.double(), lens)
    out = llm.triton_flash_decode(q, k, v, lens)
    assert out.dtype == torch.bfloat16
    tol = 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol


@needs_triton
def test_triton_operator_inside_torch_compile(llm):
    """The fused Triton kernel as a PyTorch operator (what §9's static step calls on a GPU): equal
    to the naive reference alone and inside a compiled function, lengths given as int32 tensors."""
    (q, k, v), lens, _ = random_case(4, device=DEVICE)
    ref = llm.naive_decode_attention(q.double(), k.double(), v.double(), lens)
    op = llm.flash_decode_operator()
    lens32 = lens.to(DEVICE, torch.int32)
    assert (op(q, k, v, lens32).double() - ref).abs().max().item() < 1e-4
    try:
        compiled = torch.compile(lambda q, k, v, n: op(q * 1.0, k, v, n) + 0.0, dynamic=False)
        out = compiled(q, k, v, lens32)
    except Exception as exc:  # no C++ compiler here
        pytest.skip(f"torch.compile cannot build on this machine: {type(exc).__name__}")
    assert (out.double() - ref).abs().max().item() < 1e-4


@needs_triton
def test_static_decoder_with_split_k_attention(llm):
    """§9's static step with §7's operator for attention (on by default on a GPU; switched on here
    for Triton's CPU interpreter) gives the tokens of the SDPA step: its lengths are positions + 1."""
    model = llm.build_model("tiny", seed=2, device=DEVICE)
    prompts = [[5, 17, 99, 3, 8, 1], [42], list(range(30, 52))]
    outs = []
    for op in (None, llm.flash_decode_operator()):
        dec = llm.StaticDecoder(model, 4, 40)
        dec.attention_op = op
        outs.append(dec.generate(prompts, 8))
    assert outs[0] == outs[1] == [llm.generate(model, p, 8, cuda_graphs=False) for p in prompts]


def test_engine_decodes_with_split_k_attention(llm):
    """§5's engine with the paged cache's decode steps done by §7's split-K attention (the
    Triton kernel on a GPU, PyTorch's elsewhere) gives the tokens plain generation gives."""
    model = llm.build_model("tiny", seed=0, device=DEVICE)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9] * 3, [4, 5], list(range(40))]
    engine = llm.LLMEngine(model, max_num_seqs=3, block_size=4)
    on_gpu = DEVICE == "cuda" and llm.triton_available()
    engine.cache.decode_attention = llm.triton_paged_flash_decode if on_gpu else llm.paged_flash_decode
    outs = engine.generate(prompts, [llm.SamplingParams(max_tokens=10)] * 3)
    assert [o.token_ids for o in outs] == [llm.generate(model, p, 10) for p in prompts]


def test_cost_model_counts(llm):
    rows = llm.analyze_flash_decoding(batch=2, heads=32, kv_heads=8, context=1000, head_dim=128, sms=100,
                                      splits=(1, 10))
    one, ten = rows
    assert one["thread blocks"] == 16 and ten["thread blocks"] == 160
    assert one["SMs busy %"] == 16 and ten["SMs busy %"] == 100
    assert one["KV read (MB)"] == 2 * 2 * 8 * 1000 * 128 * 2 / 1e6 and one["partials (MB)"] == 0
    assert ten["time at roof (µs)"] < one["time at roof (µs)"] / 5


def test_bad_input_gets_named_errors(llm):
    q, k = torch.randn(2, 8, 16), torch.randn(2, 3, 10, 16)
    with pytest.raises(llm.InvalidArgumentError, match="multiple of Hkv"):
        llm.flash_decode(q, k, k)
    k = torch.randn(2, 2, 10, 16)
    with pytest.raises(llm.InvalidArgumentError, match="context_lens"):
        llm.flash_decode(q, k, k, [0, 5])
    with pytest.raises(llm.InvalidArgumentError, match="context_lens"):
        llm.naive_decode_attention(q, k, k, [11, 5])
    with pytest.raises(llm.InvalidArgumentError, match="num_splits"):
        llm.flash_decode(q, k, k, None, 0)
    with pytest.raises(llm.InvalidArgumentError, match="q \\(B, H, D\\)"):
        llm.flash_decode(q[0], k, k)


def test_demo_on_cpu(llm):
    report = llm.demonstrate_flash_decoding(device="cpu", quick=True, plots=False)
    assert all(err < 1e-2 for row in report["errors"] for key, err in row.items() if key.endswith("err"))
    methods = {r["method"] for r in report["timing"]}
    assert {"naive", "PyTorch SDPA", "split-K (PyTorch, 8 splits)"} <= methods
    assert all(r["time (µs)"] > 0 and r["GB/s"] > 0 for r in report["timing"])


PAGED_DECODERS = {"paged_flash_decode": lambda llm: llm.paged_flash_decode,
                  "triton_paged_flash_decode": lambda llm: pytest.skip("triton is not installed")
                  if not llm.triton_available() else llm.triton_paged_flash_decode}


@pytest.mark.parametrize("name", PAGED_DECODERS)
def test_paged_decode_with_strided_cache(llm, name):
    """A cache whose rows of D are not contiguous in memory (stride(-1) != 1) gives the answer
    of the contiguous cache: the Triton kernel copies it contiguous first."""
    fn = PAGED_DECODERS[name](llm)
    (q, k, v), lens, _ = random_case(3, device=DEVICE)  # B=2, 4 KV heads, lengths 64 and 39
    kc, vc, table = scatter_to_blocks(k.cpu(), v.cpu(), block_size=4, seed=3)
    strided = [x.transpose(-1, -2).contiguous().transpose(-1, -2).to(DEVICE) for x in (kc, vc)]
    assert strided[0].stride(-1) != 1 and torch.equal(strided[0].cpu(), kc)
    ref = llm.naive_decode_attention(q.double(), k.double(), v.double(), lens)
    out = fn(q, *strided, table.to(DEVICE), lens)
    assert (out.double() - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", PAGED_DECODERS)
def test_paged_decode_refuses_tables_it_cannot_read(llm, name):
    """Fewer table rows than the batch (also with lengths on the GPU, which are not read), a
    context longer than the table holds, or a block id outside the cache where a context reads:
    named errors, not an out-of-bounds read."""
    fn = PAGED_DECODERS[name](llm)
    (q, k, v), lens, _ = random_case(6, device=DEVICE)  # B=3, lengths 64, 25, 33
    kc, vc, table = scatter_to_blocks(k.cpu(), v.cpu(), block_size=4, seed=6)
    kc, vc = kc.to(DEVICE), vc.to(DEVICE)
    capacity = table.shape[1] * 4
    with pytest.raises(llm.InvalidArgumentError, match="rows for 3 sequences"):
        fn(q, kc, vc, table[:2].to(DEVICE), lens)
    if DEVICE == "cuda" and name.startswith("triton"):
        with pytest.raises(llm.InvalidArgumentError, match="rows for 3 sequences"):
            fn(q, kc, vc, table[:2].to(DEVICE), lens.to(DEVICE, torch.int32))
    too_long = lens.clone()
    too_long[1] = capacity + 1
    with pytest.raises(llm.InvalidArgumentError, match="holds"):
        fn(q, kc, vc, table.to(DEVICE), too_long)
    holey = table.clone()
    holey[0, 0] = kc.shape[0]
    if DEVICE == "cpu":  # ids are checked in tables on the CPU (on a GPU, reading them would wait)
        with pytest.raises(llm.InvalidArgumentError, match="outside the cache"):
            fn(q, kc, vc, holey, lens)


@needs_triton
def test_static_verify_attention_through_the_decode_kernel(llm):
    """A verify step's attention through §7's kernel (as on a GPU: each of the L rows is a sequence
    ending at its own position, all over the same cache row, with no copy) gives the masked fp32
    path's logits, picks and acceptance count."""
    model = sharp_tiny(llm, 0, DEVICE)
    prompt, drafted = [3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8]
    n = len(prompt) - 1
    outs = []
    for op in (None, llm.flash_decode_operator()):
        dec = llm.StaticDecoder(model, 1, 48, "eager")
        dec.attention_op = op
        dec._prefill([prompt[:-1]])
        values = [prompt[-1]] + drafted + [0, n, len(drafted)]  # one padded row past the drafts
        outs.append(llm.static_verify_step(dec, torch.tensor(values, device=DEVICE)))
    (head_ref, logits_ref), (head, logits) = outs
    torch.testing.assert_close(logits, logits_ref, atol=2e-4, rtol=2e-4)
    assert head.tolist() == head_ref.tolist()
