"""Batch-1 decode speed of every weight format of §8, side by side in one run, plus llama.cpp on
the same GGUF file when `llama-cpp-python` is installed.

    python benchmarks/bench_quantized_decode.py [--new-tokens 32] [--repeats 3]

Rows: fp32 (the dequantized GGUF), INT8 per channel, INT4 g128 and g32 (GPTQ and AWQ produce the
same storage as RTN at the same bits and group, so they decode at the same speed), each through
the three matmul paths of `QuantizedLinear`: PyTorch's low-bit CPU kernels with bf16 activations
(where this build has them), the fused matvec compiled by torch.compile, and dequantize-then-matmul.
tok/s is the median over `--repeats` runs of generating `--new-tokens` greedily after a warm-up, the
prompt's prefill subtracted (`decode_speed`). Then fp32, INT8 and INT4 g128 with §9's whole decode
step compiled (`static_generate(..., "compile")`), the fastest matmul path inside it.

llama.cpp is optional, not a requirement: `pip install llama-cpp-python` (it compiles llama.cpp;
about 15 minutes on 2 cores) adds a row with the same prompt, the same number of threads and the
same file. Where the native build dies with "Illegal instruction" on its first decode (seen on a
virtual machine whose CPU lists AMX), build it without AMX:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
      -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      pip install --no-binary llama-cpp-python llama-cpp-python
"""

import argparse
import os
import platform
import statistics
import time

import torch
from _common import load_lesson


def llama_cpp_speed(path, prompt_ids, new_tokens, repeats, threads):
    """tok/s of llama.cpp's decode on the same file and prompt (None when not installed)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False)
    speeds = []
    for _ in range(repeats + 1):
        llm.reset()
        llm.eval(prompt_ids)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        speeds.append(new_tokens / (time.perf_counter() - t0))
    return statistics.median(speeds[1:])


def compiled_step_speed(llm, model, prompt, new_tokens):
    """tok/s of §9's static decode step compiled with torch.compile (the build, a minute or two, not
    counted), the prefill subtracted."""
    llm.static_generate(model, [prompt], 4, "compile")  # builds
    t0 = time.perf_counter()
    llm.static_generate(model, [prompt], new_tokens, "compile")
    t1 = time.perf_counter()
    llm.static_generate(model, [prompt], 1, "compile")
    return (new_tokens - 1) / ((t1 - t0) - (time.perf_counter() - t1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = load_lesson()
    path = llm.resolve_model("smollm2")
    net, tok = llm.get_model(path)
    prompt = tok.encode_chat([{"role": "user", "content": "What is a KV cache?"}])
    rows = []

    def add(name, model, bits_per_weight):
        speed = llm.decode_speed(model, prompt, args.new_tokens, args.repeats)
        rows.append({"format": name, "bits/weight": bits_per_weight, "decode (tok/s)": speed})
        print(rows[-1], flush=True)

    add("fp32 (dequantized GGUF)", net, 32.0)
    formats = [("INT8 per channel", llm.rtn_quantizer(8)), ("INT4 g128", llm.rtn_quantizer(4, 128)),
               ("INT4 g32", llm.rtn_quantizer(4, 32))]
    paths = (["PyTorch low-bit kernel, bf16 activations"] if llm.builtin_lowbit_kernels() else []) + \
        ["fused matvec, compiled", "dequantize then matmul"]
    for name, quantizer in formats:
        q = llm.quantize_model(net, quantizer)
        lins = [m for m in q.modules() if isinstance(m, llm.QuantizedLinear)]
        bpw = sum(m.qw.bits_per_weight * m.qw.shape[0] * m.qw.shape[1] for m in lins) / sum(
            m.qw.shape[0] * m.qw.shape[1] for m in lins)
        for kernel in paths:
            for m in lins:  # the path each layer takes (a layer the kernel cannot take keeps the next)
                m.builtin = m.builtin and kernel.startswith("PyTorch")
                m.fast = not kernel.startswith("dequantize")
            add(f"{name}, {kernel}", q, bpw)
    for name, quantizer in [("fp32", None), ("INT8 per channel", llm.rtn_quantizer(8)),
                            ("INT4 g128", llm.rtn_quantizer(4, 128))]:
        model = net if quantizer is None else llm.quantize_model(net, quantizer)
        rows.append({"format": f"{name}, whole decode step compiled (§9)", "bits/weight": float("nan"),
                     "decode (tok/s)": compiled_step_speed(llm, model, prompt, args.new_tokens)})
    threads = torch.get_num_threads()
    cpp = llama_cpp_speed(path, prompt, args.new_tokens, args.repeats, threads)
    if cpp is None:
        print("llama-cpp-python is not installed: no llama.cpp row (pip install llama-cpp-python to add it)")
    else:
        rows.append({"format": "llama.cpp, the GGUF as stored (Q4_1)", "bits/weight": 5.0,
                     "decode (tok/s)": cpp})
    base = rows[0]["decode (tok/s)"]
    for r in rows:
        r["× fp32"] = r["decode (tok/s)"] / base
    print(llm.format_table(rows, f"Batch-1 decode, SmolLM2-135M, {platform.machine()} CPU, "
                                 f"{os.cpu_count()} cores, {threads} threads, median of {args.repeats} "
                                 "(measured)"))


if __name__ == "__main__":
    main()
