"""allocate: choose each layer's representation from the ``tolerance`` candidates to meet a goal.

Modes (AllocateConfig):
  - quality: the least predicted degradation whose storage fits ``target_bpw`` bits per weight
    over the selected layers (kept layers count at their float size) or ``target_size`` bytes for
    the whole model;
  - compact: the smallest storage whose predicted degradation is within ``min_cosine`` (1 − mean
    cosine of the first output) or ``max_kl`` (logits).
Both are a multiple-choice knapsack (lrqgraph.numerics.allocation). The choice is then measured
end to end on the calibration inputs; in compact mode, while the measurement misses the goal, the
layer with the largest predicted share moves to its next more precise candidate (at worst, back to
float) and the model is measured again. A goal that cannot be met is an error naming the cheapest
or most precise reachable point; a repair budget that runs out is reported and warned about.
The plans it sets are what ``lower`` emits, as after ``factorize``.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from lrqgraph.config import AllocateConfig, with_fields
from lrqgraph.errors import LrqError
from lrqgraph.numerics import Representation, activation_error
from lrqgraph.numerics.allocation import frontier, within_budget, within_loss
from lrqgraph.numerics.refine import refine
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass
from lrqgraph.plan import LayerPlan

from .tolerance import LayerTolerance, spearman, stored_layout

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AllocationSummary:
    """What ``allocate`` decided for the whole model (the report's "allocation" entry)."""

    mode: str
    metric: str
    goal: dict
    bpw: float                  # over the selected layers, every stored bit counted
    predicted: float
    measured: float
    target_loss: float | None
    met: bool
    repairs: int
    spearman: float | None      # predicted vs measured one-layer degradation at the check candidates
    frontier: list              # (bits per weight, predicted degradation) of the knapsack's frontier
    uniform: list               # one grid for every layer, measured: the baselines


def _goal(ctx: Context, cfg, tols: list[LayerTolerance]) -> tuple[str, float]:
    """('budget', bits) or ('loss', max predicted degradation)."""
    params = sum(t.layer.params for t in tols)
    if cfg.target_bpw is not None:
        return "budget", cfg.target_bpw * params
    if cfg.target_size is not None:
        selected_bytes = sum(t.candidates[-1].bits for t in tols) / 8  # their float storage today
        other = ctx.model.constant_bytes() - selected_bytes
        if cfg.target_size <= other:
            raise LrqError(f"--target-size {cfg.target_size} bytes is below the {int(other)} bytes the model "
                           f"keeps outside the selected layers; raise it or select more layers")
        return "budget", (cfg.target_size - other) * 8
    if cfg.min_cosine is not None:
        return "loss", 1.0 - cfg.min_cosine
    return "loss", cfg.max_kl if cfg.max_kl is not None else cfg.max_metric


def _polish(t: LayerTolerance, c: int, hessians: dict, sweeps: int) -> None:
    """Coordinate descent on a chosen GPTQ candidate (the menu was ranked without it: it only helps)."""
    cand = t.candidates[c]
    h = hessians.get(t.layer.weight)
    if cand.polished or cand.rep is None or h is None or not sweeps or cand.rep.method != "gptq":
        return
    w = t.layer.weight_matrix()
    q = refine(w, cand.rep.chains[0][0], h, sweeps)
    cand.rep = Representation(((q,),), cand.rep.method, info={**cand.rep.info, "sweeps": sweeps})
    cand.error = activation_error(w, q.dequantize(), h)
    cand.polished = True


def _measure(meter, tols: list[LayerTolerance], choice: list[int]) -> float:
    replaced = {t.layer.weight: stored_layout(t.layer, t.candidates[c].rep)
                for t, c in zip(tols, choice) if t.candidates[c].rep is not None}
    return max(meter.measure(replaced), 0.0)


def _upgrade(tols: list[LayerTolerance], choice: list[int]) -> bool:
    """Move the layer with the largest predicted share to its cheapest more precise candidate."""
    order = sorted(range(len(tols)), key=lambda i: -tols[i].candidates[choice[i]].predicted)
    for i in order:
        current = tols[i].candidates[choice[i]]
        better = [j for j, c in enumerate(tols[i].candidates) if c.predicted < current.predicted]
        if better:
            choice[i] = min(better, key=lambda j: (tols[i].candidates[j].bits, tols[i].candidates[j].predicted))
            return True
    return False


@register_pass
class Allocate(Pass):
    """Per-layer representations for a goal; options override AllocateConfig (target_bpw, min_cosine...)."""

    name = "allocate"

    def validate(self) -> None:
        with_fields(AllocateConfig(), self.params)  # unknown or bad options fail at parse time

    def run(self, ctx: Context) -> PassResult:
        cfg = with_fields(ctx.config.allocate, self.params)
        if not cfg.active:
            raise LrqError("allocate needs a goal: --target-bpw, --target-size, --min-cosine or --max-kl")
        tols = [t for t in ctx.analysis("tolerance", allocate=cfg) if len(t.candidates) > 1]
        layers = [layer for layer in ctx.analysis("layers") if layer.rewrite]
        if not tols:
            ctx.plans = {layer.weight: LayerPlan(layer, None, "allocate: no candidate is smaller than the weight")
                         for layer in layers}
            return PassResult(modified=False)
        meter = ctx.analysis("degradation", allocate=cfg)
        costs = [np.array([c.bits for c in t.candidates], np.float64) for t in tols]
        losses = [np.array([c.predicted for c in t.candidates], np.float64) for t in tols]
        params = sum(t.layer.params for t in tols)
        kind, target = _goal(ctx, cfg, tols)
        if kind == "budget":
            found = within_budget(costs, losses, target)
            if found is None:
                cheapest = sum(c.min() for c in costs) / params
                raise LrqError(f"the goal leaves {target / params:.3f} bits per weight for the selected layers, below "
                               f"the cheapest choice "
                               f"({cheapest:.3f} bits per weight over the selected layers); raise the target")
        else:
            found = within_loss(costs, losses, target)
            if found is None:  # unreachable: keeping every layer predicts zero loss
                raise LrqError("no choice of representations meets the quality goal")
        choice = [int(i) for i in found.choice]
        hessians, sweeps = ctx.analysis("hessians"), cfg.polish_sweeps
        for t, c in zip(tols, choice):
            _polish(t, c, hessians, sweeps)
        measured = _measure(meter, tols, choice)
        repairs = 0
        if kind == "loss":
            while measured > target and repairs < cfg.repair_steps and _upgrade(tols, choice):
                repairs += 1
                for t, c in zip(tols, choice):
                    _polish(t, c, hessians, sweeps)
                measured = _measure(meter, tols, choice)
        met = measured <= target if kind == "loss" else True
        if not met:
            log.warning("allocate: measured degradation %.4g still misses the goal %.4g after %d repairs",
                        measured, target, repairs)
        self._apply(ctx, tols, choice)
        self._report(ctx, cfg, tols, choice, costs, losses, params, kind, target, measured, repairs, met, meter)
        return PassResult(modified=False, preserved=None)

    @staticmethod
    def _apply(ctx: Context, tols: list[LayerTolerance], choice: list[int]) -> None:
        plans = {layer.weight: LayerPlan(layer, None, "allocate: no candidate is smaller than the weight")
                 for layer in ctx.analysis("layers") if layer.rewrite}
        for t, c in zip(tols, choice):
            cand = t.candidates[c]
            allocation = {"choice": cand.label, "predicted": cand.predicted, "sensitivity": t.sensitivity,
                          "probe": t.probe, "check": t.check}
            if cand.rep is None:
                plans[t.layer.weight] = LayerPlan(t.layer, None, "allocate: kept in float", allocation=allocation)
                continue
            q = cand.rep.chains[0][0]
            settings = {"method": cand.rep.method, "rank": cand.rep.rank, "bits": q.bits, "block": q.block_size,
                        "symmetric": q.symmetric}
            plans[t.layer.weight] = LayerPlan(t.layer, cand.rep, "", settings, act_error=round(cand.error, 6),
                                              allocation=allocation)
        ctx.plans = plans

    @staticmethod
    def _report(ctx, cfg, tols, choice, costs, losses, params, kind, target, measured, repairs, met, meter):
        metric = meter.metric
        checks = [t.check for t in tols if t.check is not None]
        uniform = []  # every menu entry on all layers: the baselines of the quality-vs-size curve
        for label in dict.fromkeys(c.label for t in tols for c in t.candidates if c.rep is not None):
            picks = [next((j for j, c in enumerate(t.candidates) if c.label == label), len(t.candidates) - 1)
                     for t in tols]
            bits = sum(t.candidates[j].bits for t, j in zip(tols, picks))
            uniform.append({"label": label, "bpw": bits / params, "measured": _measure(meter, tols, picks)})
        ctx.allocation = AllocationSummary(
            mode=cfg.mode, metric=metric, goal={k: v for k, v in dataclasses.asdict(cfg).items()
                                                if k in ("target_bpw", "target_size", "min_cosine", "max_kl",
                                                         "max_metric") and v is not None},
            bpw=sum(t.candidates[c].bits for t, c in zip(tols, choice)) / params,
            predicted=float(sum(t.candidates[c].predicted for t, c in zip(tols, choice))),
            measured=measured, target_loss=target if kind == "loss" else None, met=met, repairs=repairs,
            spearman=spearman([c[1] for c in checks], [c[2] for c in checks]) if len(checks) > 2 else None,
            frontier=[(cost / params, loss) for cost, loss in frontier(costs, losses)], uniform=uniform)
        log.info("allocate: %.3f bits per weight, predicted %s %.4g, measured %.4g%s",
                 ctx.allocation.bpw, metric, ctx.allocation.predicted, measured, "" if met else " (goal missed)")
