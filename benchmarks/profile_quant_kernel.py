"""One weight-only quantized product at batch 1 on a GPU, timed and ready for Nsight Compute.

    python benchmarks/profile_quant_kernel.py [--shape 12288 4096]
    ncu --clock-control none --profile-from-start off --set full -o w4 \\
        python benchmarks/profile_quant_kernel.py --ncu [--shape 12288 4096]

Quantizes a random weight of --shape (N, K) (default: LLaMA-2-7B's fused q/k/v) to INT4 in groups of 128
and to INT8 per channel, lets `triton_quant_matmul` tune its launch configuration for one bf16 row of x,
and prints each product's time (back to back in a CUDA graph over weight copies that overflow L2:
`time_matvec_configs`) beside bf16 cuBLAS, with the bytes each reads per µs. With --ncu it then launches
the tuned INT4 kernel twice between `cudaProfilerStart` and `cudaProfilerStop`, so that ncu with
--profile-from-start off records those two launches and not the tuning before them.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from _common import load_lesson


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[12288, 4096], metavar=("N", "K"))
    ap.add_argument("--ncu", action="store_true", help="after tuning: two INT4 launches in a profiler range")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_quant_kernel.py times Triton kernels on a CUDA GPU; none is visible here.")
        return 0
    llm = load_lesson()
    torch.manual_seed(0)
    N, K = args.shape
    w = torch.randn(N, K, device="cuda") * 0.02
    q4, q8 = llm.quantize_int4(w, group_size=128), llm.quantize_int8(w)
    wb = w.to(torch.bfloat16)
    del w
    x = torch.randn(1, K, device="cuda").to(torch.bfloat16)

    def product(qw):
        return lambda cfg, codes=qw.codes: llm.triton_quant_matmul(x, codes, qw.scales, qw.offsets, qw.bits,
                                                                   qw.group_size, K)

    for qw in (q4, q8):
        product(qw)(None)  # tunes the launch configuration for this shape
    torch.cuda.synchronize()
    if args.ncu:
        torch.cuda.profiler.start()
        for _ in range(2):
            product(q4)(None)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return 0
    rows = []
    for name, qw in (("INT4 g128", q4), ("INT8 per channel", q8)):
        us = llm.time_matvec_configs(product(qw), qw.codes, configs=[None])[0]
        key = llm.quant_tuning_key(x, N, K, qw.bits, qw.group_size)
        rows.append({"product": name, "config": str(llm.QUANT_TUNED[key]), "µs": us,
                     "MB read": qw.nbytes / 1e6, "TB/s": qw.nbytes / us / 1e6})
    us = llm.time_matvec_configs(lambda cfg, w=wb: F.linear(x, w), wb, configs=[None])[0]
    rows.append({"product": "bf16 (cuBLAS)", "config": "", "µs": us, "MB read": wb.nbytes / 1e6,
                 "TB/s": wb.nbytes / us / 1e6})
    print(llm.format_table(rows, f"One row of x times a {N}×{K} weight on {torch.cuda.get_device_name()} "
                                 "(measured, CUDA graph over weight copies that overflow L2)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
