"""§2 Memory-bound vs compute-bound: the cost model by hand, the ridge, microbenchmarks, rows.

Hand-worked numbers use the `tiny` preset: V=260, d=64, L=2, H=4, Hkv=2, D=16, ffn=128, tied.
  per layer matmul weights: wq, wo 64·64 each + wk, wv 64·32 each + MLP 3·64·128 = 36,864
  matmul weights: 2 · 36,864 (layers) + 260 · 64 (LM head) = 73,728 + 16,640 = 90,368
  KV bytes per token in fp16: 2 · L · Hkv · D · 2 = 2·2·2·16·2 = 256
  attention FLOPs per (query, key) pair: 4 · L · H · D = 4·2·4·16 = 512
No assertion here depends on timing.
"""


import pytest
import torch

MATMUL, LAYERS, HEAD, KV_FP16, ATTN_PAIR = 90_368, 73_728, 16_640, 256, 512


def test_matmul_params_by_hand(llm):
    cfg = llm.ModelConfig.from_name("tiny")
    assert llm.matmul_params(cfg) == MATMUL == LAYERS + HEAD
    # n_params differs only by the norms (2 per layer + the final one): the head is tied.
    assert cfg.n_params - llm.matmul_params(cfg) == 2 * 2 * 64 + 64
    assert cfg.kv_bytes_per_token(2) == KV_FP16


def test_decode_batch1_fp16_is_one_flop_per_byte(llm):
    r = llm.prefill_decode_intensity("tiny", batch_size=1, context_len=0, new_tokens=1)
    # Each fp16 weight (2 bytes) does one multiply-add (2 FLOPs): 180,736 FLOPs on 180,736 bytes.
    assert r["linear_flops"] == 2 * MATMUL == r["weight_bytes"] == 180_736
    # One (query, key) pair: 512 FLOPs; K/V of the one token written (256 B) and read (256 B).
    assert r["attn_flops"] == ATTN_PAIR
    assert r["kv_read_bytes"] == r["kv_write_bytes"] == KV_FP16
    assert r["flops"] == r["bytes"] == 181_248 and r["intensity"] == 1.0
    assert r["phase"] == "decode" and r["tokens"] == 1
    # Same for a real model: decode at batch 1 in fp16 is ~1 FLOP/byte whatever its size.
    assert llm.prefill_decode_intensity("llama-2-7b", 1, 0, 1)["intensity"] == pytest.approx(1.0, abs=1e-3)


def test_decode_by_hand_batch4_context127(llm):
    r = llm.prefill_decode_intensity("tiny", 4, 127, 1, bytes_per_param=2)
    assert r["linear_flops"] == 2 * LAYERS * 4 + 2 * HEAD * 4 == 722_944
    assert r["attn_flops"] == ATTN_PAIR * 128 * 4 == 262_144  # each new token sees 128 keys
    assert r["weight_bytes"] == 180_736  # read once, shared by the 4 sequences
    assert r["kv_read_bytes"] == 4 * 128 * KV_FP16 == 131_072
    assert r["kv_write_bytes"] == 4 * KV_FP16
    assert r["intensity"] == pytest.approx(985_088 / 312_832)  # ≈ 3.15 FLOP/byte


def test_prefill_by_hand_fp32(llm):
    r = llm.prefill_decode_intensity("tiny", 1, 0, 8, bytes_per_param=4)
    # Layers on all 8 tokens, LM head on the last one only.
    assert r["linear_flops"] == 2 * LAYERS * 8 + 2 * HEAD == 1_212_928
    # Causal: token i sees i + 1 keys, 1 + 2 + ... + 8 = 36 pairs.
    assert r["attn_flops"] == 36 * ATTN_PAIR
    assert r["weight_bytes"] == MATMUL * 4
    assert r["kv_read_bytes"] == r["kv_write_bytes"] == 8 * 2 * KV_FP16  # fp32: 512 B per token
    assert r["phase"] == "prefill" and r["tokens"] == 8


def test_kv_dtype_changes_only_kv_bytes(llm):
    a = llm.prefill_decode_intensity("tiny", 2, 100, 1, bytes_per_param=2)
    b = llm.prefill_decode_intensity("tiny", 2, 100, 1, bytes_per_param=2, kv_bytes_per_elem=1)
    assert b["weight_bytes"] == a["weight_bytes"] and b["flops"] == a["flops"]
    assert b["kv_read_bytes"] * 2 == a["kv_read_bytes"]


