"""Decode on a GPU: eager PyTorch vs the same static step replayed from a CUDA graph (vs compiled), and
HF transformers' `generate`, on SmolLM2-135M and LLaMA-2-7B shapes (random bf16 weights: speed does not
depend on the values), one table.

    python benchmarks/bench_gpu_decode.py [--batches 1 8 32 128] [--new-tokens 128] [--prompt 128]

tok/s = B · new tokens / wall time of the whole generation (prefill included), greedy, no early stop;
with --repeat R, the median of R timings (the range beside it).
The bandwidth limit at batch 1 is (weight bytes) / (measured device copy bandwidth, read + write
counted) tokens/s.
"""

import argparse
import functools
import statistics
import time

import torch
from _common import load_lesson


def random_model(llm, name):
    """Our Transformer with the preset's shapes, initialized on the GPU (fast), in bf16."""
    cfg = llm.ModelConfig.from_name(name)
    with torch.device("cuda"):
        model = llm.Transformer(cfg)
    return model.to(torch.bfloat16).eval(), cfg


def hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                     rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                     tie_word_embeddings=cfg.tie_embeddings)
    with torch.device("cuda"):
        return LlamaForCausalLM(hc).to(torch.bfloat16).eval()


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _static(llm, model, prompts, mode, k):
    return llm.static_generate(model, prompts, k, mode)


def _hf_generate(hf, ids, k):
    with torch.inference_mode():
        out = hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def _kv_gib(cfg, tokens):
    return 1.2 * tokens * cfg.kv_bytes_per_token(2) / 2**30 + 0.1


def _engine(llm, model, cfg, step, max_num_seqs, kv_tokens):
    """A §5 engine with its CUDA graphs (if any) captured before timing; no prefix caching, since a
    warm-up would leave the prompts cached."""
    engine = llm.LLMEngine(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                           enable_prefix_caching=False, decode_step=step,
                           kv_cache_gib=_kv_gib(cfg, kv_tokens))
    if engine.decode_runner is not None:
        engine.decode_runner.capture_all()
    return engine


def _engine_runner(llm, model, prompts, step, cfg):
    """The §5 engine over all prompts at once; one engine per configuration, so graphs are captured once."""
    engine = _engine(llm, model, cfg, step, len(prompts), sum(len(p) for p in prompts) + 256 * len(prompts))

    def run(k):
        return [o.token_ids for o in engine.generate(prompts, llm.SamplingParams(max_tokens=k))]
    return run


def bench_serving(llm, name, args):
    """`args.serving` requests with prompts of 32–256 tokens, each making `args.new_tokens`, through the
    §5 engine (packed decode steps, then CUDA graphs) and HF's continuous batching (`generate_batch`)."""
    model, cfg = random_model(llm, name)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(32, 257, (args.serving,), generator=g).tolist()
    prompts = [torch.randint(0, cfg.vocab_size, (L,), generator=g).tolist() for L in lens]
    n, rows = args.new_tokens, []
    runs = {}
    for step in ("packed", "graph"):
        engine = _engine(llm, model, cfg, step, args.max_num_seqs, args.max_num_seqs * (256 + n))
        engine.generate(prompts[:4], llm.SamplingParams(max_tokens=2))  # warm-up
        runs[f"ours §5 engine, {step} decode steps"] = \
            lambda e=engine: e.generate(prompts, llm.SamplingParams(max_tokens=n))
    if not args.no_hf:
        from transformers import GenerationConfig

        hf = hf_model(cfg)
        gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        runs["HF generate_batch (continuous batching)"] = \
            lambda: hf.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    for label, run in runs.items():
        try:
            _, sec = timed(run)
        except Exception as exc:
            rows.append({"model": name, "requests": len(prompts), "method": label, "tok/s": float("nan"),
                         "note": f"{type(exc).__name__}: {str(exc)[:60]}"})
            continue
        rows.append({"model": name, "requests": len(prompts), "method": label,
                     "tok/s": len(prompts) * n / sec, "note": ""})
        print(rows[-1], flush=True)
    return rows


