"""onnxruntime sessions for lrqgraph models."""
from __future__ import annotations

import os
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
# Set once the library is registered on a SessionOptions: onnxruntime refuses a second
# registration of the same op domain ("Domain already set in registry"), and hosts reuse one
# SessionOptions for many sessions. onnxruntime ignores config keys it does not know.
REGISTERED_KEY = "lrqgraph.custom_ops_library"


def session_options(threads: int | None = None, config: dict[str, str] | None = None) -> ort.SessionOptions:
    """Fresh SessionOptions with lrqgraph's config entries (``config`` added on top)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, str(value))
    return register(so, library=False)


def _has_entry(so: ort.SessionOptions, key: str) -> bool:
    try:
        so.get_session_config_entry(key)
        return True
    except RuntimeError:  # onnxruntime raises for keys that were never set
        return False


def register(sess_options: ort.SessionOptions, library: bool = True) -> ort.SessionOptions:
    """Add lrqgraph's custom-op library (when ``library``) and its config entries to
    ``sess_options``, keeping every entry the caller set; returns the same object. For hosts that
    build their own InferenceSession."""
    if not _has_entry(sess_options, QDQ_ACCURACY_KEY):
        sess_options.add_session_config_entry(QDQ_ACCURACY_KEY, "0")
    if library and not _has_entry(sess_options, REGISTERED_KEY):
        path = str(library_path())
        sess_options.register_custom_ops_library(path)
        sess_options.add_session_config_entry(REGISTERED_KEY, path)
    return sess_options


def _uses_lrq_ops(model: str | bytes) -> bool:
    proto = onnx.ModelProto()
    if isinstance(model, bytes):
        proto.ParseFromString(model)
    else:
        proto = onnx.load(model, load_external_data=False)
    return any(o.domain == DOMAIN for o in proto.opset_import)


def session(path_or_bytes: str | os.PathLike | bytes, sess_options: ort.SessionOptions | None = None,
            providers: Sequence[str | tuple[str, dict]] | None = None,
            provider_options: Sequence[dict] | None = None, **kwargs: Any) -> ort.InferenceSession:
    """``onnxruntime.InferenceSession`` with the same arguments in the same order, plus lrqgraph:
    its config entries are added to ``sess_options`` (or fresh options) without overwriting what
    the caller set, and its custom-op library is registered for models lowered with
    ``--lowering lrq``. ``providers`` defaults to the CPU provider."""
    source = os.fspath(path_or_bytes) if not isinstance(path_or_bytes, bytes) else path_or_bytes
    so = sess_options if sess_options is not None else ort.SessionOptions()
    if sess_options is None:
        so.log_severity_level = 3
    register(so, library=_uses_lrq_ops(source))
    return ort.InferenceSession(source, so, providers=list(providers or ["CPUExecutionProvider"]),
                                provider_options=provider_options, **kwargs)


def interleaved_latency_ms(paths: list, feeds: dict[str, np.ndarray], runs: int, threads: int = 2,
                           rounds: int = 5, warmup: int = 3, copies: list[int] | None = None,
                           quantile: float = 0.5, evict_bytes: int = 0) -> list[float]:
    """Median (or another ``quantile``) wall time (ms) of one ``run`` call per model.

    The models take turns, ``runs / rounds`` calls each per round, so that noise from other load
    on the machine falls on all of them alike and their ratios stay meaningful. ``copies[i]``
    sessions of model i are called in rotation, so that with enough copies each call finds its
    weights evicted from the caches by the others (cold, memory-bound calls). ``evict_bytes``:
    before each timed call, a buffer that large is written (untimed), which evicts the caches as
    a model larger than them does between one use of a layer and the next.
    """
    copies = copies or [1] * len(paths)
    scratch = np.zeros(evict_bytes // 4, np.float32) if evict_bytes else None
    # Idle sessions' worker threads would spin and steal the cores from the one being timed.
    sessions = [[session(str(p), session_options(threads, {"session.intra_op.allow_spinning": "0"}))
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
                if scratch is not None:
                    scratch[::16] += 1.0  # one write per 64-byte cache line
                start = time.perf_counter()
                sess.run(None, feeds)
                bucket.append(time.perf_counter() - start)
    return [float(np.quantile(t, quantile)) * 1e3 for t in times]
