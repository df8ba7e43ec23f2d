"""Decode tokens/s at batch 1: this lesson's model vs HF transformers, same weights, same run.

    python benchmarks/bench_decode.py [--tokens 64] [--device cpu]
"""

import argparse
import os
import time

import torch
from _common import load_lesson


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    llm = load_lesson()
    path = llm.fetch_smollm2()
    ours, tok = llm.load_model(path, device=args.device)
    ids = tok.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    n = args.tokens

    def ours_run(use_cache=True):
        stamps = []
        llm.generate(ours, ids, n, use_cache=use_cache,
                     on_token=lambda _: (llm.synchronize(args.device), stamps.append(time.perf_counter())))
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf = hf.to(args.device).eval()

    def hf_run():
        x = torch.tensor([ids], device=args.device)
        with torch.no_grad():
            hf.generate(x, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # prefill + 1
            llm.synchronize(args.device)
            t0 = time.perf_counter()
            hf.generate(x, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False)
            llm.synchronize(args.device)
            t_all = time.perf_counter() - t0
            t0 = time.perf_counter()
            hf.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            llm.synchronize(args.device)
            t_prefill = time.perf_counter() - t0
        return n / (t_all - t_prefill)

    ours_run()  # warm-up
    rows = [{"implementation": "this lesson (KV cache)", "decode tok/s": ours_run()},
            {"implementation": "HF transformers generate (cache)", "decode tok/s": hf_run()}]
    for r in rows:
        r["relative to HF (×)"] = r["decode tok/s"] / rows[1]["decode tok/s"]
    llm.print_table(rows, f"Decode at batch 1, {n} tokens, {args.device}, fp32, "
                    f"{torch.get_num_threads()} threads (measured)")


if __name__ == "__main__":
    main()
