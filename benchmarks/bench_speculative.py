"""Speculative decoding: the lesson's `speculative_generate` vs HF transformers' assisted generation,
same GGUF weights (fp32), same prompts, greedy, side by side in one run.

    python benchmarks/bench_speculative.py [--gammas 4 8] [--max-new-tokens 64] [--repeats 3]
                                           [--draft-layers 7] [--static compile]
    python benchmarks/bench_speculative.py --device cuda [--model F.gguf] [--dtype bf16]
                                           [--mode compile+graph] [--draft-gammas 2 4]
    python benchmarks/bench_speculative.py --device cuda --shapes-only [--shapes-mode graph compile+graph]
                                           [--also-masked]

On a GPU (`--device cuda`) the table is ours only: plain decoding (`generate`, CUDA graph per step;
`static_generate` compiled and captured, our fastest), then speculation through static verify steps
(Appendix D) in `--mode`: prompt lookup for each γ and the self-draft, on both tasks; then the cost of
one verify step of γ + 1 rows against one decode step (steady state, 200 graph replays timed by CUDA
events), for the model and for LLaMA-2-7B shapes (random weights: no useful α, but the cost is real).

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


def replay_ms(fn, n=200):
    """ms per call of `fn` (graph replays), back to back, timed by CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def verify_cost(llm, model, gammas, mode, context=128, masked=False):
    """Per γ: one verify step of γ + 1 rows vs one decode step, both replayed from graphs at batch 1.
    `masked`: the verify's attention as on a CPU (masked, fp32, over the whole cache) instead of
    §7's kernel with each row a sequence of its own."""
    rows = []
    with llm.kept_decoder(model, 1, context + 64, mode) as dec, torch.inference_mode():
        dec.tokens.fill_(1)
        dec.positions.fill_(context)
        step = replay_ms(lambda: dec._run())
        kept, dec._verify = dec.attention_op, {}  # verify steps built afresh, with this attention
        dec.attention_op = None if masked else kept
        try:
            for g in gammas:
                values = [1] * (g + 1) + [context, g]
                ms = replay_ms(lambda v=values: llm._verify(dec, v))
                rows.append({"model": model.cfg.name, "mode": mode,
                             "verify attention": "masked" if masked else "decode kernel, a sequence a row",
                             "γ + 1 rows": g + 1, "decode step (ms)": step, "verify step (ms)": ms,
                             "verify / decode": ms / step})
        finally:
            dec.attention_op, dec._verify = kept, {}
    return rows


def spec_row(task, method, gamma, out, seconds, fast_s, plain, stats=None):
    agree = sum(a == b for a, b in zip(out, plain)) / max(1, len(plain))
    return {"task": task, "method": method, "γ": gamma, "new tokens": len(out),
            "tokens/s": len(out) / seconds,
            "× compile+graph plain": fast_s / seconds, "α": stats.acceptance_rate if stats else float("nan"),
            "tokens/round": stats.tokens_per_round if stats else float("nan"),
            "same tokens as plain": out == plain, "agree with plain %": 100 * agree}