def bench_model(llm, name, args, bw):
    """Rows for one model's shapes: every method at every batch size."""
    model, cfg = random_model(llm, name)
    weight_bytes = model.param_bytes
    limit, n, rows = bw / weight_bytes, args.new_tokens, []
    hf = None if args.no_hf else hf_model(cfg)
    for B in args.batches:
        g = torch.Generator().manual_seed(B)
        prompts = [torch.randint(0, cfg.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(B)]
        runs = {} if args.no_baseline else \
            {"ours eager (§1 batched_generate)": lambda k, p=prompts: llm.batched_generate(model, p, k)[0]}
        modes = args.modes + (["compile+graph"] if args.compile and "compile+graph" not in args.modes else [])
        for mode in modes:
            runs[f"ours static step, {mode}"] = functools.partial(_static, llm, model, prompts, mode)
        if args.engine:
            for step in ("packed", "graph"):
                runs[f"ours §5 engine, {step} decode steps"] = _engine_runner(llm, model, prompts, step, cfg)
        if hf is not None:
            runs["HF generate"] = functools.partial(_hf_generate, hf, torch.tensor(prompts, device="cuda"))
        reference = None
        for label, run in runs.items():
            try:
                run(2)  # warm-up: captures, compiles, allocates
                times = []
                for _ in range(args.repeat):
                    out, sec = timed(lambda run=run: run(n))
                    times.append(sec)
                sec = statistics.median(times)
            except Exception as exc:  # report, keep going
                rows.append({"model": name, "B": B, "method": label, "tok/s": float("nan"),
                             "note": f"{type(exc).__name__}: {str(exc)[:60]}"})
                continue
            if reference is None:
                reference = out
            tps = B * n / sec
            rows.append({"model": name, "B": B, "method": label, "tok/s": tps,
                         "range": f"{B * n / max(times):,.0f}–{B * n / min(times):,.0f}",
                         "% of bandwidth limit": 100 * tps / limit if B == 1 else float("nan"),
                         "same tokens as first row": "" if "HF" in label else out == reference, "note": ""})
            print(rows[-1], flush=True)  # partial results survive a time limit
    print(f"{name}: weights {weight_bytes / 1e9:.2f} GB, bandwidth limit {limit:,.0f} tok/s at B=1",
          flush=True)
    if args.profile:
        profile_step(llm, model, args.prompt, args.new_tokens)
    return rows


def profile_step(llm, model, context, new_tokens):
    """The kernels of one replayed compile+graph step at batch 1 (the decoder the timed rows kept),
    by GPU time over 10 steps."""
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.ones(1, dtype=torch.long, device="cuda")
    positions = torch.full((1,), context, device="cuda")
    with llm.kept_decoder(model, 1, context + new_tokens, "compile+graph") as dec, torch.inference_mode():
        for _ in range(3):
            dec.step(tokens, positions)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                dec.step(tokens, positions)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    # Steady state, without prefill or the host: 100 replays back to back, timed by CUDA events
    dec.step(tokens, positions)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        start.record()
        for _ in range(100):
            dec._run()
        end.record()
        torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 100
    print(f"steady state: {ms:.3f} ms a step = {1e3 / ms:,.0f} tok/s", flush=True)


def bench_matvec(llm, name):
    """Each distinct batch-1 projection of the model's decode step, one matrix-vector product at a
    time (L2 flushed between runs): cuBLAS (`F.linear`), the compiler's tuned reduction, and
    `triton_matvec`, plain and with the neighbours the step folds in (norm, SiLU·up, residual), in
    µs and in TB/s of weight read; then the folded call under every launch configuration, timed
    one launch at a time and as the tuner times it (back to back in a CUDA graph)."""
    import triton.testing

    model, cfg = random_model(llm, name)
    layer = model.layers[0]
    first = llm.layer_matrices(layer, llm.fuse_projections(model)[0])
    weights = dict(zip(("q/k/v", "wo", "gate/up", "down"), first)) | {"lm_head": model.lm_head.weight}
    dim = torch.randn(1, cfg.dim, device="cuda", dtype=torch.bfloat16)
    folded = {"q/k/v": dict(norm=layer.attn_norm.weight, eps=layer.attn_norm.eps), "wo": dict(residual=dim),
              "gate/up": dict(norm=layer.mlp_norm.weight, eps=layer.mlp_norm.eps, swiglu=True),
              "down": dict(residual=dim), "lm_head": dict(norm=model.norm.weight, eps=model.norm.eps)}
    compiled = torch.compile(torch.nn.functional.linear, dynamic=False,
                             options={"coordinate_descent_tuning": True})
    rows, spread = [], []
    for label, w in weights.items():
        x = torch.randn(1, w.shape[1], device="cuda", dtype=w.dtype)
        row = {"model": name, "matrix": label, "N × K": f"{w.shape[0]} × {w.shape[1]}"}
        for method, fn in (("cuBLAS", torch.nn.functional.linear), ("compiled", compiled),
                           ("triton_matvec", llm.triton_matvec),
                           ("folded", functools.partial(llm.triton_matvec, **folded[label]))):
            fn(x, w)
            us = 1e3 * triton.testing.do_bench(lambda fn=fn, x=x, w=w: fn(x, w), warmup=10, rep=50)
            row[f"{method} µs"] = us
            row[f"{method} TB/s"] = w.numel() * w.element_size() / us / 1e6
        kw = folded[label]
        key = llm.matvec_key(w, kw.get("norm"), kw.get("residual"), kw.get("swiglu", False))
        row["config"] = str(llm.MATVEC_TUNED.get(llm.matvec_key(w)))
        row["folded config"] = str(llm.MATVEC_TUNED.get(key))
        rows.append(row)
        print(row, flush=True)
        chosen = llm.MATVEC_TUNED[key]

        def launch(c, weight=w, x=x, kw=kw, key=key):  # the folded call with launch configuration c
            llm.MATVEC_TUNED[key] = c
            llm.triton_matvec(x, weight, **kw)

        single = [1e3 * triton.testing.do_bench(lambda c=c: launch(c)) for c in llm.MATVEC_CONFIGS]
        graphed = llm.time_matvec_configs(launch, w)
        llm.MATVEC_TUNED[key] = chosen
        spread.append(f"{label} folded (picked {chosen}), µs per config, in a graph / one launch: "
                      + ", ".join(f"{c}: {a:.1f} / {b:.1f}"
                                  for c, a, b in zip(llm.MATVEC_CONFIGS, graphed, single)))
    print(llm.format_table(rows, f"Batch-1 matrix-vector products, {name} shapes, bf16 (measured)"))
    print("\n".join(spread), flush=True)


class Int4PackLinear(torch.nn.Module):
    """The peer for INT4: PyTorch's own CUDA kernel for weight-only int4 (`_weight_int4pack_mm`, the
    one gpt-fast and torchao call), holding the same codes, scales and offsets as a `QuantizedLinear`
    (w = offset + scale · q = (q − 8) · scale + zero, zero = offset + 8 · scale)."""

    def __init__(self, layer, inner_k_tiles=8):
        super().__init__()
        (N, K), G = layer.qw.shape, layer.qw.group_size
        q = torch.cat([layer.codes & 15, layer.codes >> 4], dim=-1).reshape(N, -1)[:, :K].to(torch.int32)
        try:  # recent PyTorch: two codes per byte, the even one in the high nibble
            self.packed = torch.ops.aten._convert_weight_to_int4pack(
                (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), inner_k_tiles)
        except RuntimeError:  # older PyTorch: one int32 per code
            self.packed = torch.ops.aten._convert_weight_to_int4pack(q, inner_k_tiles)
        scales, offsets = layer.scales.float(), layer.offsets.float()
        self.grid = torch.stack([scales, offsets + 8 * scales], -1).transpose(0, 1).contiguous().bfloat16()
        self.group_size, self.in_features, self.out_features = G, K, N

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).bfloat16()
        y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.grid)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def _peer_int4(llm, qmodel):
    """A copy of an INT4 model whose 4-bit layers run PyTorch's int4 kernel (layers whose shapes it
    cannot take, and the INT8 head, keep ours). Returns (model, how many layers it took)."""
    import copy

    peer, n = copy.deepcopy(qmodel), 0
    for name, mod in list(peer.named_modules()):
        if isinstance(mod, llm.QuantizedLinear) and mod.qw.bits == 4 and mod.in_features % 1024 == 0 \
                and mod.out_features % 8 == 0:
            llm._replace_module(peer, name, Int4PackLinear(mod))
            n += 1
    return peer, n


