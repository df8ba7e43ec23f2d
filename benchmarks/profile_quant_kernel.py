"""Two launches of the tuned INT4 product at batch 1, for Nsight Compute to record.

    ncu --clock-control none --profile-from-start off --set full -o w4 \\
        python benchmarks/profile_quant_kernel.py [--shape 12288 4096]

Quantizes a random weight of --shape (N, K) (default: LLaMA-2-7B's fused q/k/v) to INT4 in groups of 128,
lets `triton_quant_matmul` tune its launch configuration for one bf16 row of x, then launches the tuned
kernel twice between `cudaProfilerStart` and `cudaProfilerStop`: with --profile-from-start off ncu records
those two launches and not the tuning before them. Each product's time beside INT8 and bf16 cuBLAS is
`bench_gpu_decode.py --quant int8 int4`'s first table.
"""

import argparse
import sys

import torch
from _common import load_lesson


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[12288, 4096], metavar=("N", "K"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_quant_kernel.py profiles a Triton kernel on a CUDA GPU; none is visible here.")
        return 0
    llm = load_lesson()
    torch.manual_seed(0)
    N, K = args.shape
    qw = llm.quantize_int4(torch.randn(N, K, device="cuda") * 0.02, group_size=128)
    x = torch.randn(1, K, device="cuda").to(torch.bfloat16)

    def product():
        return llm.triton_quant_matmul(x, qw.codes, qw.scales, qw.offsets, 4, 128, K)

    product()  # tunes the launch configuration for this shape
    torch.cuda.synchronize()
    print("tuned configuration:", llm.QUANT_TUNED[llm.quant_tuning_key(x, N, K, 4, 128)], flush=True)
    torch.cuda.profiler.start()
    for _ in range(2):
        product()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
