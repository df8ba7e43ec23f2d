"""Serving throughput: one workload through the lesson's continuous-batching engine, its static-batch
baseline, HF transformers' continuous batching, and plain HF batched `generate` (same GGUF weights, fp32).

    python benchmarks/bench_serving.py [--requests 24] [--mean-output 48] [--max-num-seqs 16] [--quick]

Every request is greedy and ignores EOS, so each one produces exactly its `max_tokens`; only those count
as generated tokens (the extra tokens a static batch computes for its shorter rows are waste).
"""

import argparse
import math
import os
import platform
import time

import torch
from _common import load_lesson

BLOCK_SIZE, MAX_BATCH_TOKENS = 16, 512  # KV block (page) size and token budget per step, for both engines


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def load_hf(path):
    """HF transformers loading the same GGUF file as the lesson (as tests/conftest.py `hf_smollm2` does)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def hf_continuous(hf, work, max_num_seqs):
    """HF continuous batching. `model.generate_batch` takes one `max_new_tokens` for all requests, so we drive
    the manager it wraps (`continuous_batching_context_manager`) and give each request its own length."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    longest = max(sp.max_tokens for _, sp in work)
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=longest)  # -1: EOS disabled
    blocks = sum(math.ceil((len(p) + sp.max_tokens) / BLOCK_SIZE) for p, sp in work)  # never preempts
    cb = ContinuousBatchingConfig(page_size=BLOCK_SIZE, num_blocks=blocks, max_batch_tokens=MAX_BATCH_TOKENS,
                                  max_requests_per_batch=max_num_seqs, scheduler_type="fifo")
    results = {}
    with hf.continuous_batching_context_manager(gen, continuous_batching_config=cb, warmup=False,
                                                timeout=5) as manager:
        ids = [manager.add_request(p, max_new_tokens=sp.max_tokens, eos_token_id=-1) for p, sp in work]
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is None and not manager.is_running():
                raise RuntimeError("HF continuous-batching thread stopped before finishing all requests")
            if r is not None and r.is_finished():
                if r.error is not None:
                    raise RuntimeError(r.error)
                results[r.request_id] = list(r.generated_tokens)
    return [results[i] for i in ids]


def hf_static(hf, work, batch_size):
    """Plain HF `generate` over left-padded batches of `batch_size`: every row runs to the batch's longest
    `max_tokens` (EOS suppressed by min_new_tokens), and each request keeps only its own `max_tokens`."""
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    outs = []
    for i in range(0, len(work), batch_size):
        chunk = work[i:i + batch_size]
        L, n = max(len(p) for p, _ in chunk), max(sp.max_tokens for _, sp in chunk)
        ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p, _ in chunk])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, _ in chunk])
        with torch.no_grad():
            g = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, eos_token_id=None, pad_token_id=pad)
        outs += [g[j, L:L + sp.max_tokens].tolist() for j, (_, sp) in enumerate(chunk)]
    return outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--mean-output", type=int, default=48)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="8 requests, mean output 16")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.mean_output = 8, 16
    llm = load_lesson()
    if not hasattr(llm, "LLMEngine"):
        print("bench_serving: the lesson has no LLMEngine yet (continuous batching not written); skipped.")
        return
    net, tok = llm.get_model(llm.fetch_smollm2(), device="cpu")
    work = llm.serving_workload(tok, num_requests=args.requests, seed=0, mean_output=args.mean_output)
    seqs = args.max_num_seqs

    def ours(w):
        engine = llm.LLMEngine(net, block_size=BLOCK_SIZE, max_num_seqs=seqs,
                               max_num_batched_tokens=MAX_BATCH_TOKENS)
        return [o.token_ids for o in engine.generate([p for p, _ in w], [sp for _, sp in w])]

    def static(w):
        return [o.token_ids for o in llm.serve_static_batches(net, [p for p, _ in w], [sp for _, sp in w],
                                                               batch_size=seqs)]

    hf = load_hf(llm.fetch_smollm2())
    systems = [("this lesson: LLMEngine (continuous)", ours),
               ("this lesson: serve_static_batches", static),
               ("HF transformers continuous batching", lambda w: hf_continuous(hf, w, seqs)),
               (f"HF transformers generate, batches of {seqs}", lambda w: hf_static(hf, w, seqs))]
    useful = sum(sp.max_tokens for _, sp in work)
    rows, reference = [], None
    for name, run in systems:
        try:
            run(work[:2])  # warm-up
            outs, wall = timed(run, work)
        except Exception as e:  # an HF path unsupported on this device / version: say why, go on
            if run in (ours, static):
                raise
            print(f"{name}: could not run ({type(e).__name__}: {e})")
            continue
        reference = outs if reference is None else reference
        same = sum(list(a) == list(b) for a, b in zip(outs, reference))
        rows.append({"system": name, "requests": len(work), "generated tokens": useful, "wall (s)": wall,
                     "tokens/s": useful / wall, "ratio vs ours (×)": 0.0,
                     "greedy = ours": f"{same}/{len(work)}"})  # ratio filled in below
    for r in rows:
        r["ratio vs ours (×)"] = r["tokens/s"] / rows[0]["tokens/s"]
    machine = llm.platform_summary() if hasattr(llm, "platform_summary") else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    llm.print_table(rows, f"Serving {len(work)} requests (mean output {args.mean_output}), "
                    f"max_num_seqs {seqs}, block {BLOCK_SIZE}, fp32, {machine}, HF attention "
                    f"{hf.config._attn_implementation} (measured)")


if __name__ == "__main__":
    main()
