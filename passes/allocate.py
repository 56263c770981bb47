"""allocate: choose each layer's representation from the ``tolerance`` candidates to meet a goal.

Modes (AllocateConfig):
  - quality: the least predicted degradation whose storage fits ``target_bpw`` bits per weight
    over the selected layers (kept layers count at their float size; embedding tables take a fixed
    grid outside it (tolerance.guard_menu) unless ``tables_in_budget``) or ``target_size``
    bytes for the whole model;
  - compact: the smallest storage whose predicted degradation is within ``min_cosine`` (1 − mean
    cosine of the first output) or ``max_kl`` (logits);
  - lossless (``labels``): the smallest storage that loses nothing on the search half of the
    labelled samples (every sample the original classifies right stays right; lrqgraph.labels):
    a bisection over the compact mode's KL goal (log scale, 12 steps), each step's choice
    measured on the labelled samples; the result is checked on the validation half, which the
    search never saw (the report's "labelled" entry).
All are a multiple-choice knapsack (lrqgraph.numerics.allocation). The choice is then measured
end to end on the calibration inputs; in compact mode, while the measurement misses the goal, the
layer with the largest predicted share moves to its next more precise candidate (at worst, back to
float) and the model is measured again. A goal that cannot be met is an error naming the cheapest
or most precise reachable point; a repair budget that runs out is reported and warned about.
The plans it sets are what ``lower`` emits, as after ``factorize``.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from lrqgraph.config import AllocateConfig, describe_config, with_fields
from lrqgraph.results import AllocationSummary
from lrqgraph.errors import LrqError
from lrqgraph.external import ALIGN, ALIGN_FROM
from lrqgraph.labels import load_labelled
from lrqgraph.methods import configure
from lrqgraph.numerics import Representation, activation_error
from lrqgraph.numerics.allocation import frontier, within_budget, within_loss
from lrqgraph.numerics.refine import refine
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass
from lrqgraph.plan import LayerPlan
from lrqgraph.progress import progress

from .factorize import factorize_weight
from .latency_budget import screen
from .lower import FOLD, LEVEL_TABLE_BITS, widened
from .tolerance import LayerTolerance, allocation_scales, spearman, stored_layout

log = logging.getLogger(__name__)


def budgeted_params(tols: list[LayerTolerance]) -> tuple[int, int]:
    """(parameters the bits per weight are over, bits of the layers outside the budget at their
    fixed grid: tables under --target-bpw, see AllocateConfig.tables_in_budget)."""
    return (sum(t.layer.params for t in tols if t.budgeted),
            sum(t.candidates[0].bits for t in tols if not t.budgeted))


# what a rewritten layer adds to the file besides its codes and scales: its nodes and tensor headers
# (measured: 270 to 330 bytes a layer), and the padding that aligns a tensor of 1 MiB or more in
# the external data (less than external.ALIGN each; codes and, for a table, scales)
NODE_BYTES = 512
# ... and for codes widened when the session loads (lower.widened): up to 8 more nodes a layer,
# plus the ops that make the lookup tables, once per model (Emitter.lookup_tables: about 4 KB)
WIDEN_BYTES, WIDEN_TABLE_BYTES = 1280, 4096
# ... and for a weight rebuilt when the session loads (lower.FOLD): about 10 nodes and 200 bytes of
# shapes a factor; the ops that make its table of levels once per code width (Emitter.level_table,
# about 1.5 KB; other widths' integer constants under 512 bytes)
FOLD_BYTES, LEVEL_TABLE_BYTES, UNPACK_BYTES = 2560, 1536, 512


def rewrite_overhead(config, tols: list[LayerTolerance]) -> int:
    """An upper bound on the bytes a rewrite adds beyond its candidates' storage: the layers' nodes
    and padding, and the metadata lrqgraph.api writes (the config, the pipeline: 512 bytes and more)."""
    big = sum(1 for t in tols if max((c.bits for c in t.candidates if c.rep is not None), default=0) / 8 >= ALIGN_FROM)
    metadata = len(json.dumps(describe_config(config), sort_keys=True, default=str)) + 1024
    factors = [(c, q) for t in tols for c in t.candidates if c.rep is not None for chain in c.rep.chains for q in chain]
    widen = any(widened(q) and config.lowering == "ort" and c.lowering != FOLD for c, q in factors)
    fold = {q.bits for c, q in factors if c.lowering == FOLD}
    tables = WIDEN_TABLE_BYTES * widen + sum(LEVEL_TABLE_BYTES if b in LEVEL_TABLE_BITS else UNPACK_BYTES for b in fold)
    return NODE_BYTES * len(tols) + 2 * ALIGN * big + metadata + tables


def knapsack_costs(config, tols: list[LayerTolerance]) -> list[np.ndarray]:
    """Each candidate's bits, and for --target-size also the nodes that widen its codes (WIDEN_BYTES)
    or rebuild its weight when the session loads (FOLD_BYTES a factor)."""
    def structure(c) -> int:
        if c.rep is None:
            return 0
        factors = [q for chain in c.rep.chains for q in chain]
        if c.lowering == FOLD:
            return FOLD_BYTES * len(factors)
        return WIDEN_BYTES if config.lowering == "ort" and any(widened(q) for q in factors) else 0
    size = config.allocate.target_size is not None
    return [np.array([c.bits + (8 * structure(c) if size else 0) for c in t.candidates], np.float64) for t in tols]


def _goal(ctx: Context, cfg, tols: list[LayerTolerance]) -> tuple[str, float]:
    """(cfg.mode, its target): ('quality', bits), ('compact', max predicted degradation) or ('lossless', 0)."""
    params, fixed = budgeted_params(tols)
    if cfg.target_bpw is not None:
        return "quality", cfg.target_bpw * params + fixed
    if cfg.target_size is not None:
        selected_bytes = sum(t.candidates[-1].bits for t in tols) / 8  # their float storage today
        other = ctx.model.constant_bytes() - selected_bytes + ctx.model.structure_bytes + rewrite_overhead(ctx.config, tols)
        if cfg.target_size <= other:
            raise LrqError(f"--target-size {cfg.target_size} bytes is below the {int(other)} bytes the model "
                           f"keeps outside the selected layers (its graph included); raise it or select more layers")
        return "quality", (cfg.target_size - other) * 8
    if cfg.labels is not None:
        return "lossless", 0.0
    if cfg.min_cosine is not None:
        return "compact", 1.0 - cfg.min_cosine
    return "compact", cfg.max_kl if cfg.max_kl is not None else cfg.max_metric


def _refit(ctx: Context, tols: list[LayerTolerance], choice: list[int], hessians: dict, sweeps: int) -> None:
    """The chosen candidates fitted again with all calibration samples (their ranking used H
    without the measured ones), on the executor; tables are data-free (tolerance.table_menu)."""
    todo = [(t, t.candidates[c]) for t, c in zip(tols, choice)
            if t.candidates[c].rep is not None and t.candidates[c].settings is not None and not t.layer.gathers
            and hessians.get(t.layer.weight) is not None]

    def args(t: LayerTolerance, cand) -> tuple:
        method, fields = cand.settings
        base = ctx.config.factorize.for_layer(t.layer.name, t.layer.weight)
        return (t.layer.weight_matrix(), configure(base, method=method, **fields),
                allocation_scales(base, t.layer.dtype), hessians[t.layer.weight], sweeps)

    made = ctx.executor.map(refit_representation, (args(t, cand) for t, cand in todo),
                            costs=[t.layer.params * (1 + sweeps) for t, _ in todo])
    for (t, cand), (rep, error) in zip(progress(todo, "refit"), made):
        if rep is not None and rep.storage_bits() == cand.bits:  # (storage follows from the settings)
            cand.rep, cand.error, cand.polished = rep, error, True


def refit_representation(w: np.ndarray, cfg, scale_dtype: str, h: np.ndarray, sweeps: int
                         ) -> tuple[Representation | None, float]:
    """``cfg``'s representation of ``w`` fitted on ``h``, then, for GPTQ grids, ``sweeps`` of
    coordinate descent on codes and scales; with its activation-aware error. An executor task."""
    rep, _ = factorize_weight(w, cfg, scale_dtype, h)
    if rep is None:
        return None, float("nan")
    if sweeps and rep.method == "gptq":
        rotation = rep.rotation
        target, stats = (w, h) if rotation is None else (rotation.rotate_weight(w), rotation.rotate_hessian(h))
        q = refine(target, rep.chains[0][0], stats, sweeps)
        rep = dataclasses.replace(rep, chains=((q,),), info={**rep.info, "sweeps": sweeps})
    return rep, activation_error(w, rep.dequantize(), h)


class _Measurer:
    """Measures a choice (one candidate index per layer) end to end. The dense layouts of the
    previous choice are kept: successive choices (joint, each family alone, uniform grids) share
    most layers, and dequantizing a 262144-word table costs seconds."""

    def __init__(self, meter):
        self.meter, self.metric = meter, meter.metric
        self._layouts: dict[int, tuple] = {}  # id(rep) -> (rep, layout); the rep held so its id stays its own

    def __call__(self, tols: list[LayerTolerance], choice: list[int], compare: bool = False) -> float:
        """The choice's measured degradation; ``compare``: a value only compared with other choices
        or reported (Degradation.measure_one, on a decoder's vocabulary cut), never checked against a goal."""
        layouts, replaced = {}, {}
        for t, c in zip(tols, choice):
            rep = t.candidates[c].rep
            if rep is None:
                continue
            layouts[id(rep)] = self._layouts.get(id(rep)) or (rep, stored_layout(t.layer, rep))
            replaced[t.layer.weight] = layouts[id(rep)][1]
        self._layouts = layouts
        return max((self.meter.measure_one if compare else self.meter.measure)(replaced), 0.0)


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
            raise LrqError("allocate needs a goal: --target-bpw, --target-size, --min-cosine, --max-kl or --labels")
        # a layer with no candidate but keep stays in: the goal counts it at its float size
        measured_tols = list(ctx.analysis("tolerance", allocate=cfg))  # every candidate, for the proxy checks
        tols, latency = screen(ctx, cfg, measured_tols)
        layers = [layer for layer in ctx.analysis("layers") if layer.rewrite]
        params, fixed = budgeted_params(tols)
        if tols and not params:
            raise LrqError("every selected layer is an embedding table, which --target-bpw keeps at a fixed grid "
                           "outside its budget; give --target-size, or --tables-in-budget")
        if not any(len(t.candidates) > 1 for t in measured_tols):
            ctx.plans = {layer.weight: LayerPlan(layer, None, "allocate: no candidate is smaller than the weight")
                         for layer in layers}
            return PassResult(modified=False)
        measure = _Measurer(ctx.analysis("degradation", allocate=cfg))
        costs = knapsack_costs(dataclasses.replace(ctx.config, allocate=cfg), tols)
        losses = [np.array([c.predicted for c in t.candidates], np.float64) for t in tols]

        def per_weight(cost: float) -> float:
            return (cost - fixed) / params
        kind, target = _goal(ctx, cfg, tols)
        labelled = None
        if kind == "lossless":
            search, validation = load_labelled(cfg.labels, ctx.model.to_onnx(), [t.layer.weight for t in tols],
                                               cfg.labels_seed)
            lost = _Measurer(search.meter)
            found = _lossless_search(tols, costs, losses, lost)
        else:
            found = _solve(kind, target, costs, losses)
        if kind == "quality":
            if found is None:
                cheapest = per_weight(sum(c.min() for c in costs))
                within = " within the latency budget" if latency is not None else ""
                advice = "; raise the target" + (", --max-latency, or give --latency-budget off" if within else "")
                raise LrqError(f"the goal leaves {per_weight(target):.3f} bits per weight for the selected layers, below "
                               f"the cheapest choice{within} "
                               f"({cheapest:.3f} bits per weight over the selected layers){advice}")
        elif found is None:  # unreachable: keeping every layer predicts zero loss
            raise LrqError("no choice of representations meets the quality goal")
        choice = [int(i) for i in found.choice]
        # candidates were fitted without the measured samples: every comparison below is out of sample
        compare = kind == "quality"  # a budget's measurements before the refit only compare choices
        measured = measure(tols, choice, compare)
        log.info("allocate: the joint choice measures %s %.4g (predicted %.4g)", measure.metric, measured, found.loss)
        repairs = 0
        if kind == "compact":
            while measured > target and repairs < cfg.repair_steps and _upgrade(tols, choice):
                repairs += 1
                measured = measure(tols, choice)
        families = {}  # each family alone at the same goal, measured: the comparison the report shows
        joint = measured
        for family in dict.fromkeys(c.family for t in tols for c in t.candidates if c.rep is not None):
            alone = _family_alone(tols, costs, family, kind, target) if kind != "lossless" else None
            entry = {"alone": None}
            if alone is not None:
                picks = [int(i) for i in alone.choice]
                got = measure(tols, picks, compare)
                log.info("allocate: %s alone measures %s %.4g", family, measure.metric, got)
                entry["alone"] = {"bpw": per_weight(alone.cost), "predicted": alone.loss, "measured": got}
                # a budget: the joint choice stands unless one family alone measures better
                # (predictions of small one-layer effects add up with noise)
                if kind == "quality" and got < measured:
                    choice, measured = picks, got
            families[family] = entry
        for family, entry in families.items():
            entry["layers"] = sum(t.candidates[c].family == family for t, c in zip(tols, choice))
            entry["frontier"] = [(per_weight(cost), loss) for cost, loss in frontier(*_restricted(tols, costs, family))]
        held_out = measured
        uniform = _uniform(measure, tols, per_weight)
        hessians = ctx.analysis("hessians")
        if hessians:  # the chosen candidates again from all calibration samples, then polished
            _refit(ctx, tols, choice, hessians, cfg.polish_sweeps)
            measured = measure(tols, choice)
        if kind == "lossless":  # the refit moved every chosen layer: the search accuracy again, repaired
            while lost(tols, choice) > 0 and repairs < cfg.repair_steps and _upgrade(tols, choice):
                repairs += 1
            measured = measure(tols, choice)
            labelled = _labelled_entry(tols, choice, search, validation)
        met = measured <= target if kind == "compact" else True
        if labelled is not None:
            v = labelled["validation"]
            met = v["accuracy"] >= v["original"]["accuracy"]  # the task's metric; the log-loss is reported beside it
        if not met and labelled is not None:
            log.warning("allocate: top-1 accuracy %.4f on the validation half is below the original's %.4f",
                        v["accuracy"], v["original"]["accuracy"])
        elif not met:
            log.warning("allocate: measured degradation %.4g still misses the goal %.4g after %d repairs",
                        measured, target, repairs)
        self._apply(ctx, tols, choice)
        self._report(ctx, cfg, tols, choice, costs, per_weight, kind, target, (measured, joint, held_out), repairs, met,
                     measure, families, uniform, labelled, latency, measured_tols)
        return PassResult(modified=False, preserved=None)

    @staticmethod
    def _apply(ctx: Context, tols: list[LayerTolerance], choice: list[int]) -> None:
        plans = {layer.weight: LayerPlan(layer, None, "allocate: no candidate is smaller than the weight")
                 for layer in ctx.analysis("layers") if layer.rewrite}
        for t, c in zip(tols, choice):
            cand = t.candidates[c]
            allocation = {"choice": cand.label, "family": cand.family, "predicted": cand.predicted, "sensitivity": t.sensitivity,
                          "probe": t.probe, "probe_estimated": t.estimated, "check": t.check,
                          "family_checks": t.family_checks}
            if cand.rep is None:
                plans[t.layer.weight] = LayerPlan(t.layer, None, "allocate: kept in float", allocation=allocation)
                continue
            q = cand.rep.chains[0][0]
            settings = {"method": cand.rep.method, "family": cand.family, "rank": cand.rep.rank, "bits": q.bits,
                        "block": getattr(q, "block_size", None), "symmetric": getattr(q, "symmetric", None)}
            if cand.lowering:
                settings["lowering"] = cand.lowering
            plans[t.layer.weight] = LayerPlan(t.layer, cand.rep, "", settings, act_error=round(cand.error, 6),
                                              allocation=allocation, lowering=cand.lowering)
        ctx.plans = plans

    @staticmethod
    def _report(ctx, cfg, tols, choice, costs, per_weight, kind, target, measured, repairs, met, measure, families,
                uniform, labelled=None, latency=None, measured_tols=None):
        measured, joint, held_out = measured
        losses = [np.array([c.predicted for c in t.candidates], np.float64) for t in tols]
        metric = measure.metric
        checks = [t.check for t in tols if t.check is not None]
        ctx.allocation = AllocationSummary(
            mode=cfg.mode, metric=metric, goal={**cfg.goals(), "labels_seed": cfg.labels_seed},
            bpw=per_weight(sum(t.candidates[c].bits for t, c in zip(tols, choice))),
            predicted=float(sum(t.candidates[c].predicted for t, c in zip(tols, choice))),
            measured=measured, joint_measured=joint, held_out=held_out, target_loss=target if kind == "compact" else None, met=met,
            repairs=repairs,
            spearman=spearman([c[1] for c in checks], [c[2] for c in checks]) if len(checks) > 2 else None,
            spearman_by_family=_spearman_by_family(measured_tols or tols),
            frontier=[(per_weight(cost), loss) for cost, loss in frontier(costs, losses)], uniform=uniform,
            families=families, labelled=labelled,
            latency=None if latency is None else {"rows": list(latency.rows), "reference": latency.reference,
                                                  "max_latency": latency.max_latency, "dropped": latency.dropped,
                                                  "estimate_ms": latency.estimate(tols, choice),
                                                  "folded_layers": sum(t.candidates[c].lowering == FOLD
                                                                       for t, c in zip(tols, choice))})
        log.info("allocate: %.3f bits per weight, predicted %s %.4g, measured %.4g%s; families %s",
                 ctx.allocation.bpw, metric, ctx.allocation.predicted, measured, "" if met else " (goal missed)",
                 ", ".join(f"{f} {v['layers']}" for f, v in families.items()))


def _uniform(measure, tols: list[LayerTolerance], per_weight) -> list[dict]:
    """Each symmetric dense grid that every budgeted layer holds (screening leaves a role only its
    frontier's grids), on every layer, measured: the baselines of the quality-vs-size curve, out of
    sample like the choice. GPTQ and data-free RTN candidates of a grid are the same grid; a layer
    without it (a table at its fixed grid) takes its nearest one with at least as many bits,
    or stays in float."""
    def grid(c) -> tuple[int, int]:
        q = c.rep.chains[0][0]
        return q.bits, q.block_size

    def nearest(t: LayerTolerance, bits: int, block: int) -> int:
        dense = [(j, grid(c)) for j, c in enumerate(t.candidates) if c.family == "dense" and c.rep.chains[0][0].symmetric]
        fits = [(g[0] - bits, abs(np.log2(g[1] / block)), j) for j, g in dense if g[0] >= bits]
        return min(fits)[2] if fits else len(t.candidates) - 1

    out = []
    held = [{grid(c) for c in t.candidates if c.family == "dense" and c.rep.chains[0][0].symmetric}
            for t in tols if t.budgeted]
    held = [grids for grids in held if grids]
    for bits, block in sorted(set.intersection(*held)) if held else []:
        picks = [nearest(t, bits, block) for t in tols]
        cost = sum(t.candidates[j].bits for t, j in zip(tols, picks))
        out.append({"label": f"{bits}b g{block}", "bpw": per_weight(cost), "measured": measure(tols, picks, True)})
        log.info("allocate: uniform %db g%d measures %s %.4g", bits, block, measure.metric, out[-1]["measured"])
    return out


def _spearman_by_family(tols: list[LayerTolerance]) -> dict[str, float | None]:
    by_family: dict[str, list[tuple[float, float]]] = {}
    for t in tols:
        if t.check is not None:
            by_family.setdefault(_family_of(t, t.check[0]), []).append(t.check[1:])
        for family, (_, predicted, got) in t.family_checks.items():
            by_family.setdefault(family, []).append((predicted, got))
    return {f: (spearman(*zip(*pairs)) if len(pairs) > 2 else None) for f, pairs in by_family.items()}


def _family_of(t: LayerTolerance, label: str) -> str:
    return next(c.family for c in t.candidates if c.label == label)


def _restricted(tols: list[LayerTolerance], all_costs: list[np.ndarray], family: str
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Costs and losses with every candidate outside ``family`` (and keep) priced out of reach; a
    layer that has no candidate of the family (an embedding table: dense grids only) keeps its dense ones."""
    losses = []
    for t in tols:
        allowed = {family, "keep"} if any(c.family == family for c in t.candidates) else {"dense", "keep"}
        inside = np.array([c.family in allowed for c in t.candidates])
        losses.append(np.where(inside, [c.predicted for c in t.candidates], np.inf))
    return all_costs, losses


def _lossless_search(tols: list[LayerTolerance], costs: list[np.ndarray], losses: list[np.ndarray], lost,
                     steps: int = 12):
    """The smallest choice along the compact mode's goals whose measured loss against the original
    (``lost``, on the labelled search samples: lrqgraph.labels.loss_against) is not above zero:
    the cheapest choice first, then a bisection of the predicted-loss goal on a log scale down to
    the least lossy change (one layer at its most precise candidate); a choice met again is not
    measured again. Keeping every layer (the original) is the fallback, lossless by definition."""
    cheapest = within_budget(costs, losses, sum(float(c.min()) for c in costs))
    passing = [within_loss(costs, losses, 0.0)]  # zero predicted loss: every layer kept (or lossless)
    high = float(cheapest.loss) if cheapest is not None and np.isfinite(cheapest.loss) else 0.0
    positive = [float(v) for loss in losses for v in loss if 0 < v < np.inf]
    low = min(positive, default=0.0)
    verdicts: dict[tuple, bool] = {}
    goal = high
    for step in progress(range(steps + 1), "lossless search"):
        found = within_loss(costs, losses, goal) if goal > 0 else None
        if found is not None:
            key = tuple(int(i) for i in found.choice)
            if key not in verdicts:
                verdicts[key] = lost(tols, list(key)) <= 0
                log.info("allocate: lossless step %d: predicted kl %.4g, %.0f bits, %s", step, found.loss,
                         found.cost, "nothing lost" if verdicts[key] else "a sample the original gets right lost")
            if verdicts[key]:
                passing.append(found)
                if step == 0:
                    break  # the cheapest model loses nothing
                low = goal
            else:
                high = goal
        if not 0 < low < high:
            break
        goal = float(np.sqrt(low * high))
    return min((p for p in passing if p is not None), key=lambda p: p.cost)


def _labelled_entry(tols: list[LayerTolerance], choice: list[int], search, validation) -> dict:
    """Top-1 accuracy and log-loss of the original and of the choice on both halves of the labelled samples."""
    replaced = {t.layer.weight: stored_layout(t.layer, t.candidates[c].rep) for t, c in zip(tols, choice)
                if t.candidates[c].rep is not None}
    entry = {name: {"samples": half.samples, "original": half.original(), **half.scored(replaced)}
             for name, half in (("search", search), ("validation", validation))}
    for name, e in entry.items():
        log.info("allocate: %s half (%d samples): top-1 accuracy %.4f (original %.4f), log-loss %.4f (original %.4f)",
                 name, e["samples"], e["accuracy"], e["original"]["accuracy"], e["log_loss"], e["original"]["log_loss"])
    return entry


def _solve(kind: str, target: float, costs: list[np.ndarray], losses: list[np.ndarray]):
    """The knapsack for the goal: least loss within a budget, or least cost within a loss."""
    if kind == "quality":
        found = within_budget(costs, losses, target)
    else:
        found = within_loss(costs, losses, target)
    return found if found is not None and np.isfinite(found.loss) else None


def _family_alone(tols: list[LayerTolerance], costs: list[np.ndarray], family: str, kind: str, target: float):
    """The allocation at the same goal with only ``family``'s candidates (and keep) allowed."""
    return _solve(kind, target, *_restricted(tols, costs, family))
