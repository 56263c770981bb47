"""onnxruntime sessions for lrqgraph models."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Sequence

import numpy as np

import onnx
import onnxruntime as ort

from .native_ops import DOMAIN, library_path

# onnxruntime fuses DequantizeLinear->MatMul into MatMulNBits and, by default, quantizes the
# activations to int8 there (accuracy level 4). lrqgraph's std lowering is meant to compute in
# float, as the ort lowering does for 4-bit codes, so sessions default to level 0.
QDQ_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


def session_options(threads: int | None = None, config: dict[str, str] | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    entries = {QDQ_ACCURACY_KEY: "0", **(config or {})}
    for key, value in entries.items():
        so.add_session_config_entry(key, str(value))
    return so


def _uses_lrq_ops(model: str | bytes) -> bool:
    proto = onnx.ModelProto()
    if isinstance(model, bytes):
        proto.ParseFromString(model)
    else:
        proto = onnx.load(model, load_external_data=False)
    return any(o.domain == DOMAIN for o in proto.opset_import)


def session(model: str | os.PathLike | bytes, providers: Sequence[str] | None = None,
            threads: int | None = None, config: dict[str, str] | None = None,
            **options: Any) -> ort.InferenceSession:
    """An InferenceSession for ``model`` (a path or serialized bytes).

    Models lowered with ``--lowering lrq`` get lrqgraph's custom-op library registered.
    ``config`` adds session config entries; other keyword arguments set SessionOptions attributes
    (e.g. ``graph_optimization_level``).
    """
    so = session_options(threads, config)
    for key, value in options.items():
        setattr(so, key, value)
    source = os.fspath(model) if not isinstance(model, bytes) else model
    if _uses_lrq_ops(source):
        so.register_custom_ops_library(str(library_path()))
    return ort.InferenceSession(source, so, providers=list(providers or ["CPUExecutionProvider"]))


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
