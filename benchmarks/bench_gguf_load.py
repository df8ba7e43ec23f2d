"""Open and dequantize the SmolLM2 GGUF: our reader vs gguf-py vs transformers, in one run.

    python benchmarks/bench_gguf_load.py
"""

import os
import time

import torch
from _common import load_lesson


def main() -> None:
    llm = load_lesson()
    path = llm.fetch_smollm2()
    rows = []

    t0 = time.perf_counter()
    f = llm.read_gguf(path)
    n = sum(f.dequantize(name).size for name in f.tensors)
    rows.append({"loader": "this lesson: read_gguf + dequantize", "seconds": time.perf_counter() - t0,
                 "values": n})

    import gguf
    from gguf.quants import dequantize

    t0 = time.perf_counter()
    r = gguf.GGUFReader(path)
    n = sum(dequantize(t.data, t.tensor_type).size for t in r.tensors)
    rows.append({"loader": "gguf-py: GGUFReader + quants.dequantize", "seconds": time.perf_counter() - t0,
                 "values": n})

    t0 = time.perf_counter()
    llm.model_from_gguf(path, device="cpu")
    rows.append({"loader": "this lesson: model_from_gguf (dequantize + build model)",
                 "seconds": time.perf_counter() - t0, "values": None})

    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    rows.append({"loader": "transformers: from_pretrained(gguf_file=...)",
                 "seconds": time.perf_counter() - t0, "values": None})

    base = rows[0]["seconds"]
    for r in rows:
        r["relative to ours (×)"] = r["seconds"] / base
    llm.print_table(rows, f"Opening and dequantizing {path.name} (CPU, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