def _layer_error(model, reference, qlayer_name):
    """max |layer(x) − F.linear(x, dequantized w)| / max |F.linear(…)|, bf16 x of 1 and 8 rows; w is
    the same layer of `reference` (a model of `QuantizedLinear`s: the layer itself, or the codes a
    peer layer was made from)."""
    layer = model.get_submodule(qlayer_name)
    ref_w = reference.get_submodule(qlayer_name).weight_dequantized().float()
    errs = []
    for rows in (1, 8):
        x = torch.randn(rows, layer.in_features, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            got = layer(x).float()
            ref = torch.nn.functional.linear(x.float(), ref_w)
        errs.append(float((got - ref).abs().max() / ref.abs().max()))
    return max(errs)


def bench_quant_kernels(llm, name):
    """Each distinct projection shape of the model's decode step at batch 1, bf16 vs INT8 vs INT4 g128:
    µs per product and GB/s of bytes read, timed as the tuner times them (back to back in a CUDA graph,
    each launch on another copy of the codes), the best launch configuration."""
    cfg = llm.ModelConfig.from_name(name)
    shapes = {"q/k/v": ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.dim),
              "wo": (cfg.dim, cfg.n_heads * cfg.head_dim), "gate/up": (2 * cfg.ffn_dim, cfg.dim),
              "down": (cfg.dim, cfg.ffn_dim)}
    rows = []
    for label, (N, K) in shapes.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        row = {"model": name, "matrix": label, "N × K": f"{N} × {K}"}
        graphed = llm.time_matvec_configs(lambda c, weight=w, x=x: torch.nn.functional.linear(x, weight), w,
                                          configs=[None])
        row["bf16 cuBLAS µs"], row["bf16 GB/s"] = graphed[0], w.numel() * 2 / graphed[0] / 1e3
        for bits in (8, 4):
            qw = llm.quantize_int8(w) if bits == 8 else llm.quantize_groupwise(w, 4, 128)
            nbytes = qw.nbytes
            key = llm.quant_tuning_key(x, N, K, bits, qw.group_size)  # no folds

            def launch(c, codes=qw.codes, qw=qw, key=key, x=x, bits=bits, K=K):
                llm.QUANT_TUNED[key] = c
                llm.triton_quant_matmul(x, codes, qw.scales, qw.offsets, bits, qw.group_size, K)

            configs = llm.quant_configs("vec", bits, qw.group_size)
            times = llm.time_matvec_configs(launch, qw.codes, configs=configs)
            best = min(times)
            ref = torch.nn.functional.linear(x.float(), qw.dequantize().float())
            llm.QUANT_TUNED[key] = configs[times.index(best)]
            got = llm.triton_quant_matmul(x, qw.codes, qw.scales, qw.offsets, bits, qw.group_size, K).float()
            row[f"INT{bits} µs"], row[f"INT{bits} GB/s"] = best, nbytes / best / 1e3
            row[f"INT{bits} config"] = str(configs[times.index(best)])
            if bits == 4:  # the best of each INT4 tiling, to see what whole-group tiles buy
                for tiles in ("columns", "groups"):
                    row[f"INT4 {tiles} µs"] = min((t for t, c in zip(times, configs) if c[4] == tiles),
                                                  default=float("nan"))
            row[f"INT{bits} error"] = float((got - ref).abs().max() / ref.abs().max())
        rows.append(row)
        print(row, flush=True)
    print(llm.format_table(rows, f"Batch-1 products by weight format, {name} shapes, on "
                                 f"{torch.cuda.get_device_name()} (measured, in CUDA graphs)"))