def test_intensity_grows_with_batch_and_prompt_length(llm):
    dec = [llm.prefill_decode_intensity("smollm2-135m", B, 128, 1)["intensity"] for B in (1, 4, 16, 64)]
    pre = [llm.prefill_decode_intensity("smollm2-135m", 1, 0, T)["intensity"] for T in (32, 128, 512)]
    assert dec == sorted(dec) and pre == sorted(pre)
    assert pre[0] > 10 * dec[0]


def test_ridge_batch_by_hand(llm):
    # tiny, context 0, fp16: per sequence f = 181,248 FLOPs and k = 512 KV bytes; W = 180,736.
    # I(B) = B·f / (W + B·k) >= 10  ⇔  B >= 10·180,736 / (181,248 − 5,120) = 10.26  →  11.
    assert llm.decode_ridge_batch("tiny", 0, 10.0) == 11
    intensity = lambda B: llm.prefill_decode_intensity("tiny", B, 0, 1)["intensity"]
    assert intensity(11) >= 10 > intensity(10)


def test_ridge_batch_never_when_kv_reads_dominate(llm):
    # context 511: per sequence f = 180,736 + 512·512 = 442,880 FLOPs, k = 513·256 = 131,328 bytes;
    # 10·k > f, so I(B) < f/k ≈ 3.4 < 10 for every B.
    assert llm.decode_ridge_batch("tiny", 511, 10.0) is None
    assert llm.decode_ridge_batch("tiny", 511, 3.0) is not None


def test_ridge_table_on_published_h100_figures(llm):
    rows = llm.analyze_decode_ridge(contexts=(0, 4096))
    balance = llm.H100_SXM_PEAK_FLOPS / llm.H100_SXM_BANDWIDTH  # ≈ 295 FLOP/byte
    for row in rows:
        # With no cached context the weights dominate and the ridge batch is just above I*.
        assert balance <= row["ridge B @ ctx 0"] <= 1.1 * balance
    by_name = {r["model"]: r for r in rows}
    assert by_name["llama-2-7b"]["ridge B @ ctx 4096"] == "n/a"  # 4096 + 1 > its window
    assert by_name["llama-3-8b"]["ridge B @ ctx 4096"] == "never"


@pytest.mark.parametrize("args, error", [
    ((0, 0, 1), "InvalidArgumentError"),
    ((1, -1, 1), "InvalidArgumentError"),
    ((1, 0, 0), "InvalidArgumentError"),
    ((1, 500, 13), "ContextOverflowError"),  # tiny's window is 512 tokens
])
def test_intensity_bad_inputs(llm, args, error):
    with pytest.raises(getattr(llm, error)):
        llm.prefill_decode_intensity("tiny", *args)


def test_bad_model_and_balance(llm):
    with pytest.raises(llm.ConfigError, match="choose one of"):
        llm.prefill_decode_intensity("gpt-17", 1, 0, 1)
    with pytest.raises(llm.InvalidArgumentError):
        llm.decode_ridge_batch("tiny", 0, 0.0)
    with pytest.raises(llm.InvalidArgumentError):
        llm.measure_matmul_flops("cpu", n=0)
    with pytest.raises(llm.InvalidArgumentError):
        llm.measure_memory_bandwidth("cpu", nbytes=-1)


def test_microbenchmarks_divide_the_work_by_the_best_time(llm, monkeypatch):
    """With the timer stubbed to 0.5 s: 2·n³ FLOPs and 2·nbytes moved, over 0.5 s; best-of (min)."""
    seen = []
    def fake_benchmark(fn, device, repeat, reduce):
        fn()
        seen.append(reduce)
        return 0.5

    monkeypatch.setattr(llm, "benchmark", fake_benchmark)
    assert llm.measure_matmul_flops("cpu", n=64, repeat=2) == 2 * 64**3 / 0.5
    assert llm.measure_memory_bandwidth("cpu", nbytes=1 << 20, repeat=2) == 2 * (1 << 20) / 0.5
    assert llm.measure_memory_bandwidth("cpu", nbytes=1 << 20, repeat=2, kind="read") == (1 << 20) / 0.5
    assert seen == [min, min, min]
    with pytest.raises(llm.InvalidArgumentError, match="'copy' or 'read'"):
        llm.measure_memory_bandwidth("cpu", kind="write")


ROW_KEYS = {"phase", "batch", "tokens", "context", "time (ms)", "tokens/s", "GFLOP/s", "GB/s",
            "FLOP/byte", "% of roof", "bound"}


