"""§8 on a GPU with real weights: SmolLM2 in INT8 and INT4 g128 (round-to-nearest, the head INT8)
decoded through the Triton kernels of Appendix D, against the same codes dequantized into a plain
bf16 model, and the quantized model's perplexity on the GPU against the CPU's.

    python benchmarks/check_quantized_gpu.py [--model F.gguf] [--new-tokens 48]

The codes are made once, on the CPU, from the fp32 weights; the GPU model holds those codes and
bf16 embedding and norms. Per format:
- greedy tokens of the quantized model (`static_generate`, mode graph: every projection of a step
  runs the kernels) and of the dequantized bf16 model (`F.linear`) for a few chat prompts: tokens
  that agree before the first difference, and at a difference the dequantized model's margin between
  its top two logits there (a near tie lets bf16 rounding flip the pick);
- the largest difference between the two models' logits for one prompt's prefill run as steps of
  at most 32 tokens (kernels) and as one step (dequantized);
- perplexity on the evaluation slice (1,024 tokens, windows of 512): on the GPU in bf16 through the
  kernels (each window fed as steps of 32 tokens into a KV cache), on the CPU in fp32 (the
  dequantize-then-matmul reference), and their ratio (target: within 1%).
"""

import argparse
import copy
import math

import torch
import torch.nn.functional as F
from _common import load_lesson

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a KV cache is in one sentence.", "List three prime numbers."]


def dequantized_copy(llm, qmodel):
    """The quantized model with each QuantizedLinear replaced by an nn.Linear holding its dequantized
    weight, in the model's dtype: the same numbers, multiplied by cuBLAS."""
    ref = copy.deepcopy(qmodel)
    for name, m in list(ref.named_modules()):
        if isinstance(m, llm.QuantizedLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=False, device=m.codes.device,
                                  dtype=ref.dtype)
            lin.weight.data.copy_(m.weight_dequantized())
            llm._replace_module(ref, name, lin)
    return ref


@torch.inference_mode()
def logits_in_steps(llm, net, ids, step=32):
    """Logits (T, V) of `ids` fed into a KV cache `step` tokens at a time (each step ≤ 32 rows: the
    quantized layers run the kernels)."""
    cache = llm.ContiguousKVCache(net.cfg, 1, len(ids), net.device, net.dtype)
    tokens, out = torch.tensor(ids, device=net.device), []
    for s in range(0, len(ids), step):
        n = min(step, len(ids) - s)
        positions, meta = cache.metadata_at([0], [s], [n])
        out.append(net(tokens[s:s + n], positions, meta, cache).float())
    return torch.cat(out)


def perplexity_in_steps(llm, net, ids, window=512):
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            break
        logits = logits_in_steps(llm, net, chunk)
        target = torch.tensor(chunk[1:], device=net.device)
        nll += float(F.cross_entropy(logits[:-1], target, reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    llm = load_lesson()
    net_cpu, tok = llm.load_model(args.model, device="cpu")
    ids_eval = llm.evaluation_tokens(tok)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in PROMPTS]
    stop = [tok.eos_id]
    rows = []
    for label, bits in (("INT8 per channel", 8), ("INT4 g128 (head INT8)", 4)):
        q_cpu = llm.quantize_model(net_cpu, llm.rtn_quantizer(bits, 128))
        ppl_cpu = llm.evaluate_perplexity(q_cpu, ids_eval, show_progress=False)
        q_gpu = copy.deepcopy(q_cpu).to("cuda")  # codes, scales, offsets move unchanged
        for p in q_gpu.parameters():  # embedding and norms in bf16
            p.data = p.data.to(torch.bfloat16)
        ref = dequantized_copy(llm, q_gpu)
        calls = {"n": 0}
        inner = llm.triton_quant_matmul

        def counting(*a, calls=calls, inner=inner, **k):
            calls["n"] += 1
            return inner(*a, **k)

        llm.triton_quant_matmul = counting
        try:
            got = llm.static_generate(q_gpu, prompts, args.new_tokens, mode="graph", stop_ids=stop)
        finally:
            llm.triton_quant_matmul = inner
        want = llm.static_generate(ref, prompts, args.new_tokens, mode="graph", stop_ids=stop)
        agree, total, margins = 0, 0, []
        for p, g, w in zip(prompts, got, want):
            n = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            agree += n
            total += max(len(g), len(w))
            if n < min(len(g), len(w)):
                with torch.inference_mode():
                    logits = logits_in_steps(llm, ref, p + w[:n], step=len(p) + n)[-1]
                top2 = logits.topk(2).values
                margins.append(float(top2[0] - top2[1]))
        lq = logits_in_steps(llm, q_gpu, prompts[0])
        lr = logits_in_steps(llm, ref, prompts[0], step=len(prompts[0]))
        ppl_gpu = perplexity_in_steps(llm, q_gpu, ids_eval)
        rows.append({"format": label, "kernel calls (graph capture + eager)": calls["n"],
                     "greedy tokens equal": f"{agree}/{total}",
                     "margins at first difference": ", ".join(f"{m:.3f}" for m in margins) or "-",
                     "max |Δ logits| / max |logits|": float((lq - lr).abs().max() / lr.abs().max()),
                     "ppl GPU bf16 (kernels)": ppl_gpu, "ppl CPU fp32": ppl_cpu,
                     "GPU / CPU": ppl_gpu / ppl_cpu})
        print(rows[-1], flush=True)
    print(llm.format_table(rows, f"SmolLM2 quantized on {torch.cuda.get_device_name()}: Triton kernels "
                                 "vs the same codes dequantized, and perplexity GPU vs CPU (measured)"))


if __name__ == "__main__":
    main()
