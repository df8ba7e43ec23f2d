"""The §5 demo's workload on vLLM's offline `LLM` API, with the lesson's knobs, beside our own engine.

    python benchmarks/run_on_vllm.py [--quick] [--requests 12] [--mean-output 24] [--max-num-seqs 6]
                                     [--block-size 16] [--max-num-batched-tokens 512]
                                     [--no-prefix-caching] [--speculative GAMMA] [--tokenizer HF_DIR]

vLLM is not a requirement of this lesson: it wants a GPU and a multi-GB install. Where it is
installed (`pip install vllm`, in a separate environment if you like), this script runs the same
seeded requests (`serving_workload`: varied prompts, per-request output lengths, greedy, no stop
token, so every request makes exactly its `max_tokens`) through

- this lesson's `LLMEngine` (on the GPU if there is one), and
- vLLM's `LLM(...)` on the same GGUF file, with the same knobs under the same names: `block_size`,
  `max_num_seqs`, `max_num_batched_tokens`, `enable_prefix_caching`; with `--speculative GAMMA`,
  prompt lookup (`speculative_config={"method": "ngram", ...}`) against our `NgramDraft` through
  `speculative_generate`, which serves one request at a time (§6 is written for batch 1),

and prints one table: requests, generated tokens, wall time, tokens/s, median and p90 time to first
token where the system reports it, and how many requests got exactly our engine's tokens (vLLM
runs the Q4_1 weights through its own kernels and dtype, so a few near-ties may differ).

Without vLLM the script says so and exits with status 0. The GGUF tokenizer is converted by
transformers inside vLLM; `--tokenizer` points it at a Hugging Face tokenizer folder instead.
"""

import argparse
import statistics
import sys
import time

from _common import load_lesson


def percentile(values, q):
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def vllm_ttft(output):
    """Time to first token from vLLM's per-request metrics, or None where this version does not report it
    in one clock (the V0 engine's RequestMetrics has arrival_time and first_token_time; V1's stats have
    first_token_latency)."""
    m = getattr(output, "metrics", None)
    if m is None:
        return None
    if getattr(m, "first_token_latency", None):
        return float(m.first_token_latency)
    if getattr(m, "first_token_time", None) and getattr(m, "arrival_time", None):
        return float(m.first_token_time - m.arrival_time)
    return None


def row(system, outs_tokens, wall, ttft, reference):
    tokens = sum(len(t) for t in outs_tokens)
    same = sum(list(a) == list(b) for a, b in zip(outs_tokens, reference))
    return {"system": system, "requests": len(outs_tokens), "generated tokens": tokens, "wall (s)": wall,
            "tokens/s": tokens / wall, "p50 TTFT (s)": statistics.median(ttft) if ttft else float("nan"),
            "p90 TTFT (s)": percentile(ttft, 90), "same tokens as our engine": f"{same}/{len(reference)}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the --quick demo's workload: 8 requests, mean 8")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--mean-output", type=int, default=24)
    ap.add_argument("--max-num-seqs", type=int, default=6)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--speculative", type=int, default=0, metavar="GAMMA",
                    help="also run prompt lookup with GAMMA speculative tokens (0: off)")
    ap.add_argument("--tokenizer", default=None,
                    help="a Hugging Face tokenizer for vLLM (default: the GGUF's)")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.mean_output, args.max_num_seqs = 8, 8, 4
    try:
        import vllm
        from vllm import LLM
        from vllm import SamplingParams as VllmParams
    except ImportError as exc:
        print(f"run_on_vllm: vLLM is not installed ({exc}); it is optional. Install it with "
              "`pip install vllm` (it needs a supported GPU) and run this script again.")
        return 0

    lesson = load_lesson()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = lesson.fetch_smollm2()
    net, tok = lesson.get_model(path, device=device)
    work = lesson.serving_workload(tok, num_requests=args.requests, seed=0, mean_output=args.mean_output,
                                   max_len=net.cfg.max_seq_len // 2)
    prompts, params = [p for p, _ in work], [sp for _, sp in work]
    knobs = dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens,
                 enable_prefix_caching=not args.no_prefix_caching)

    engine = lesson.LLMEngine(net, **knobs)
    engine.generate(prompts[:2], params[:2])  # warm-up
    engine = lesson.LLMEngine(net, **knobs)
    t0 = time.perf_counter()
    ours = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    reference = [o.token_ids for o in ours]
    rows = [row(f"this lesson: LLMEngine ({device})", reference, wall, [o.ttft for o in ours], reference)]

    greedy = [VllmParams(temperature=0.0, max_tokens=sp.max_tokens, ignore_eos=True) for sp in params]
    requests = [{"prompt_token_ids": list(p)} for p in prompts]
    configs = [("vLLM LLM", {})]
    if args.speculative:
        configs.append((f"vLLM LLM + ngram, γ={args.speculative}",
                        {"speculative_config": {"method": "ngram", "num_speculative_tokens": args.speculative,
                                                "prompt_lookup_max": 3, "prompt_lookup_min": 1}}))
    for name, extra in configs:
        llm = LLM(model=str(path), tokenizer=args.tokenizer, seed=0, **knobs, **extra)
        llm.generate(requests[:2], greedy[:2], use_tqdm=False)  # warm-up (compiles, captures graphs)
        t0 = time.perf_counter()
        outs = llm.generate(requests, greedy, use_tqdm=False)
        wall = time.perf_counter() - t0
        rows.append(row(f"{name} {vllm.__version__}", [list(o.outputs[0].token_ids) for o in outs], wall,
                        [vllm_ttft(o) for o in outs], reference))
        del llm

    if args.speculative:
        draft = lesson.NgramDraft(max_ngram=3)
        t0 = time.perf_counter()
        spec = [lesson.speculative_generate(net, draft, p, sp.max_tokens, gamma=args.speculative)[0]
                for p, sp in work]
        rows.append(row(f"this lesson: speculative_generate, prompt lookup γ={args.speculative}, one request "
                        "at a time", spec, time.perf_counter() - t0, [], reference))

    prefix = "off" if args.no_prefix_caching else "on"
    lesson.print_table(rows, f"The §5 workload: {len(work)} requests, mean output {args.mean_output}, "
                       f"block_size {args.block_size}, max_num_seqs {args.max_num_seqs}, "
                       f"max_num_batched_tokens {args.max_num_batched_tokens}, prefix caching {prefix} "
                       f"({lesson.platform_summary()}, measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
