"""On a CPU: x·wᵀ for one row of x and for a few, four ways side by side in one run, at SmolLM2-135M's
weight shapes (random fp32 weights), then whole SmolLM2-shaped steps with the model's `plain_linear`
reshaping or not.

    python benchmarks/bench_cpu_linear.py [--rows 1 2 4 8 16 32 64 128 256 512] [--repeat 15]

Per shape and row count, each product runs over enough copies of the weight (≥ 64 MB) that every call
reads its weight from memory, not from cache; the figure is the median over `--repeat` passes of the
weight bytes / time (GB/s), beside this machine's read bandwidth (`measure_memory_bandwidth`, kind
"read"). Ways:
- `F.linear`: `F.linear(x, w)`, PyTorch's BLAS call for x·wᵀ (MKL in the CPU builds).
- `row blocks`: w's rows split into one block per torch thread, the blocks multiplied as a batch
  (`torch.bmm`): what `plain_linear` runs for one row where it reshapes (`cpu_linear_way`).
- `weight first`: `torch.mm(w, x.t()).t().contiguous()`, the same product asked for as (w·xᵀ)ᵀ: what
  `plain_linear` runs for 2–32 rows where it reshapes.
- `oneDNN`: `torch.ops.mkldnn._linear_pointwise` on a weight reordered once (`OneDnnLinear`), what
  `LLMEngine(cpu_linear="onednn")` uses; it holds a second copy of the weights.

Then the model's own steps (random weights, SmolLM2 shapes), `LESSON_CPU_LINEAR=blas` against
`reshaped` in the same process: a prefill of 8, 32 and 128 tokens (`forward_without_cache`), and one
eager static decode step (`StaticDecoder.step_eager`) at batch 1, 4 and 16; median of `--repeat` each.
"""

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from _common import load_lesson


def median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gb_per_second(ws: list, M: int, onednn: bool, repeat: int) -> dict:
    """{way (GB/s): weight bytes streamed per second} for x (M, K) times each of `ws` in turn."""
    x = torch.randn(M, ws[0].shape[1])
    P, (N, K) = torch.get_num_threads(), ws[0].shape
    xb = x.unsqueeze(0).expand(P, M, K)  # row blocks: (P, M, K) · (P, K, N/P), one block per thread
    ways = {"F.linear": lambda: [F.linear(x, w) for w in ws],
            "row blocks": lambda: [torch.bmm(xb, w.view(P, N // P, K).transpose(1, 2)).transpose(0, 1)
                                   .reshape(M, N) for w in ws],
            "weight first": lambda: [torch.mm(w, x.t()).t().contiguous() for w in ws]}
    if P < 2 or N % P:  # one thread, or rows that do not split evenly: plain_linear would not use them
        del ways["row blocks"]
    if onednn:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in ws]
        ways["oneDNN"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "")
                                  for p in packed]
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    return {f"{k} (GB/s)": nbytes / median_seconds(f, repeat) / 1e9 for k, f in ways.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    llm = load_lesson()
    torch.manual_seed(0)
    cfg = llm.ModelConfig.from_name("smollm2-135m")
    D = cfg.head_dim
    shapes = {"q, o": (cfg.n_heads * D, cfg.dim), "k, v": (cfg.n_kv_heads * D, cfg.dim),
              "gate, up": (cfg.ffn_dim, cfg.dim), "down": (cfg.dim, cfg.ffn_dim),
              "head": (cfg.vocab_size, cfg.dim)}
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    print(f"{llm.cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}")
    roof = llm.measure_memory_bandwidth("cpu", nbytes=2**26, repeat=args.repeat, kind="read")
    print(f"read bandwidth: {roof / 1e9:.1f} GB/s")
    rows_out = []
    with torch.inference_mode():
        for name, (N, K) in shapes.items():
            ws = [torch.randn(N, K) for _ in range(max(1, -(-2**26 // (N * K * 4))))]
            for M in args.rows:
                row = {"weight": f"{name} {N}×{K}", "rows": M, **gb_per_second(ws, M, onednn, args.repeat)}
                if "row blocks (GB/s)" in row:
                    row["row blocks / F.linear"] = row["row blocks (GB/s)"] / row["F.linear (GB/s)"]
                row["weight first / F.linear"] = row["weight first (GB/s)"] / row["F.linear (GB/s)"]
                if onednn:
                    row["oneDNN / F.linear"] = row["oneDNN (GB/s)"] / row["F.linear (GB/s)"]
                rows_out.append(row)
                print("  ".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}"
                                for k, v in row.items()), flush=True)
        llm.print_table(rows_out, "x·wᵀ, GB/s of weights streamed (median)")

        model = llm.build_model("smollm2-135m", seed=0, device="cpu")
        ids = torch.randint(0, cfg.vocab_size, (128,)).tolist()
        steps = {f"prefill, {n} tokens": lambda n=n: llm.forward_without_cache(model, ids[:n])
                 for n in (8, 32, 128)}
        for B in (1, 4, 16):
            dec = llm.StaticDecoder(model, B, 160, "eager")
            tokens, positions = torch.ones(B, dtype=torch.long), torch.full((B,), 128)
            steps[f"decode step, batch {B}"] = lambda dec=dec, t=tokens, p=positions: dec.step_eager(t, p)
        model_rows = []
        for name, fn in steps.items():
            ms = {}
            for setting in ("blas", "reshaped"):
                os.environ["LESSON_CPU_LINEAR"] = setting
                ms[setting] = median_seconds(fn, args.repeat) * 1e3
            blas, reshaped = ms["blas"], ms["reshaped"]
            model_rows.append({"step": name, "F.linear (ms)": blas, "reshaped (ms)": reshaped,
                               "speed-up": blas / reshaped})
            print(model_rows[-1], flush=True)
        os.environ.pop("LESSON_CPU_LINEAR")
        llm.print_table(model_rows, "SmolLM2-shaped steps (random weights, fp32), plain_linear reshaping or "
                                    "not, median")


if __name__ == "__main__":
    main()
