"""§9 on a CPU: SmolLM2-135M (fp32) decode at batch 1, eager vs the compiled static step, against the
bandwidth limit measured in the same round. A shared or small machine's bandwidth moves from minute to
minute, so each round measures the limit right before it times the steps, and the table reports the
median of the per-round ratios over all rounds (with their range). Every timing in a round is a best
of several (5 for the copy and the matmuls, 3 for each generation), as the limit's own measurement is.

    python benchmarks/bench_cpu_fast_path.py [--rounds 7] [--new-tokens 32]

Rows:
- `bandwidth limit`: (fp32 weight bytes) / (copy bandwidth of a buffer as large as the weights, read +
  write counted, best of 5): the step time if reading the weights were all.
- `matmuls alone`: every weight matrix of one step through F.linear with a batch-1 input, back to
  back, nothing else: the floor that PyTorch's fp32 matrix-vector products put under any step.
- `eager static step`, `compiled static step`: `static_generate(..., mode)`, (n − 1) tokens / (time of n
  tokens − time of 1): the prefill subtracted.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import load_lesson


def decode_tps(llm, model, prompt, n, mode, repeat=3):
    """Decode tokens/s of a greedy generation of n tokens: (n − 1) / (time of n tokens − time of 1),
    each time the best of `repeat`, the statistic the bandwidth limit uses too."""
    def best(k):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            llm.static_generate(model, [prompt], k, mode)
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
    fused = llm.fuse_projections(model)
    weights = [w for layer, pair in zip(model.layers, fused) for w in llm.layer_matrices(layer, pair)]
    weights.append(model.lm_head.weight)
    weight_bytes = model.param_bytes
    inputs = [torch.randn(1, w.shape[1]) for w in weights]

    def matmuls():
        for w, x in zip(weights, inputs):
            F.linear(x, w)

    with torch.inference_mode():
        for mode in ("eager", "compile"):
            llm.static_generate(model, [prompt], 2, mode)  # warm-up: compiles (a minute or more when cold)
        rounds = []
        for r in range(args.rounds):
            bw = llm.measure_memory_bandwidth("cpu", nbytes=weight_bytes, repeat=5)
            limit = bw / weight_bytes
            mm = 1 / llm.benchmark(matmuls, "cpu", warmup=1, repeat=5, reduce=min)
            eager = decode_tps(llm, model, prompt, args.new_tokens, "eager")
            compiled = decode_tps(llm, model, prompt, args.new_tokens, "compile")
            rounds.append({"bandwidth limit": limit, "matmuls alone": mm, "eager static step": eager,
                           "compiled static step": compiled})
            print(f"round {r + 1}: copy {bw / 1e9:.1f} GB/s → limit {limit:.1f} tok/s; matmuls alone "
                  f"{mm:.1f}, eager {eager:.1f}, compiled {compiled:.1f} tok/s", flush=True)
    rows = []
    for name in rounds[0]:
        ratios = [100 * r[name] / r["bandwidth limit"] for r in rounds]
        rows.append({"row": name, "tokens/s (median)": statistics.median(r[name] for r in rounds),
                     "% of the round's limit (median)": statistics.median(ratios),
                     "range over rounds (%)": f"{min(ratios):.0f}–{max(ratios):.0f}"})
    llm.print_table(rows, f"SmolLM2-135M fp32 decode, batch 1, {args.new_tokens} new tokens, "
                    f"{torch.get_num_threads()} threads, {llm.platform_summary()}, {args.rounds} rounds "
                    f"(measured)")


if __name__ == "__main__":
    main()
