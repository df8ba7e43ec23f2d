"""§9 on a CPU: SmolLM2-135M (fp32) decode at batch 1, eager vs the compiled static step, against the
memory roof measured in the same round. A shared or small machine's bandwidth moves from minute to
minute, so each round measures the roof right before it times the steps, and the table reports the
median of the per-round ratios over all rounds (with their range). Every timing in a round is a best
of several (5 for the roofs and the matmuls, 3 for each generation).

    python benchmarks/bench_cpu_fast_path.py [--rounds 7] [--new-tokens 32]

First, per weight shape of the step: the path `choose_cpu_matvec` picks on this machine, and the GB/s
of both paths over every matrix of that shape, each path compiled as one graph (as inside the step).

Rows:
- `read-stream limit`: (fp32 weight bytes) / (read bandwidth of a buffer as large as the weights: a
  sum, the access pattern of a decode step). `copy limit`: the same with a copy (read + write).
- `matmuls alone, BLAS`: every weight matrix of one step through F.linear with a batch-1 input, back
  to back, nothing else. `matmuls alone, chosen paths`: the same through the paths the compiled step
  uses, compiled as one graph.
- `eager static step`, `compiled static step (BLAS)`, `compiled static step (chosen paths)`: a
  `StaticDecoder` generating greedily, (n − 1) tokens / (time of n tokens − time of 1): the prefill
  subtracted.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import load_lesson


def decode_tps(decoder, prompt, n, repeat=3):
    """Decode tokens/s of a greedy generation of n tokens: (n − 1) / (time of n tokens − time of 1),
    each time the best of `repeat`, the statistic the roofs use too."""
    def best(k):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            decoder.generate([prompt], k)
            times.append(time.perf_counter() - t0)
        return min(times)
    return (n - 1) / (best(n) - best(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    llm = load_lesson()
    model, tok = llm.get_model("smollm2", "cpu")
    prompt = tok.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    length = len(prompt) + args.new_tokens + 8
    decoders = {"eager static step": llm.StaticDecoder(model, 1, length, "eager"),
                "compiled static step (BLAS)": llm.StaticDecoder(model, 1, length, "compile",
                                                                 cpu_matvec="blas"),
                "compiled static step (chosen paths)": llm.StaticDecoder(model, 1, length, "compile")}
    chosen = decoders["compiled static step (chosen paths)"]
    weights = llm.step_matrices(model, chosen.fused)
    weight_bytes = model.param_bytes
    inputs = [torch.randn(1, w.shape[1]) for w in weights]

    def stream(linear, ws, xs):
        return [linear(x, w) for w, x in zip(ws, xs)]

    with torch.inference_mode():
        # Per shape: both paths compiled as one graph over every matrix of that shape
        shapes = []
        for shape, path in chosen.matvec_paths.items():
            ws = [w for w in weights if tuple(w.shape) == shape]
            xs = [x for w, x in zip(weights, inputs) if tuple(w.shape) == shape]
            nbytes = sum(w.numel() * 4 for w in ws)
            row = {"shape (N × K)": f"{shape[0]} × {shape[1]}", "matrices": len(ws), "MB": nbytes / 1e6,
                   "path chosen": path}
            for name, linear in (("BLAS", F.linear), ("reduce", llm.reduce_matvec)):
                torch._dynamo.reset()  # a fresh compile per shape and path, not a recompile of the last
                fn = torch.compile(lambda ws, xs, linear=linear: stream(linear, ws, xs))
                seconds = llm.benchmark(lambda fn=fn, ws=ws, xs=xs: fn(ws, xs), "cpu", warmup=2, repeat=5,
                                        reduce=min)
                row[f"{name} GB/s"] = nbytes / seconds / 1e9
            shapes.append(row)
        linear = llm.cpu_matvec_linear(chosen.matvec_paths)
        chosen_stream = torch.compile(lambda ws, xs: stream(linear, ws, xs))
        for dec in decoders.values():
            dec.generate([prompt], 2)  # warm-up: compiles (a minute or more when cold)
        rounds = []
        for r in range(args.rounds):
            read = llm.measure_memory_bandwidth("cpu", nbytes=weight_bytes, repeat=5, kind="read")
            copy = llm.measure_memory_bandwidth("cpu", nbytes=weight_bytes, repeat=5)
            rnd = {"read-stream limit": read / weight_bytes, "copy limit": copy / weight_bytes,
                   "matmuls alone, BLAS": 1 / llm.benchmark(lambda: stream(F.linear, weights, inputs), "cpu",
                                                            warmup=1, repeat=5, reduce=min),
                   "matmuls alone, chosen paths": 1 / llm.benchmark(lambda: chosen_stream(weights, inputs),
                                                                    "cpu", warmup=1, repeat=5, reduce=min)}
            rnd.update({name: decode_tps(dec, prompt, args.new_tokens) for name, dec in decoders.items()})
            rounds.append(rnd)
            print(f"round {r + 1}: read {read / 1e9:.1f} GB/s, copy {copy / 1e9:.1f} GB/s; "
                  + ", ".join(f"{k} {v:.1f}" for k, v in rnd.items()) + " tok/s", flush=True)
    where = (f"{torch.get_num_threads()} threads, {llm.platform_summary()}")
    llm.print_table(shapes, f"SmolLM2-135M fp32, batch-1 matrix-vector products per weight shape, {where} "
                    "(measured, best of 5)")
    rows = []
    for name in rounds[0]:
        ratios = [100 * r[name] / r["read-stream limit"] for r in rounds]
        rows.append({"row": name, "tokens/s (median)": statistics.median(r[name] for r in rounds),
                     "% of the round's read limit (median)": statistics.median(ratios),
                     "range over rounds (%)": f"{min(ratios):.0f}–{max(ratios):.0f}"})
    llm.print_table(rows, f"SmolLM2-135M fp32 decode, batch 1, {args.new_tokens} new tokens, {where}, "
                    f"{args.rounds} rounds (measured)")


if __name__ == "__main__":
    main()
