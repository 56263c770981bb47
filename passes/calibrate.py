"""calibrate: per-layer input statistics H = XᵀX from real inputs (``--calib``: see lrqgraph.calib).

The model is run in onnxruntime on the calibration samples (in batches, streaming: only H is
kept) and H is cached on disk, keyed by the model's and the data's SHA-256, so a second run with
the same model and data reads it back. Without calibration data the analysis is empty and every
method runs data-free; the report says which.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from lrqgraph import calib
from lrqgraph.hessian import collect_hessians
from lrqgraph.io import cache_dir, save_model
from lrqgraph.passmanager import Context, Pass, PassResult, register_analysis, register_pass

log = logging.getLogger(__name__)


def _digest(model: onnx.ModelProto, data: calib.CalibData, weights: list[str]) -> str:
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    h.update(data.digest.encode())
    h.update("|".join(weights).encode())
    return h.hexdigest()[:24]


def _mask_input(model: onnx.ModelProto) -> str | None:
    """An integer/bool 2-D input called *mask* marks padding rows to leave out (text models)."""
    for spec in calib.input_specs(model):
        if "mask" in spec.name.lower() and len(spec.shape) == 2 and spec.dtype.kind in "iub":
            return spec.name
    return None


@register_analysis("calib_data")
def calibration_data(ctx: Context) -> calib.CalibData | None:
    """The calibration inputs (``--calib``), read once per pipeline; None without them."""
    cfg = ctx.config
    if not cfg.calib:
        return None
    return calib.load_calibration(cfg.calib, ctx.model.to_onnx(), cfg.tokenizer, cfg.calib_samples)


@register_analysis("hessians")
def layer_hessians(ctx: Context) -> dict[str, np.ndarray]:
    data = ctx.analysis("calib_data")
    if data is None:
        return {}
    layers = [layer for layer in ctx.analysis("layers") if layer.rewrite]
    inputs = {layer.weight: layer.nodes[0].inputs[0].name for layer in layers}
    model = ctx.model.to_onnx()
    key = _digest(model, data, sorted(inputs))
    cached = cache_dir("hessians") / f"{key}.npz"
    if cached.exists():
        with np.load(cached) as stored:
            log.info("calibrate: H for %d layers read from cache %s", len(stored.files), cached)
            return {name: stored[f"h{i}"] for i, name in enumerate(sorted(inputs))}
    with tempfile.TemporaryDirectory(prefix="lrqgraph-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path)
        hs = collect_hessians(path, inputs, data.batches, mask_input=_mask_input(model))
    fd, tmp_file = tempfile.mkstemp(suffix=".npz", dir=cached.parent)
    os.close(fd)
    np.savez(tmp_file, **{f"h{i}": hs[name] for i, name in enumerate(sorted(inputs))})
    os.replace(tmp_file, cached)
    log.info("calibrate: H for %d layers from %d samples of %s", len(hs), data.samples, data.source)
    return hs


@register_pass
class Calibrate(Pass):
    """Compute the ``hessians`` analysis now (factorize would otherwise compute it on demand)."""

    name = "calibrate"

    def run(self, ctx: Context) -> PassResult:
        hs = ctx.analysis("hessians")
        data = ctx.analysis("calib_data")
        ctx.report["calibration"] = (f"H = XᵀX for {len(hs)} layers from {data.samples} samples of {data.source}"
                                     if hs else "none: all methods ran data-free")
        return PassResult(modified=False, preserved=None)
