"""latency: what a layer's lowered form costs at run time, measured on this machine and cached.

A *form* is what the lowering emits for one layer as far as its speed goes: the target and its
activations' precision (accuracy level), the activations' dtype, the rotation of the input, and
per factor its shape, code width, block and zero points. The values never matter, so one
measurement serves every layer and every model with that form.

A cost is a ratio: the form's time over the float MatMul of the same shape at the same rows, the
two timed in turns (runtime.interleaved_latency_ms, the 20th percentile of the calls) so that load
on the machine falls on both. Ratios from different runs stay comparable where absolute times
would not. For a model larger than the last-level cache the forms are timed cold (the caches
evicted before each call), as its layers run. A layer whose weight is rebuilt in float when the
session loads (FOLDED) is, once loaded, the float MatMul itself: its form is the float form.

The table lives in ``cache_dir("latency")``, one file per machine (CPU model and count,
onnxruntime's version, the lrq library's bytes); a form met for the first time is timed then, one
group per shape and row count (a tenth of a second to a second per form).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from lrqgraph.cache import cache_dir
from lrqgraph.atomic import write_text

log = logging.getLogger(__name__)

FLOAT = "float"      # a form's kind for the layer kept as a float MatMul
FOLDED = "fold"      # the lowering whose weight onnxruntime rebuilds in float when the session loads
TARGET_SECONDS = 0.05  # time spent per model and round while measuring (a few calls on small layers)
ROUNDS = 5
# a kernel's time is its fastest calls': other load on the machine only adds (the median of one
# shape's group moved by 20% between runs on this VM, its 20th percentile by a few %)
QUANTILE = 0.2


@dataclass(frozen=True)
class Form:
    """A lowered layer's shape of work: everything its run time depends on."""

    target: str                 # lowering (ort, lrq, std) or "float"
    level: int | None           # accuracy level of its nodes (0 float activations, 4 int8; None the target's default)
    dtype: str                  # activations' dtype
    k: int
    n: int
    factors: tuple = ()         # per chain, per factor: "KxN:bits/block/s|a" strings
    rotation: int = 0           # length of the rotated input (0: none)

    @property
    def key(self) -> str:
        chains = ";".join(",".join(chain) for chain in self.factors)
        return f"{self.target}|a{self.level}|{self.dtype}|{self.k}x{self.n}|{chains}|rot{self.rotation}"

    @property
    def shape(self) -> tuple[int, int]:
        return self.k, self.n


def float_form(k: int, n: int, dtype: str = "float32") -> Form:
    return Form(FLOAT, 0, dtype, k, n)


def form_of(rep, target: str, level: int | None, dtype: str = "float32") -> Form:
    """The form of a Representation lowered for ``target`` at ``level`` (the lower pass's option)."""
    def factor(q) -> str:
        codes = getattr(q, "pairs", q)  # a Kashin tensor's codes are its pairs
        block = getattr(codes, "block_size", 0)
        kind = "c" if getattr(codes, "codebook", None) is not None else ("s" if codes.symmetric else "a")
        return f"{q.shape[0]}x{q.shape[1]}:{q.bits}/{block}/{kind}"

    k, n = rep.shape
    if target == FOLDED:  # after the session folds it, the layer is the float MatMul itself
        return float_form(k, n, dtype)
    chains = tuple(tuple(factor(q) for q in chain) for chain in rep.chains)
    rotation = rep.rotation.k if rep.rotation is not None else 0
    return Form(target, level, dtype, k, n, chains, rotation)


