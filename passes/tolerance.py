"""tolerance: per layer, the candidate representations and each one's predicted share of the
end-to-end degradation.

1. Candidates: every registered method's menu for the lowering (today: gptq's dense grids
   (bits, block), or AllocateConfig.menu), each computed for real (GPTQ with calibration
   statistics, RTN without), with its exact storage bits and
   its activation-aware error e = sqrt(tr(ΔWᵀHΔW) / tr(WᵀHW)) (relative Frobenius error when
   data-free). Keeping the float weight is always a candidate (e = 0).
2. Calibration of the proxy: each layer alone is replaced by its cheapest candidate (the probe)
   and the model's degradation d is measured in onnxruntime on the calibration inputs (see
   lrqgraph.evaluate). Small perturbations degrade the output quadratically, so a layer's
   sensitivity is s = d_probe / e_probe² and a candidate is predicted to cost s · e².
3. Check: with ``validate``, each layer is also measured alone at a second, finer candidate, and
   the report gives predicted against measured (and their Spearman rank correlation over layers):
   the prediction there comes from the probe, never from the value it is compared with. The
   allocator then predicts from both measurements: a power law between them, quadratic beyond.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

import lrqgraph.calib as calib
from lrqgraph.errors import LrqError
from lrqgraph.evaluate import Degradation
from lrqgraph.methods import METHODS, MethodConfig, configure
from lrqgraph.numerics import HessianInfo, Representation, activation_error, relative_error
from lrqgraph.passmanager import Context, register_analysis
from lrqgraph.plan import Layer
from lrqgraph.progress import progress

from .factorize import factorize_weight
from .lower import check_lowerable

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    label: str
    rep: Representation | None     # None: keep the float weight
    bits: int                      # storage of the layer's weight in this form
    error: float                   # activation-aware (or relative Frobenius) error
    predicted: float = float("nan")  # predicted end-to-end degradation when only this layer changes
    polished: bool = False           # coordinate descent applied (after being chosen)


@dataclass
class LayerTolerance:
    layer: Layer
    candidates: list[Candidate]
    sensitivity: float = float("nan")
    probe: tuple[str, float] | None = None      # (label, measured degradation)
    check: tuple[str, float, float] | None = None  # (label, predicted, measured)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties share their mean rank
            tie = x == value
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if len(a) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def menu_for(lowering: str, custom: tuple[tuple[int, int], ...] = ()) -> list[tuple[str, dict]]:
    """(method, fields) of every candidate: each registered method's menu for the lowering, or a
    custom (bits, block) menu of gptq grids."""
    if custom:
        return [("gptq", {"bits": bits, "block_size": block, "sweeps": 0}) for bits, block in custom]
    return [(name, fields) for name, m in METHODS.items() for fields in m.menu(lowering)]


def candidates_for(layer: Layer, menu: list[tuple[str, dict]], method_cfg: MethodConfig,
                   h: np.ndarray | None, lowering: str) -> list[Candidate]:
    """Every menu entry the lowering runs for this layer (cheapest first), then keeping the float
    weight. (A menu block longer than K shrinks to K, which e.g. MatMulNBits cannot take.)"""
    w = layer.weight_matrix()
    float_bits = layer.stored_bits
    info = HessianInfo.of(h)  # factorized once for every candidate
    out = []
    for method, fields in menu:
        cfg = configure(method_cfg, method=method, **fields)
        rep, _ = factorize_weight(w, cfg, cfg.scales_for(layer.dtype), info)
        if rep is None or rep.storage_bits() >= float_bits or not lowerable(layer, rep, lowering):
            continue
        first = rep.chains[0][0]
        label = f"{rep.method} {first.bits}b g{first.block_size}"  # the grid as stored (blocks shrink to K)
        if any(c.label == label for c in out):
            continue  # a block longer than K is K: that grid is on the menu already
        dense = rep.dequantize()
        error = activation_error(w, dense, h) if h is not None else relative_error(w, dense)
        out.append(Candidate(label, rep, rep.storage_bits(), error))
    out.sort(key=lambda c: (c.bits, c.error))
    out.append(Candidate("keep", None, float_bits, 0.0, predicted=0.0))
    return out


def lowerable(layer: Layer, rep: Representation, lowering: str) -> bool:
    try:
        check_lowerable(layer.name, rep, lowering, layer.dtype)
        return True
    except LrqError:
        return False


def measurement_batches(ctx: Context, config) -> tuple[list[dict[str, np.ndarray]], str]:
    """The first ``measure_samples`` calibration samples (synthetic inputs without --calib)."""
    data = ctx.analysis("calib_data")
    if data is not None:
        runs, count = [], 0
        for run in data.batches:
            if count >= config.allocate.measure_samples:
                break
            runs.append(run)
            count += len(next(iter(run.values())))
        return runs, f"{count} samples of {data.source}"
    signature = ctx.model.signature()
    feeds = calib.synthesize(signature, ctx.model.graph, config.verify.samples, config.verify.seed)
    log.warning("tolerance: no --calib data; layer sensitivities are measured on synthetic inputs")
    return list(calib.batches(signature, feeds)), f"{config.verify.samples} synthetic samples"


@register_analysis("degradation", requires=("layers", "calib_data"), config=("allocate", "verify"))
def degradation_meter(ctx: Context, config) -> Degradation:
    """The original model with every selected weight swappable, on the calibration inputs."""
    cfg = config.allocate
    weights = [layer.weight for layer in ctx.analysis("layers") if layer.rewrite]
    batches, _ = measurement_batches(ctx, config)
    return Degradation(ctx.model.to_onnx(), weights, batches, metric="kl" if cfg.max_kl is not None else "cosine",
                       custom=cfg.metric)


@register_analysis("tolerance", requires=("layers", "hessians", "degradation"),
                   config=("allocate", "factorize", "lowering"))
def layer_tolerance(ctx: Context, config) -> list[LayerTolerance]:
    cfg = config.allocate
    menu = menu_for(config.lowering, cfg.menu)
    hessians = ctx.analysis("hessians")
    meter = ctx.analysis("degradation", allocate=cfg)
    start = time.perf_counter()
    result = []
    layers = [layer for layer in ctx.analysis("layers") if layer.rewrite]
    for layer in progress(layers, "tolerance"):
        method_cfg = config.factorize.for_layer(layer.name, layer.weight)
        cands = candidates_for(layer, menu, method_cfg, hessians.get(layer.weight), config.lowering)
        tol = LayerTolerance(layer, cands)
        lossy = [c for c in cands if c.rep is not None]
        if lossy:
            probe = lossy[0]
            measured = max(meter.measure({layer.weight: stored_layout(layer, probe.rep)}), 0.0)
            tol.probe = (probe.label, measured)
            tol.sensitivity = measured / probe.error ** 2 if probe.error > 0 else 0.0
            for c in lossy:
                c.predicted = tol.sensitivity * c.error ** 2
            if cfg.validate and len(lossy) > 1:
                # the finest lossy candidate below 8 bits (or the finest): where allocations land
                finer = [c for c in lossy[1:] if "8b" not in c.label] or lossy[1:]
                check = finer[len(finer) // 2]
                got = max(meter.measure({layer.weight: stored_layout(layer, check.rep)}), 0.0)
                tol.check = (check.label, check.predicted, got)  # the probe's prediction, before refining
                _through_two_points(lossy, probe, check, measured, got)
        result.append(tol)
    log.info("tolerance: %d layers, %d candidates in %.1f s", len(result),
             sum(len(t.candidates) for t in result), time.perf_counter() - start)
    return result


def _through_two_points(lossy: list[Candidate], probe: Candidate, check: Candidate, d_probe: float,
                        d_check: float) -> None:
    """Predictions from both measurements: a power law d = a·e^p through (e_probe, d_probe) and
    (e_check, d_check) between them, quadratic scaling beyond either end."""
    e_probe, e_check = probe.error, check.error
    if not (0 < e_check < e_probe and d_check > 0 and d_probe > 0):
        return
    power = np.log(d_probe / d_check) / np.log(e_probe / e_check)
    for c in lossy:
        if c.error <= e_check:
            c.predicted = d_check * (c.error / e_check) ** 2
        elif c.error >= e_probe:
            c.predicted = d_probe * (c.error / e_probe) ** 2
        else:
            c.predicted = d_check * (c.error / e_check) ** power


def stored_layout(layer: Layer, rep: Representation) -> np.ndarray:
    """The dense approximation in the layout the model stores the weight (Gemm transB keeps Wᵀ)."""
    w = rep.dequantize()
    return np.ascontiguousarray(w.T) if layer.transposed else w
