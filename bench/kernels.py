"""Kernel latency of one layer: fp32 MatMul, onnxruntime's MatMulNBits, and lrqgraph's native ops.

Per layer shape K x N (the issue's four by default) and batch 1, 8 and 128, in one run with the
models taking turns (onnxruntime CPU, 2 threads):
 - fp32 MatMul; MatMulNBits 4-bit dense (block 32) at accuracy_level 0 (float activations, what
   onnxruntime's quantizer writes) and at level 4 (int8 activations, its fastest kernel);
 - lrq::QMatMul dense at 2 and 4 bits;
 - for 2.5, 3 and 4 bits per weight: low-rank factors L·R (4-bit, block 64, rank from the budget)
   as the chain of two MatMulNBits (levels 0 and 4) and as one lrq::QLowRankMatMul; at 3 bits
   also Q + L·R (2-bit Q, 4-bit factors) as MatMulNBits nodes + Add and as one fused node;
 - lrq::KashinMatMul at 4 bits (codes into 16 (u, v) centroids, Hadamard transforms of X and Y).
"x best MNB chain": the fused op's time over the faster of the two MatMulNBits forms of its factors.
lrq nodes use int8 activations (accuracy_level 4, the lrq lowering's default). "bits/weight" counts
every stored byte (fp16 scales). This machine's L3 (32 MB) holds most of these layers, so a
layer called again and again reads its weights from cache: "ms" is that (warm) time. "cold ms"
(batch 1) rotates calls over enough copies of each model (≥ 96 MB in all) that every call reads
its weights from memory, as a layer of a model larger than the caches does; "GB/s" is the stored
bytes over the cold time; "of read BW" is that over the read bandwidth measured in the same run
(onnxruntime's ReduceSum over 512 MB with the same 2 threads, the best of 5). Weights are random
codes and scales: latency does not depend on their values.

    python bench/kernels.py [--shapes 4096x4096] [--runs 40] [--isa avx2]

``--isa avx2`` (or ``portable``) caps the instruction set of the lrq kernels for the whole run
(``LRQGRAPH_KERNELS``, read when a session is created): on an AVX-512 VNNI machine this times the
AVX2 int8 kernel that CPUs without VNNI run. onnxruntime keeps its own best code, so those rows
are a pessimistic view of lrq on such CPUs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import random_factor  # noqa: E402

import builders  # noqa: E402
from lrqgraph import FactorizeConfig, OptimizeConfig  # noqa: E402
from lrqgraph.io import tensor_bytes  # noqa: E402
from lrqgraph.model import ModelState  # noqa: E402
from lrqgraph.numerics import QuantizedTensor, Representation  # noqa: E402
from lrqgraph.numerics.kashin import KashinTensor  # noqa: E402
from lrqgraph.numerics.transforms import MatrixTransform  # noqa: E402
from lrqgraph.methods.lowrank import choose_rank  # noqa: E402
from lrqgraph.passmanager import Context, PassManager  # noqa: E402
from lrqgraph.plan import use_plans  # noqa: E402
from lrqgraph.report import table  # noqa: E402
from lrqgraph.runtime import interleaved_latency_ms  # noqa: E402

SHAPES = ("384x1536", "576x1536", "4096x4096", "4096x11008")
BASELINE = "MatMulNBits 4b g32"
COLD_BYTES = 96e6  # 3x the L3 of this machine
DENSE = dict(method="rtn", block_size=32, scale_dtype="float16")
LOWRANK = dict(method="svd", bits=4, block_size=64, scale_dtype="float16")
QLR = dict(method="qlr", bits=2, lr_bits=4, block_size=32, iters=1, scale_dtype="float16")


def variants() -> list[tuple[str, str, dict, int]]:
    """(label, lowering, factorize options, accuracy level)."""
    out = [(BASELINE, "ort", dict(DENSE, bits=4), 0),
           (f"{BASELINE} int8", "ort", dict(DENSE, bits=4), 4),
           ("lrq QMatMul 2b g32", "lrq", dict(DENSE, bits=2), 4),
           ("lrq QMatMul 2b g16", "lrq", dict(DENSE, bits=2, block_size=16), 4),
           ("lrq QMatMul 4b g32", "lrq", dict(DENSE, bits=4), 4)]
    for bpw in (2.5, 3.0, 4.0):
        lr = dict(LOWRANK, target_bpw=bpw)
        out += [(f"MNB chain L·R {bpw:g}", "ort", lr, 0), (f"MNB chain L·R {bpw:g} int8", "ort", lr, 4),
                (f"lrq L·R {bpw:g}", "lrq", lr, 4)]
    qlr = dict(QLR, target_bpw=3.0)
    out += [("MNB Q+L·R 3", "ort", qlr, 0), ("MNB Q+L·R 3 int8", "ort", qlr, 4), ("lrq Q+L·R 3", "lrq", qlr, 4)]
    out += [("lrq Kashin 4b", "lrq", dict(method="kashin", bits=4), 0)]
    return out


def read_bandwidth_gbs(megabytes: int = 512, repeats: int = 5, threads: int = 2) -> float:
    """Bytes read per second by onnxruntime's ReduceSum over a float buffer far larger than the
    caches, with the kernels' thread count: what a layer that streams its weights can reach."""
    from onnx import TensorProto, helper

    import onnxruntime as ort

    n = megabytes * (1 << 20) // 4
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)], "read",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [threads, n // threads])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
                                options, providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((threads, n // threads), np.float32)}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return 4 * n / best / 1e9


def random_plan(k: int, n: int, factorize: dict, rng: np.random.Generator) -> Representation:
    """The representation ``factorize`` asks for, with random codes: latency does not depend on
    values, and factorizing 4096 x 11008 layers for real takes minutes."""
    cfg = FactorizeConfig(**factorize)
    if cfg.method == "kashin":  # random (u, v) pairs, a real randomized Hadamard transform
        pairs = QuantizedTensor(codes=rng.integers(0, 1 << cfg.bits, (k, n), dtype=np.uint8), scales=None,
                                zero_points=None, bits=cfg.bits, block_size=k,
                                codebook=rng.standard_normal((1 << cfg.bits, 2)).astype(np.float32))
        return Representation(((KashinTensor(pairs, 1.0, MatrixTransform("hadamard", (k, n))),),), "kashin")
    if cfg.method == "rtn":
        return Representation(((random_factor(k, n, cfg.bits, cfg.block_size, rng),),), "rtn")
    rank, _ = choose_rank(cfg, k, n, cfg.scales_for("float32"))
    lr_bits = cfg.lr_bits if cfg.method == "qlr" else cfg.bits
    left = random_factor(k, rank, lr_bits, cfg.block_size, rng)
    right = random_factor(rank, n, lr_bits, min(cfg.block_size, 1 << (rank.bit_length() - 1)), rng)
    chains = [(left, right)]
    if cfg.method == "qlr":
        chains.insert(0, (random_factor(k, n, cfg.bits, cfg.block_size, rng),))
    return Representation(tuple(chains), cfg.method, rank=rank)


def build(shape: str, tmp: Path) -> list[tuple[str, Path, float]]:
    k, n = map(int, shape.split("x"))
    fp32 = builders.matmul_model(k, n)
    models = [("fp32 MatMul", tmp / f"{shape}-fp32.onnx", 4.0 * k * n)]
    onnx.save(fp32, models[0][1])
    plans: dict[str, Representation] = {}  # one plan per set of options, lowered both ways
    for label, lowering, factorize, level in variants():
        key = repr(sorted(factorize.items()))
        if key not in plans:
            plans[key] = random_plan(k, n, factorize, np.random.default_rng(len(plans)))
        ctx = Context(ModelState(fp32), OptimizeConfig(lowering=lowering, accuracy_level=level), original=fp32)
        PassManager("discover").run(ctx)
        use_plans(ctx, {"W": plans[key]})
        PassManager(f"lower({lowering}),cleanup").run(ctx)
        path = tmp / f"{shape}-{label.replace(' ', '_').replace('·', '')}.onnx"
        model = ctx.model.to_onnx()
        onnx.save(model, path)
        models.append((label, path, float(tensor_bytes(model))))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--batches", default="1,8,128")
    parser.add_argument("--isa", choices=("avx2", "portable"),
                        help="cap the lrq kernels' instruction set (sets LRQGRAPH_KERNELS for this run)")
    args = parser.parse_args()
    if args.isa:
        os.environ["LRQGRAPH_KERNELS"] = args.isa
    print(f"lrq kernels: LRQGRAPH_KERNELS={os.environ.get('LRQGRAPH_KERNELS', '(unset: best the CPU has)')}")
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth (onnxruntime ReduceSum, 2 threads): {bandwidth:.1f} GB/s")
    tmp = Path(tempfile.mkdtemp(prefix="lrqgraph-kernels-"))
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        models = build(shape, tmp)
        labels = [label for label, _, _ in models]
        for batch in map(int, args.batches.split(",")):
            feeds = {"x": np.random.default_rng(0).standard_normal((batch, k)).astype(np.float32)}
            paths = [p for _, p, _ in models]
            times = interleaved_latency_ms(paths, feeds, args.runs if batch < 128 else 10)
            by_label = dict(zip(labels, times))
            cold = {}
            if batch == 1:
                copies = [min(32, max(1, int(np.ceil(COLD_BYTES / nbytes)))) for _, _, nbytes in models]
                cold = dict(zip(labels, interleaved_latency_ms(paths, feeds, 4 * max(copies), copies=copies,
                                                               rounds=2, warmup=1)))
            for label, _, nbytes in models:
                ms = by_label[label]
                chain = None
                if "L·R" in label and label.startswith("lrq"):  # the faster MatMulNBits form of the factors
                    name = label.replace("lrq ", "MNB chain ").replace("MNB chain Q+", "MNB Q+")
                    chain = min((name, f"{name} int8"), key=by_label.__getitem__)
                cold_ms = cold.get(label)
                rows.append([shape, batch, label, f"{nbytes * 8 / (k * n):.3f}", f"{ms:.3f}",
                             f"{ms / by_label['fp32 MatMul']:.2f}", f"{ms / by_label[BASELINE]:.2f}",
                             f"{ms / by_label[chain]:.2f}" if chain else "",
                             f"{cold_ms:.3f}" if cold_ms else "",
                             f"{cold_ms / cold['fp32 MatMul']:.2f}" if cold_ms else "",
                             f"{cold_ms / cold[BASELINE]:.2f}" if cold_ms else "",
                             f"{nbytes / cold_ms / 1e6:.1f}" if cold_ms else "",
                             f"{nbytes / cold_ms / 1e6 / bandwidth:.0%}" if cold_ms else ""])
            print("\n".join(" | ".join(map(str, r)) for r in rows[-len(models):]), flush=True)
    print(table(["K x N", "batch", "kernel", "bits/weight", "ms", "x fp32", f"x {BASELINE}", "x best MNB chain",
                 "cold ms", "cold x fp32", "cold x MNB", "cold GB/s", "of read BW"], rows))
    after = read_bandwidth_gbs()
    print(f"read bandwidth (onnxruntime ReduceSum, 2 threads): {bandwidth:.1f} GB/s before the timings, "
          f"{after:.1f} GB/s after ('of read BW' uses the first)")


if __name__ == "__main__":
    main()