def machine_key() -> str:
    """What a cost depends on besides the form: this CPU, onnxruntime, and lrqgraph's kernels."""
    import onnxruntime

    from lrqgraph.runtime.native_ops import library_path
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    library = library_path()
    kernels = hashlib.sha256(Path(library).read_bytes()).hexdigest()[:12] if library else "none"
    text = f"{cpu}|{os.cpu_count()}|onnxruntime {onnxruntime.__version__}|{kernels}|q{QUANTILE}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CostTable:
    """Measured cost ratios by (form, rows), read from and written to this machine's cache file."""

    def __init__(self, path: str | os.PathLike | None = None, cold: bool = False):
        """``cold``: forms are timed with the caches evicted before each call (evict_bytes), as the
        layers of a model larger than the last-level cache run."""
        self.path = Path(path) if path is not None else cache_dir("latency") / f"{machine_key()}.json"
        self.cold = cold
        try:
            self.ratios: dict[str, float] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.ratios = {}
        self.measured = 0  # forms x rows timed by this table (not read from the cache)

    def entry(self, form: Form, rows: int) -> str:
        return f"{form.key}|M{rows}" + ("|cold" if self.cold else "")

    def ratio(self, form: Form, rows: int) -> float:
        """The form's time over the float MatMul's at ``rows`` (1.0 for the float form itself)."""
        if form.target == FLOAT:
            return 1.0
        return self.ratios[self.entry(form, rows)]

    def ms(self, form: Form, rows: int) -> float:
        """The form's time at ``rows``: its ratio times the float MatMul's last measured time."""
        return self.ratios[self.entry(float_form(form.k, form.n, form.dtype), rows)] * self.ratio(form, rows)

    def missing(self, forms: Iterable[Form], rows: Iterable[int]) -> list[tuple[Form, int]]:
        wanted = {float_form(f.k, f.n, f.dtype): None for f in forms} | dict.fromkeys(forms)
        return [(f, m) for f in wanted for m in rows if self.entry(f, m) not in self.ratios]

    def measure(self, models: dict[Form, Callable[[], onnx.ModelProto]], rows: Iterable[int],
                threads: int | None = None) -> None:
        """Times every form of ``models`` (form -> builder of its one-layer model, input ``x`` [M, K])
        not yet in the table at each of ``rows``, each group of one shape interleaved with its float
        MatMul; then writes the table."""
        from lrqgraph.runtime import interleaved_latency_ms
        todo = self.missing(models, rows)
        if not todo:
            return
        groups: dict[tuple, list[Form]] = {}
        for form, m in todo:
            group = groups.setdefault((form.k, form.n, form.dtype, m), [])
            if form.target != FLOAT:
                group.append(form)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lrqgraph-latency-") as tmp:
            paths: dict[Form, Path] = {}
            for i, (k, n, dtype, m) in enumerate(sorted(groups)):
                forms = groups[(k, n, dtype, m)]
                reference = float_form(k, n, dtype)
                for form in [reference, *forms]:
                    if form not in paths:
                        paths[form] = Path(tmp) / f"{len(paths)}.onnx"
                        onnx.save(float_model(k, n, dtype) if form.target == FLOAT else models[form](), paths[form])
                x = np.random.default_rng(0).standard_normal((m, k)).astype(dtype)
                runs = _runs(k, n, m)
                times = interleaved_latency_ms([paths[f] for f in [reference, *forms]], {"x": x}, runs * ROUNDS,
                                               threads=threads, rounds=ROUNDS, warmup=2, quantile=QUANTILE,
                                               evict_bytes=2 * last_level_cache_bytes() if self.cold else 0)
                self.ratios[self.entry(reference, m)] = round(times[0], 5)  # the float form's entry holds ms
                for form, ms in zip(forms, times[1:]):
                    self.ratios[self.entry(form, m)] = round(ms / times[0], 4)
                self.measured += len(forms)
                log.info("latency: %d/%d groups timed (%d forms of %dx%d at %d rows), %.1f s",
                         i + 1, len(groups), len(forms), k, n, m, time.perf_counter() - start)
        self.save()

    def save(self) -> None:
        write_text(self.path, json.dumps(self.ratios, sort_keys=True, indent=0))


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs; 32 MiB where it cannot be read)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


def _runs(k: int, n: int, m: int) -> int:
    """Calls per model and round: about TARGET_SECONDS of float work (at ~20 GFLOP/s), 3 to 20."""
    seconds = 2.0 * m * k * n / 20e9
    return int(np.clip(round(TARGET_SECONDS / max(seconds, 1e-6)), 3, 20))


def float_model(k: int, n: int, dtype: str = "float32", seed: int = 0) -> onnx.ModelProto:
    """y = x[M, K] @ W[K, N]: the one-layer model forms are timed against (and lowered from)."""
    from onnx import helper, numpy_helper
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")], "layer",
                              [helper.make_tensor_value_info("x", elem, ["M", k])],
                              [helper.make_tensor_value_info("y", elem, ["M", n])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def models_latency_ms(models: list, feeds: dict[str, np.ndarray], seconds: float = 2.0,
                      threads: int | None = None) -> list[float]:
    """Median ms of one call per model (paths or ModelProtos) on ``feeds``, the models taking turns
    (idle sessions do not spin) for about ``seconds`` in all, at least 3 calls each."""
    from lrqgraph.evaluate import open_session
    from lrqgraph.runtime.session import session_options
    sessions = [open_session(m, session_options(threads, {"session.intra_op.allow_spinning": "0"})) for m in models]
    times: list[list[float]] = [[] for _ in sessions]
    for s in sessions:  # warm up: first calls allocate and pack
        s.run(None, feeds)
    deadline = time.perf_counter() + seconds
    while min(len(t) for t in times) < 3 or (time.perf_counter() < deadline and len(times[0]) < 200):
        for s, bucket in zip(sessions, times):
            start = time.perf_counter()
            s.run(None, feeds)
            bucket.append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]
