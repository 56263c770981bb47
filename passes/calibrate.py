"""calibrate: per-layer input statistics H = XᵀX from real inputs (``--calib``: see lrqgraph.calib).

The model is run in onnxruntime on the calibration samples (in batches, streaming: only H is
kept) and H is cached on disk, keyed by digests of the model (its graph and every weight, hashed
tensor by tensor: no whole-model serialization) and of the data, so a second run with the same
model and data reads it back. Without calibration data the analysis is empty and every method
runs data-free; the report says which.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

import lrqgraph.calib as calib
from lrqgraph.hessian import collect_hessians
from lrqgraph.io import cache_dir
from lrqgraph.passmanager import Context, Pass, PassResult, register_analysis, register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSummary:
    layers: int
    samples: int
    source: str

    def describe(self) -> str:
        return f"H = XᵀX for {self.layers} layers from {self.samples} samples of {self.source}"


def _mask_input(model: onnx.ModelProto) -> str | None:
    """An integer/bool 2-D input called *mask* marks padding rows to leave out (text models)."""
    for spec in calib.input_specs(model):
        if "mask" in spec.name.lower() and len(spec.shape) == 2 and spec.dtype.kind in "iub":
            return spec.name
    return None


@register_analysis("calib_data", config=("calib", "tokenizer", "calib_samples"))
def calibration_data(ctx: Context, config) -> calib.CalibData | None:
    """The calibration inputs (``--calib``), read once per pipeline; None without them."""
    if not config.calib:
        return None
    return calib.load_calibration(config.calib, ctx.model.signature(), config.tokenizer, config.calib_samples)


@register_analysis("hessians", requires=("calib_data", "layers"))
def layer_hessians(ctx: Context) -> dict[str, np.ndarray]:
    data = ctx.analysis("calib_data")
    if data is None:
        return {}
    return _hessians(ctx, data.batches, data.digest, f"{data.samples} samples of {data.source}")


@register_analysis("fit_hessians", requires=("calib_data", "layers", "hessians"), config=("allocate",))
def fit_hessians(ctx: Context, config) -> dict[str, np.ndarray]:
    """H without the samples the allocator measures degradation on (the first ``measure_samples``):
    candidates fitted to these statistics are measured on data they never saw, so a layer whose
    GPTQ solution only holds on its own calibration samples shows it (the overfitting that breaks
    allocations on text of another domain). Full H when too few samples would remain."""
    data = ctx.analysis("calib_data")
    full = ctx.analysis("hessians")
    if data is None:
        return full
    held, rest = calib.split_runs(data.batches, config.allocate.measure_samples)
    if calib.count_samples(rest) < calib.count_samples(held):
        log.warning("allocate: %d calibration samples leave too few beside the %d measured ones; candidates are "
                    "fitted on all of them, so one-layer measurements are in-sample", data.samples,
                    config.allocate.measure_samples)
        return full
    measured = _hessians(ctx, held, f"{data.digest}|head{config.allocate.measure_samples}",
                         f"the {config.allocate.measure_samples} measurement samples")
    return {name: full[name] - measured[name] for name in full}


def _hessians(ctx: Context, batches, data_digest: str, what: str) -> dict[str, np.ndarray]:
    # an embedding table alone has no input statistics (its rows are read, not multiplied)
    layers = [layer for layer in ctx.analysis("layers") if layer.rewrite and layer.matmuls]
    inputs = {layer.weight: layer.matmuls[0].inputs[0].name for layer in layers}
    digest = hashlib.sha256(f"{ctx.model.digest()}|{data_digest}|{'|'.join(sorted(inputs))}".encode())
    cached = cache_dir("hessians") / f"{digest.hexdigest()[:24]}.npz"
    if cached.exists():
        with np.load(cached) as stored:
            log.info("calibrate: H for %d layers read from cache %s", len(stored.files), cached)
            return {name: stored[f"h{i}"] for i, name in enumerate(sorted(inputs))}
    model = ctx.model.to_onnx()
    hs = collect_hessians(model, inputs, batches, mask_input=_mask_input(model))
    fd, tmp_file = tempfile.mkstemp(suffix=".npz", dir=cached.parent)
    os.close(fd)
    np.savez(tmp_file, **{f"h{i}": hs[name] for i, name in enumerate(sorted(inputs))})
    os.replace(tmp_file, cached)
    log.info("calibrate: H for %d layers from %s", len(hs), what)
    return hs


@register_pass
class Calibrate(Pass):
    """Compute the ``hessians`` analysis now (factorize would otherwise compute it on demand)."""

    name = "calibrate"

    def run(self, ctx: Context) -> PassResult:
        hs = ctx.analysis("hessians")
        data = ctx.analysis("calib_data")
        ctx.calibration = CalibrationSummary(len(hs), data.samples, data.source) if data is not None else None
        return PassResult(modified=False, preserved=None)