def test_analyze_prefill_vs_decode_rows(llm):
    peak, bw = 1e11, 1e10  # given, so no microbenchmark runs; balance 10 FLOP/byte
    rows = llm.measure_prefill_vs_decode("tiny", device="cpu", quick=True, peak_flops=peak, bandwidth=bw)
    assert all(set(r) == ROW_KEYS for r in rows)
    pre = [r for r in rows if r["phase"] == "prefill"]
    dec = [r for r in rows if r["phase"] == "decode"]
    assert [r["tokens"] for r in pre] == [32, 128] and [r["batch"] for r in dec] == [1, 8, 32]
    assert all(r["context"] == 129 and r["tokens"] == r["batch"] for r in dec)
    assert [r["FLOP/byte"] for r in dec] == sorted(r["FLOP/byte"] for r in dec)
    for r in rows:
        assert r["time (ms)"] > 0 and r["bound"] == ("memory" if r["FLOP/byte"] < 10 else "compute")
        expected = llm.prefill_decode_intensity("tiny", r["batch"], r["context"] - r["tokens"] // r["batch"],
                                                r["tokens"] // r["batch"], bytes_per_param=4)
        assert r["FLOP/byte"] == pytest.approx(expected["intensity"])


def test_plot_roofline_writes_png(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSON_PLOT_DIR", str(tmp_path))
    rows = [{"phase": "prefill", "batch": 1, "tokens": 64, "FLOP/byte": 30.0, "GFLOP/s": 50.0},
            {"phase": "decode", "batch": 1, "tokens": 1, "context": 129, "FLOP/byte": 0.5, "GFLOP/s": 2.0}]
    plot = llm.plot_roofline(rows, peak_flops=1e11, bandwidth=1e10)
    assert plot.path == tmp_path / "s2_roofline.png" and plot.caption
    assert plot.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demonstrate_prefill_vs_decode_tiny(llm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LESSON_PLOT_DIR", str(tmp_path))
    rows = llm.demonstrate_prefill_vs_decode(seed=0, device="cpu", quick=True, model="tiny")["steps"]
    out = capsys.readouterr().out
    assert "machine balance" in out and "Takeaway" in out
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    assert (tmp_path / "s2_roofline.png").exists()


@pytest.mark.parametrize("B, context, new", [(2, 100, 1), (1, 0, 64)])
def test_flop_model_matches_torch_flop_counter(llm, B, context, new):
    """The cost model's matmul FLOPs equal what torch's FlopCounterMode counts in a real forward
    step on SmolLM2's shapes (random weights); its attention FLOPs equal the count of the naive
    attention (the CPU fused kernel is not counted by FlopCounterMode, so we count the reference)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = llm.build_model("smollm2-135m", device="cpu")
    cache = llm.ContiguousKVCache(net.cfg, B, context + new)
    positions, meta = cache.metadata_at(range(B), [context] * B, [new] * B)
    tokens = torch.zeros(B * new, dtype=torch.long)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(tokens, positions, meta, cache, logits_at=meta.last_token_indices)
    est = llm.prefill_decode_intensity(net.cfg, B, context, new, bytes_per_param=4)
    assert counter.get_total_flops() == est["linear_flops"]
    if new == 1:  # decode: no masked-out pairs, so the naive kernel does exactly the useful work
        cfg = net.cfg
        q = torch.zeros(1, cfg.n_heads, cfg.head_dim)
        kv = torch.zeros(context + 1, cfg.n_kv_heads, cfg.head_dim)
        with FlopCounterMode(display=False) as attn:
            llm.naive_attention(q, kv, kv)
        assert attn.get_total_flops() * cfg.n_layers * B == est["attn_flops"]


def test_machine_bandwidth_is_measured_once_per_device(llm, monkeypatch):
    calls = []
    monkeypatch.setattr(llm, "_BANDWIDTH", {})
    monkeypatch.setattr(llm, "measure_memory_bandwidth",
                        lambda device, kind: calls.append(kind) or 7e9 * len(calls))
    assert llm.machine_bandwidth("cpu") == llm.machine_bandwidth("cpu") == 7e9  # measured once, reused
    assert llm.machine_bandwidth("cpu", "copy") == 14e9 and calls == ["read", "copy"]  # one per kind
    assert llm.machine_bandwidth("cpu", refresh=True) == 21e9 and len(calls) == 3
