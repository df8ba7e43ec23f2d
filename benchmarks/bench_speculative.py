"""Speculative decoding: the lesson's `speculative_generate` vs HF transformers' assisted generation,
same GGUF weights (fp32), same prompts, greedy, side by side in one run.

    python benchmarks/bench_speculative.py [--gammas 4 8] [--max-new-tokens 64] [--repeats 3]
                                           [--draft-layers 7]

Rows: plain greedy decoding (ours: `generate`; HF: `model.generate`), prompt lookup (ours: `NgramDraft`;
HF: `prompt_lookup_num_tokens=γ` with `max_matching_ngram_size=3`, as ours), and a self-draft made of the
target's first k layers (ours: `ModelDraft(truncated_model(...))`; HF: `assistant_model=` a copy of the model
cut to k layers, a constant γ tokens per round; HF also stops a round early when the draft's top
probability falls below `assistant_confidence_threshold`, default 0.4, which ours does not).
Tokens/s is the median over `--repeats` runs after one warm-up; "same tokens" compares each output
with HF's plain greedy output.
"""

import argparse
import copy
import os
import platform
import statistics
import time

import torch
from _common import load_lesson


def load_hf(path):
    """HF transformers loading the same GGUF file as the lesson (as tests/conftest.py `hf_smollm2` does)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def hf_truncated(hf, k):
    """A copy of the HF model keeping its first k decoder layers (same embedding, norm and head values)."""
    small = copy.deepcopy(hf)
    small.model.layers = small.model.layers[:k]
    small.config.num_hidden_layers = k
    return small


def median_time(fn, repeats):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gammas", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-layers", type=int, default=7)
    args = ap.parse_args()

    llm = load_lesson()
    torch.set_num_threads(os.cpu_count() or 1)
    path = llm.resolve_model("smollm2")
    net, tok = llm.get_model(path)
    hf = load_hf(path)
    k, n, eos = args.draft_layers, args.max_new_tokens, tok.eos_id
    ours_draft, hf_draft = llm.ModelDraft(llm.truncated_model(net, k)), hf_truncated(hf, k)

    def hf_generate(ids, **kw):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos, **kw)
        return out[0, len(ids):].tolist()

    rows = []

    def add(task, method, gamma, out, seconds, base_s, reference):
        rows.append({"task": task, "method": method, "γ": gamma, "new tokens": len(out),
                     "tokens/s": len(out) / seconds, "× own plain": base_s / seconds,
                     "same tokens as HF greedy": out == reference})

    for task, text in llm.SPECULATIVE_TASKS.items():
        ids = tok.encode_chat([{"role": "user", "content": text}])
        ref, hf_s = median_time(lambda ids=ids: hf_generate(ids), args.repeats)
        plain, ours_s = median_time(lambda ids=ids: llm.generate(net, ids, n, stop_ids=[eos]), args.repeats)
        add(task, "HF generate (plain)", "", ref, hf_s, hf_s, ref)
        add(task, "ours generate (plain)", "", plain, ours_s, ours_s, ref)
        for g in args.gammas:
            lookup = dict(prompt_lookup_num_tokens=g, max_matching_ngram_size=3)
            out, s = median_time(lambda ids=ids, kw=lookup: hf_generate(ids, **kw), args.repeats)
            add(task, "HF prompt lookup", g, out, s, hf_s, ref)
            out, s = median_time(lambda ids=ids, g=g: llm.speculative_generate(
                net, llm.NgramDraft(3), ids, n, gamma=g, stop_ids=[eos])[0], args.repeats)
            add(task, "ours prompt lookup", g, out, s, ours_s, ref)
            hf_draft.generation_config.num_assistant_tokens = g
            hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
            out, s = median_time(lambda ids=ids: hf_generate(ids, assistant_model=hf_draft), args.repeats)
            add(task, f"HF assistant ({k} layers)", g, out, s, hf_s, ref)
            out, s = median_time(lambda ids=ids, g=g: llm.speculative_generate(
                net, ours_draft, ids, n, gamma=g, stop_ids=[eos])[0], args.repeats)
            add(task, f"ours self-draft ({k} layers)", g, out, s, ours_s, ref)
    print(llm.format_table(rows, f"Speculative decoding, SmolLM2-135M fp32, greedy, {n} new tokens at most; "
                                 f"{platform.machine()} CPU, {torch.get_num_threads()} threads; median of "
                                 f"{args.repeats} (measured)"))


if __name__ == "__main__":
    main()
