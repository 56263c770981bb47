"""GPU latency of lrqgraph's CUDA kernels beside cuBLAS fp32 (torch.matmul), one layer at a time.

Shapes K x N from the issue, batch 1, 8 and 128; dense block-quantized codes and the low-rank
form at 3 bits per weight (4-bit factors, block 64, float16 scales). Weights are random codes
(latency does not depend on values); CUDA events, median of --runs calls after warm-up. onnxruntime
has no CUDA execution provider on the machines here (no onnxruntime-gpu), so MatMulNBits' CUDA
kernel is not in the table. "GB/s": stored weight bytes over the time (HBM reads at batch 1).

    python bench/cuda_kernels.py [--shapes 4096x4096] [--runs 100]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

from lrqgraph.numerics import QuantizedTensor
from lrqgraph.report import table
from lrqgraph.runtime import cuda_ops

sys.path.insert(0, os.path.dirname(__file__))
from common import random_factor  # noqa: E402

SHAPES = ("384x1536", "576x1536", "4096x4096", "4096x11008")


def stored_bytes(*factors: QuantizedTensor) -> int:
    return sum(f.storage_bits() for f in factors) // 8


def time_ms(fn, runs: int) -> float:
    import torch
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    import torch
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    if not cuda_ops.available():
        sys.exit("needs nvcc and a CUDA GPU visible to torch")
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        rank = int(3 * k * n / ((k + n) * (4 + 16 / 64))) // 16 * 16
        left, right = random_factor(k, rank, 4, 64, rng), random_factor(rank, n, 4, 64, rng)
        dense = {bits: random_factor(k, n, bits, 32, rng) for bits in (2, 4)}
        gpu = {name: cuda_ops.GpuFactor.of(f) for name, f in
               [("L", left), ("R", right), *((f"Q{b}", f) for b, f in dense.items())]}
        w = torch.randn(k, n, device="cuda")
        for batch in (1, 8, 128):
            x = torch.randn(batch, k, device="cuda")
            cases = [("cuBLAS fp32 matmul", 4 * k * n, lambda: torch.matmul(x, w)),
                     ("lrq QMatMul 4b g32", stored_bytes(dense[4]), lambda: cuda_ops.qmatmul(x, gpu["Q4"])),
                     ("lrq QMatMul 2b g32", stored_bytes(dense[2]), lambda: cuda_ops.qmatmul(x, gpu["Q2"])),
                     (f"lrq L·R 3 (rank {rank})", stored_bytes(left, right),
                      lambda: cuda_ops.lowrank(x, gpu["L"], gpu["R"]))]
            base = None
            for label, nbytes, fn in cases:
                ms = time_ms(fn, args.runs)
                base = base or ms
                rows.append([shape, batch, label, f"{nbytes * 8 / (k * n):.3f}", f"{ms * 1e3:.1f}",
                             f"{ms / base:.2f}", f"{nbytes / ms / 1e6:.0f}"])
            print("\n".join(" | ".join(map(str, r)) for r in rows[-len(cases):]), flush=True)
    print(f"device: {torch.cuda.get_device_name()}")
    print(table(["K x N", "batch", "kernel", "bits/weight", "µs", "x cuBLAS fp32", "GB/s"], rows))


if __name__ == "__main__":
    main()
