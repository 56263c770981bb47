"""Shared helpers for benchmarks: timing onnxruntime sessions and counting stored weight bytes."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from lrqgraph.io import tensor_bytes
from lrqgraph.numerics import QuantizedTensor
from lrqgraph.runtime import session


def interleaved_latency_ms(paths: list, feeds: dict[str, np.ndarray], runs: int, threads: int = 2,
                           rounds: int = 5, warmup: int = 3, copies: list[int] | None = None) -> list[float]:
    """Median wall time (ms) of one ``run`` call per model.

    The models take turns, ``runs / rounds`` calls each per round, so that noise from other load
    on the machine falls on all of them alike and their ratios stay meaningful. ``copies[i]``
    sessions of model i are called in rotation, so that with enough copies each call finds its
    weights evicted from the caches by the others (cold, memory-bound calls).
    """
    copies = copies or [1] * len(paths)
    # Idle sessions' worker threads would spin and steal the cores from the one being timed.
    sessions = [[session(str(p), threads=threads, config={"session.intra_op.allow_spinning": "0"})
                 for _ in range(c)] for p, c in zip(paths, copies)]
    for group in sessions:
        for sess in group:
            for _ in range(warmup):
                sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for group, bucket in zip(sessions, times):
            for i in range(per_round):
                sess = group[i % len(group)]
                start = time.perf_counter()
                sess.run(None, feeds)
                bucket.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def rewritten_bpw(model_path, fp32_path, weight_names: list[str]) -> float:
    """Bits per weight of the layers a tool rewrote, counting every byte they now store.

    Everything else in the model is untouched, so the layers' bytes are the model's initializer
    bytes minus those of the fp32 model without the rewritten weights.
    """
    fp32 = onnx.load(str(fp32_path))
    sizes = {t.name: int(np.prod(t.dims)) for t in fp32.graph.initializer}
    params = sum(sizes[n] for n in weight_names)
    untouched = tensor_bytes(fp32) - 4 * params
    return (tensor_bytes(onnx.load(str(model_path))) - untouched) * 8 / params


def random_factor(k: int, n: int, bits: int, block: int, rng: np.random.Generator) -> QuantizedTensor:
    """A quantized [k, n] factor with random codes and float16 scales (for latency only)."""
    return QuantizedTensor(codes=rng.integers(0, 1 << bits, (k, n), dtype=np.uint8),
                           scales=(rng.random((-(-k // block), n)) * 0.01).astype(np.float16), zero_points=None,
                           bits=bits, block_size=block)
