"""Decode attention on a GPU: the lesson's Triton flash-decoding kernels (contiguous and paged) vs PyTorch's
`scaled_dot_product_attention` and, where installed, FlashAttention's `flash_attn_with_kvcache`.

    python benchmarks/bench_decode_attention.py [--batches 1 8] [--contexts 1024 4096 16384 65536 131072]

One query per sequence, 32 query / 8 KV heads, head dim 128, bf16, every sequence at the full context.
Each method is captured in a CUDA graph and replayed (so Python launch overhead is not measured), timed
with CUDA events: the median of 5 runs of 50 replays. TB/s counts the K/V bytes that must be read
(2·B·Hkv·T·D·2); "% of copy" divides by the device-to-device copy bandwidth measured in the same run
(best of 20 copies of 2 GiB, counting read + write, as §2's `measure_memory_bandwidth`).
"""

import argparse
import functools

import torch
from _common import load_lesson


def bench_one(llm, B, T, bs, copy_bw, flash_attn_with_kvcache):
    """Rows for one (batch, context): every method's time, bandwidth and error vs the naive reference."""
    H, Hkv, D, dtype, dev = 32, 8, 128, torch.bfloat16, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, D, generator=g, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=g, device=dev, dtype=dtype)
    lens = torch.full((B,), T, device=dev, dtype=torch.int32)
    nb = T // bs
    table = torch.randperm(B * nb, device=dev).view(B, nb).to(torch.int32)  # shuffled blocks
    kc = torch.empty(B * nb, bs, Hkv, D, device=dev, dtype=dtype)
    vc = torch.empty_like(kc)
    kc[table.long()] = k.transpose(1, 2).reshape(B, nb, bs, Hkv, D)
    vc[table.long()] = v.transpose(1, 2).reshape(B, nb, bs, Hkv, D)
    ref = llm.naive_decode_attention(q, k, v) if B * T <= 131072 else None
    methods = {
        "PyTorch SDPA": lambda: llm.sdpa_decode_attention(q, k, v),
        "Triton, 1 split (no split-K)": lambda: llm.triton_flash_decode(q, k, v, lens, num_splits=1),
        "Triton flash-decoding": lambda: llm.triton_flash_decode(q, k, v, lens),
        f"Triton flash-decoding, paged (bs={bs})": lambda: llm.triton_paged_flash_decode(
            q, kc, vc, table, lens),
    }
    if flash_attn_with_kvcache is not None:
        kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # (B, T, Hkv, D)
        methods["FlashAttention flash_attn_with_kvcache"] = lambda: flash_attn_with_kvcache(
            q[:, None], kt, vt, cache_seqlens=lens)
    nbytes = 2 * B * Hkv * T * D * 2
    rows = []
    for name, fn in methods.items():
        out = fn().reshape(B, H, D).float()
        err = (out - ref.float()).abs().max().item() if ref is not None else float("nan")
        sec = llm.cuda_graph_time(fn)
        rows.append({"B": B, "context": T, "method": name, "time (µs)": sec * 1e6,
                     "TB/s": nbytes / sec / 1e12, "% of copy": 100 * nbytes / sec / copy_bw,
                     "max err vs naive": err})
    return rows


def sweep(llm, copy_bw):
    """Time the contiguous kernel over tile size, warps, stages and split counts at B=1."""
    rows = []
    for T in (4096, 16384, 131072):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 32, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, T, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.full((1,), T, device="cuda", dtype=torch.int32)
        base = llm.default_num_splits(1, 8, T, "cuda")
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    for splits in sorted({base, 2 * base, 4 * base}):
                        fn = functools.partial(llm.triton_flash_decode, q, k, v, lens, num_splits=splits,
                                               block_n=block_n, num_warps=warps, num_stages=stages)
                        try:
                            sec = llm.cuda_graph_time(fn, replays=20, repeat=3)
                        except Exception as exc:  # a configuration that does not compile (e.g. too much smem)
                            print(f"skip {T} {block_n} {warps} {stages} {splits}: {type(exc).__name__}")
                            continue
                        rows.append({"context": T, "block_n": block_n, "warps": warps, "stages": stages,
                                     "splits": splits, "time (µs)": sec * 1e6,
                                     "% of copy": 100 * 2 * 8 * T * 128 * 2 / sec / copy_bw})
    best = {}
    for r in rows:
        if r["context"] not in best or r["time (µs)"] < best[r["context"]]["time (µs)"]:
            best[r["context"]] = r
    return [{"config": "best", **r} for r in best.values()] + [
        {"config": "default tile", **r} for r in rows
        if r["block_n"] == 64 and r["warps"] == 4 and r["stages"] == 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    ap.add_argument("--block-size", type=int, default=16, help="paged cache block size (tokens)")
    ap.add_argument("--sweep", action="store_true", help="also time kernel configurations at B=1")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    llm = load_lesson()
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    copy_bw = llm.measure_memory_bandwidth("cuda")
    rows = []
    for B in args.batches:
        for T in args.contexts:
            rows += bench_one(llm, B, T, args.block_size, copy_bw, flash_attn_with_kvcache)
            torch.cuda.empty_cache()
    if args.sweep:
        print(llm.format_table(sweep(llm, copy_bw), "Triton kernel configurations, B=1 (measured)"))
    name = torch.cuda.get_device_name()
    print(llm.format_table(rows, f"Decode attention on {name}, 32/8 heads, D=128, bf16; CUDA-graph replay, "
                                 f"median of 5×50; copy bandwidth {copy_bw / 1e12:.2f} TB/s (measured)"))


if __name__ == "__main__":
    main()
