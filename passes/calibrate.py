"""calibrate: per-layer input statistics H = XᵀX from real inputs (``--calib``: see lrqgraph.calib).

The model is run in onnxruntime on the calibration samples (in batches, streaming: only H is
kept) and H is cached on disk, keyed by digests of the model (its graph and every weight, hashed
tensor by tensor: no whole-model serialization), of the data and of the code that computes H
(HESSIAN_CODE), so a second run with the same model, data and code reads it back. Without
calibration data the analysis is empty and every method runs data-free; the report says which.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

import lrqgraph.calib as calib
from lrqgraph.atomic import atomic_file
from lrqgraph.hessian import HessianPart, collect_hessian_parts
from lrqgraph.cache import cache_dir, cache_key
from lrqgraph.kvcache import past_inputs
from lrqgraph.numerics.patches import ConvPatches
from lrqgraph.results import CalibrationSummary
from lrqgraph.passmanager import Context, Pass, PassResult, register_analysis, register_pass

log = logging.getLogger(__name__)
# the modules whose code makes the cached H: a change to any of them computes it anew
HESSIAN_CODE = ("lrqgraph.hessian", "lrqgraph.calib", "lrqgraph.numerics.patches", __name__)


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
    return calib.load_calibration(config.calib, ctx.model.signature(), config.tokenizer, config.calib_samples,
                                  graph=ctx.model.graph)


@register_analysis("hessian_parts", requires=("calib_data", "layers"), config=("allocate",))
def hessian_parts(ctx: Context, config) -> list[HessianPart]:
    """Raw H of the calibration samples in one pass: [all of them], or, for an allocation, [its
    measured samples (the first ``measure_samples``), the others] (see fit_hessians)."""
    data = ctx.analysis("calib_data")
    if data is None:
        return [HessianPart({}, {})]
    measured = measured_samples(ctx, config)
    head, rest = calib.split_runs(data.batches, measured)
    split = config.allocate.active and calib.count_samples(rest) >= calib.count_samples(head)
    if config.allocate.active and not split:
        log.warning("allocate: %d calibration samples leave too few beside the %d measured ones; candidates are "
                    "fitted on all of them, so one-layer measurements are in-sample", data.samples, measured)
    parts = [head, rest] if split else [list(data.batches)]
    what = f"{data.samples} samples of {data.source}" + (f" (the {measured} measured ones apart)" if split else "")
    key = f"{data.digest}|parts{[calib.count_samples(p) for p in parts]}"
    past = past_inputs(ctx.model.graph)
    if past:  # a cached decoder's lines joined into prompts: the same tokens in a few long runs
        parts, key = [calib.pack_prompts(p, past) for p in parts], f"{key}|joined"
    return _hessians(ctx, parts, key, what)


def measured_samples(ctx: Context, config) -> int:
    """How many leading calibration samples the allocator's measurements run (``measure_samples``,
    or by default those holding 512 tokens)."""
    if config.allocate.measure_samples is not None:
        return config.allocate.measure_samples
    data = ctx.analysis("calib_data")
    return calib.samples_for_positions(data.batches, mask_input=_mask_input(ctx.model.signature()))


@register_analysis("hessians", requires=("hessian_parts",))
def layer_hessians(ctx: Context) -> dict[str, np.ndarray]:
    """H = XᵀX per layer from every calibration sample, shrunk by their count (empty without
    calibration data)."""
    return HessianPart.total(ctx.analysis("hessian_parts")).shrunk()


@register_analysis("fit_hessians", requires=("hessian_parts",), config=("allocate",))
def fit_hessians(ctx: Context, config) -> dict[str, np.ndarray]:
    """H without the samples the allocator measures degradation on (the first ``measure_samples``):
    candidates fitted to these statistics are measured on data they never saw, so a layer whose
    GPTQ solution only holds on its own calibration samples shows it (the overfitting that breaks
    allocations on text of another domain). Full H when too few samples would remain."""
    parts = ctx.analysis("hessian_parts", allocate=config.allocate)
    return parts[-1].shrunk() if len(parts) > 1 else ctx.analysis("hessians")


def _hessians(ctx: Context, parts: list, data_digest: str, what: str) -> list[HessianPart]:
    # an embedding table alone has no input statistics (its rows are read, not multiplied)
    layers = [layer for layer in ctx.analysis("layers") if layer.rewrite and layer.matmuls]
    inputs = {layer.weight: layer.matmuls[0].inputs[0].name for layer in layers}
    patches = {layer.weight: ConvPatches.of(layer.matmuls[0].attrs, layer.kernel[2:]) for layer in layers
               if layer.kernel}
    key = cache_key(ctx.model.digest(), data_digest, "|".join(sorted(inputs)), sorted(patches.items()), "rows",
                    code=HESSIAN_CODE)
    cached = cache_dir("hessians") / f"{key}.npz"
    names = sorted(inputs)
    if ctx.model.streaming:  # H block by block into the spill folder, one file per input (no cache)
        hs = collect_hessian_parts(ctx.model.to_onnx(), inputs, parts, mask_input=_mask_input(ctx.model.signature()),
                                   patches=patches, store=ctx.model.spill_folder())
        log.info("calibrate: H for %d layers from %s, block by block", len(names), what)
        return hs
    if cached.exists():
        with np.load(cached) as stored:
            log.info("calibrate: H for %d layers read from cache %s", len(names), cached)
            return [HessianPart({name: stored[f"p{p}h{i}"] for i, name in enumerate(names)},
                                {name: int(stored[f"p{p}n{i}"]) for i, name in enumerate(names)})
                    for p in range(len(parts))]
    model = ctx.model.to_onnx()
    hs = collect_hessian_parts(model, inputs, parts, mask_input=_mask_input(model), patches=patches)
    arrays = {f"p{p}h{i}": part.h[name] for p, part in enumerate(hs) for i, name in enumerate(names)}
    arrays.update({f"p{p}n{i}": np.int64(part.rows[name]) for p, part in enumerate(hs) for i, name in enumerate(names)})
    with atomic_file(cached, suffix=".npz") as tmp:  # (np.savez adds .npz to names without it)
        np.savez(tmp, **arrays)
    log.info("calibrate: H for %d layers from %s", len(names), what)
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
