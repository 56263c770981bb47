"""Kernel latency of one layer: fp32 MatMul, onnxruntime's MatMulNBits and lrqgraph's lrq::QMatMul.

Layer shapes K x N from the issue, batch 1, 8 and 128, all models timed interleaved in one run
(onnxruntime CPU, 2 threads). "GB/s" is the weight bytes each model reads per call divided by its
time, beside this machine's memory bandwidth measured in the same run (numpy copy of 512 MB:
bytes read + written over time). Weights are random (latency does not depend on values).

    python bench/kernels.py [--shapes 4096x4096] [--runs 40]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import interleaved_latency_ms  # noqa: E402

import builders  # noqa: E402
import lrqgraph  # noqa: E402
from lrqgraph import FactorizeConfig, OptimizeConfig  # noqa: E402
from lrqgraph.io import tensor_bytes  # noqa: E402
from lrqgraph.report import table  # noqa: E402

SHAPES = ("384x1536", "576x1536", "4096x4096", "4096x11008")
VARIANTS = [  # (label, lowering, bits, block, scale dtype)
    ("MatMulNBits 4b g32", "ort", 4, 32, "auto"),
    ("MatMulNBits 4b g128", "ort", 4, 128, "auto"),
    ("lrq 4b g128 fp16", "lrq", 4, 128, "float16"),
    ("lrq 3b g64 fp16", "lrq", 3, 64, "float16"),
    ("lrq 2b g32 fp16", "lrq", 2, 32, "float16"),
]


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    src = np.ones(megabytes * (1 << 20) // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    bandwidth = memory_bandwidth_gbs()
    print(f"memory bandwidth (numpy copy): {bandwidth:.1f} GB/s")
    tmp = Path(tempfile.mkdtemp(prefix="lrqgraph-kernels-"))
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        fp32 = builders.matmul_model(k, n)
        models = [("fp32 MatMul", tmp / f"{shape}-fp32.onnx", 4.0 * k * n)]
        onnx.save(fp32, models[0][1])
        for label, lowering, bits, block, scales in VARIANTS:
            cfg = OptimizeConfig(lowering=lowering, factorize=FactorizeConfig(
                method="rtn", bits=bits, block_size=block, scale_dtype=scales))
            result = lrqgraph.run(fp32, cfg, passes=f"discover,factorize,lower({lowering}),cleanup")
            path = tmp / f"{shape}-{label.replace(' ', '_')}.onnx"
            onnx.save(result.model, path)
            models.append((label, path, float(tensor_bytes(result.model))))
        for batch in (1, 8, 128):
            feeds = {"x": np.random.default_rng(0).standard_normal((batch, k)).astype(np.float32)}
            times = interleaved_latency_ms([p for _, p, _ in models], feeds, args.runs if batch < 128 else 10)
            for (label, _, nbytes), ms in zip(models, times):
                rows.append([shape, batch, label, f"{nbytes * 8 / (k * n):.3f}", f"{ms:.3f}", f"{ms / times[0]:.2f}",
                             f"{ms / times[1]:.2f}", f"{nbytes / ms / 1e6:.1f}"])
            print("\n".join(" | ".join(map(str, r)) for r in rows[-len(models):]), flush=True)
    print(table(["K x N", "batch", "kernel", "bits/weight", "ms", "x fp32", "x MNB 4b g32", "GB/s"], rows))
    print(f"memory bandwidth (numpy copy, same run): {bandwidth:.1f} GB/s")


if __name__ == "__main__":
    main()