def main_gpu(args, llm):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shapes_cost = []
    if args.shapes:  # first: graph replays need no compile, so this table comes within a minute
        cfg = llm.ModelConfig.from_name(args.shapes)
        with torch.device("cuda"):
            big = llm.Transformer(cfg).to(torch.bfloat16).eval()
        for mode in args.shapes_mode:
            cost = verify_cost(llm, big, args.shapes_gammas, mode)
            if args.also_masked:
                cost += verify_cost(llm, big, args.shapes_gammas, mode, masked=True)
            title = (f"One verify step vs one decode step at batch 1, {args.shapes} shapes, {mode}, "
                     f"{torch.cuda.get_device_name()} (measured, CUDA events)")
            print(llm.format_table(cost, title), flush=True)
            shapes_cost += cost
        del big
        torch.cuda.empty_cache()
        if args.shapes_only:
            return
    net, tok = llm.get_model(args.model, "cuda")
    net = net.to(dtype)
    n, eos, rows, k = args.max_new_tokens, tok.eos_id, [], args.draft_layers
    drafts = [("prompt lookup", llm.NgramDraft(3), args.gammas),
              (f"self-draft ({k} layers)", llm.ModelDraft(llm.truncated_model(net, k)), args.draft_gammas)]
    for task, text in llm.SPECULATIVE_TASKS.items():
        if args.tasks and task not in args.tasks:
            continue
        ids = tok.encode_chat([{"role": "user", "content": text}])
        plain, plain_s = median_time(lambda ids=ids: llm.generate(net, ids, n, stop_ids=[eos]), args.repeats)
        fast, fast_s = median_time(lambda ids=ids: llm.static_generate(net, [ids], n, "compile+graph",
                                                                       stop_ids=[eos])[0], args.repeats)
        rows.append(spec_row(task, "generate (graph per step)", "", plain, plain_s, fast_s, plain))
        rows.append(spec_row(task, "static_generate compile+graph", "", fast, fast_s, fast_s, plain))
        print(rows[-2], rows[-1], sep="\n", flush=True)  # rows as they come: compiles take minutes
        for name, draft, gammas in drafts:
            for g in gammas:
                stats = []

                def run(g=g, draft=draft, ids=ids, stats=stats):
                    out, st = llm.speculative_generate(net, draft, ids, n, gamma=g, stop_ids=[eos],
                                                       static=args.mode)
                    stats.append(st)
                    return out

                out, s = median_time(run, args.repeats)
                rows.append(spec_row(task, f"speculative, {name}, {args.mode}", g, out, s, fast_s, plain,
                                     stats[-1]))
                print(rows[-1], flush=True)
    title = (f"Speculative decoding on {torch.cuda.get_device_name()}, {net.cfg.name} {args.dtype}, greedy, "
             f"{n} new tokens at most; median of {args.repeats} (measured)")
    print(llm.format_table(rows, title))
    cost = verify_cost(llm, net, sorted(set(args.gammas) | {8}), args.mode) + shapes_cost
    print(llm.format_table(cost, f"One verify step vs one decode step at batch 1, {args.mode} ({args.shapes} "
                                 f"shapes: {' and '.join(args.shapes_mode)}), {torch.cuda.get_device_name()} "
                                 "(measured, CUDA events)"))

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gammas", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-layers", type=int, default=7)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--static", default=None, help="CPU: also static verify steps in this mode (compile)")
    ap.add_argument("--model", default="smollm2", help="GPU: the GGUF file (or smollm2)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="GPU: the weights' dtype")
    ap.add_argument("--mode", default="compile+graph", help="GPU: the verify steps' StaticDecoder mode")
    ap.add_argument("--draft-gammas", type=int, nargs="+", default=[2, 4], help="GPU: γ for the self-draft")
    ap.add_argument("--shapes", default="llama-2-7b", help="GPU: also the verify cost at these shapes")
    ap.add_argument("--shapes-mode", nargs="+", default=["graph"], help="GPU: their modes (compiles: slow)")
    ap.add_argument("--shapes-only", action="store_true", help="GPU: only the verify cost at --shapes")
    ap.add_argument("--also-masked", action="store_true",
                    help="GPU: the verify cost at --shapes also with the masked attention (as on a CPU)")
    ap.add_argument("--shapes-gammas", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tasks", nargs="+", default=None, help="GPU: only these tasks of SPECULATIVE_TASKS")
    args = ap.parse_args()

    llm = load_lesson()
    if args.device == "cuda":
        main_gpu(args, llm)
        return
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
        if args.static:
            out, static_s = median_time(lambda ids=ids: llm.static_generate(net, [ids], n, args.static,
                                                                            stop_ids=[eos])[0], args.repeats)
            add(task, f"ours static_generate {args.static} (plain)", "", out, static_s, ours_s, ref)
        for g in args.gammas:
            lookup = dict(prompt_lookup_num_tokens=g, max_matching_ngram_size=3)
            out, s = median_time(lambda ids=ids, kw=lookup: hf_generate(ids, **kw), args.repeats)
            add(task, "HF prompt lookup", g, out, s, hf_s, ref)
            out, s = median_time(lambda ids=ids, g=g: llm.speculative_generate(
                net, llm.NgramDraft(3), ids, n, gamma=g, stop_ids=[eos])[0], args.repeats)
            add(task, "ours prompt lookup", g, out, s, ours_s, ref)
            if args.static:
                out, s = median_time(lambda ids=ids, g=g: llm.speculative_generate(
                    net, llm.NgramDraft(3), ids, n, gamma=g, stop_ids=[eos], static=args.static)[0],
                    args.repeats)
                add(task, f"ours prompt lookup, static {args.static}", g, out, s, ours_s, ref)
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