def bench_quant(llm, name, args, bw):
    """Decode by weight format: ours bf16, INT8 per channel, INT4 g128 (RTN; GPTQ and AWQ store the
    same layout and run the same kernel), and INT4 through PyTorch's int4 kernel with the same codes."""
    base, cfg = random_model(llm, name)
    formats, references = {"bf16": base}, {}  # references: the QuantizedLinear codes of each format
    with torch.no_grad():
        if "int8" in args.quant:
            formats["INT8 per channel"] = llm.quantize_model(base, llm.rtn_quantizer(8))
        if "int4" in args.quant:
            formats["INT4 g128 (head INT8)"] = int4 = llm.quantize_model(base, llm.rtn_quantizer(4, 128))
            peer, n_peer = _peer_int4(llm, int4) if not args.no_peer else (None, 0)
            if n_peer:
                formats[f"INT4 g128, PyTorch int4 kernel ({n_peer} layers)"] = peer
                references[f"INT4 g128, PyTorch int4 kernel ({n_peer} layers)"] = int4
    rows, n = [], args.new_tokens
    for label, model in formats.items():
        tensors = list(model.parameters()) + list(model.buffers())
        tensors += [t for m in model.modules() if isinstance(m, Int4PackLinear) for t in (m.packed, m.grid)]
        seen, weight_bytes = set(), 0
        for t in tensors:  # each storage once (the fused q/k/v views share their base)
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                weight_bytes += t.untyped_storage().nbytes()
        weight_bytes -= model.embed.weight.numel() * model.embed.weight.element_size()  # one row is read
        reference = references.get(label, model)
        err = 0.0 if label == "bf16" else _layer_error(model, reference, "layers.0.mlp.w_up")
        for B in args.batches:
            g = torch.Generator().manual_seed(B)
            prompts = [torch.randint(0, cfg.vocab_size, (args.prompt,), generator=g).tolist()
                       for _ in range(B)]
            for mode in args.modes:
                run = functools.partial(_static, llm, model, prompts, mode)
                try:
                    run(2)  # compile and capture
                    times = []
                    for _ in range(args.repeat):
                        out, sec = timed(functools.partial(run, n))
                        times.append(sec)
                    tps = B * n / statistics.median(times)
                except Exception as exc:  # report, keep going
                    rows.append({"model": name, "format": label, "B": B, "mode": mode, "tok/s": float("nan"),
                                 "note": f"{type(exc).__name__}: {str(exc)[:80]}"})
                    print(rows[-1], flush=True)
                    continue
                ref = next((r["tok/s"] for r in rows if r["format"] == "bf16" and r["B"] == B
                            and r["mode"] == mode), tps)
                rows.append({"model": name, "format": label, "B": B, "mode": mode,
                             "GB read per step": weight_bytes / 1e9, "tok/s": tps, "× bf16": tps / ref,
                             "% of its bandwidth limit": 100 * tps * weight_bytes / bw if B == 1 else None,
                             "layer error": err, "note": ""})
                print(rows[-1], flush=True)
    formats.clear()
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-2-7b"])
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="add the static step compiled, then captured in a CUDA graph (slow to build)")
    ap.add_argument("--engine", action="store_true",
                    help="add the §5 engine, packed vs CUDA-graph decode steps")
    ap.add_argument("--serving", type=int, default=0, metavar="N",
                    help="also serve N requests: the §5 engine vs HF generate_batch (SmolLM2 shapes)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"],
                    choices=["eager", "graph", "compile+graph"],
                    help="the static step's modes to time")
    ap.add_argument("--gpu-warmup", type=float, default=0, metavar="SECONDS",
                    help="run matmuls this long first, so the GPU's clocks are up before any tuning")
    ap.add_argument("--no-baseline", action="store_true", help="skip §1's eager batched_generate")
    ap.add_argument("--matvec", action="store_true", help="time each projection alone, three ways, first")
    ap.add_argument("--matvec-mode", choices=("auto", "on", "off"), default="auto",
                    help="batch-1 static steps: triton_matvec where the lesson picks it, always, never")
    ap.add_argument("--repeat", type=int, default=1, help="time each row this many times; report the median")
    ap.add_argument("--quant", nargs="+", choices=("int8", "int4"), default=[],
                    help="decode by weight format instead (bf16, INT8, INT4, PyTorch's int4 kernel)")
    ap.add_argument("--no-peer", action="store_true",
                    help="with --quant int4: leave out PyTorch's int4 kernel (one compile fewer)")
    ap.add_argument("--no-kernel-table", action="store_true",
                    help="with --quant: leave out the table of each product alone (first)")
    ap.add_argument("--profile", action="store_true",
                    help="print the kernels of one compiled and captured step at batch 1, by GPU time")
    args = ap.parse_args()
    llm = load_lesson()
    if args.gpu_warmup:  # clocks up before anything is tuned or timed
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.gpu_warmup:
            a @ a
            torch.cuda.synchronize()
    if args.matvec_mode != "auto":
        llm.use_matvec = lambda model, batch_size: args.matvec_mode == "on" and batch_size == 1
    if args.matvec:
        for name in args.models:
            bench_matvec(llm, name)
    bw = llm.measure_memory_bandwidth("cuda")
    if args.quant:
        for name in args.models if not args.no_kernel_table else ():
            bench_quant_kernels(llm, name)
        rows = [r for name in args.models for r in bench_quant(llm, name, args, bw)]
        print(llm.format_table(rows, f"Decode by weight format on {torch.cuda.get_device_name()}, random "
                                     f"weights, {args.prompt}-token prompts, {args.new_tokens} new tokens; "
                                     f"copy bandwidth {bw / 1e12:.2f} TB/s (measured)"))
        return
    rows = []
    for name in args.models:
        rows += bench_model(llm, name, args, bw)
        torch.cuda.empty_cache()
    if args.serving:
        serving = bench_serving(llm, args.models[0], args)
        base = next((r["tok/s"] for r in serving if "HF" in r["method"]), float("nan"))
        for r in serving:
            r["× HF generate_batch"] = r["tok/s"] / base
        title = (f"Serving {args.serving} requests ({args.new_tokens} new tokens each, max_num_seqs "
                 f"{args.max_num_seqs}) on {torch.cuda.get_device_name()}, bf16 (measured)")
        print(llm.format_table(serving, title))
    title = (f"Decode on {torch.cuda.get_device_name()}, bf16, {args.prompt}-token prompts, "
             f"{args.new_tokens} new tokens; copy bandwidth {bw / 1e12:.2f} TB/s (measured)")
    print(llm.format_table(rows, title))


if __name__ == "__main__":
    main()
