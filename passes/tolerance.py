"""tolerance: per layer, the candidate representations and each one's predicted share of the
end-to-end degradation.

1. Candidates: every registered method's menu for the lowering, across representation families
   (dense GPTQ grids, symmetric and asymmetric; Q + L·R started from the dense candidate of its
   Q grid; L·R alone; Kashin and k-means codebooks where the lowering runs them), or
   AllocateConfig.menu; each computed for real (GPTQ with calibration statistics, RTN
   without), with its exact storage bits and
   its activation-aware error e = sqrt(tr(ΔWᵀHΔW) / tr(WᵀHW)) (relative Frobenius error when
   data-free). Keeping the float weight is always a candidate (e = 0). Screening
   (``screen_layers``): per role, that many layers solve the whole menu first; the role's other
   layers solve only the entries on some family's frontier of e² against bits in one of them
   (the lower convex hull: what a knapsack picks at some price of bits). Menus are solved on the
   executor (lrqgraph.executor) while this process measures the layers already solved.
2. Calibration of the proxy: each layer alone is replaced by its cheapest dense candidate (the probe)
   and the model's degradation d is measured in onnxruntime on the calibration inputs (see
   lrqgraph.evaluate). Small perturbations degrade the output quadratically, so a layer's
   sensitivity is s = d_probe / e_probe² and a candidate is predicted to cost s · e². Beyond
   ``probe_layers`` layers, only a sample of each role (q, k, ..., down: the name without its
   numbers, and the shape) is measured, at spread depths; the others take their role's
   sensitivity interpolated at their depth (log-linear): a 127-layer decoder costs ``probe_layers`` runs.
3. Check: with ``validate``, ``check_layers`` layers spread over the model (or every layer) are
   also measured alone at a second, finer candidate, and the report gives predicted against
   measured (and their Spearman rank correlation over layers): the prediction there comes from
   the probe, never from the value it is compared with. The allocator then predicts from both
   measurements: a power law between them, quadratic beyond; the other layers take the median
   power of the checked ones. The checked layers are also measured at one candidate of every
   other family: the proxy's rank correlation per family (the error e is comparable across
   families, the sensitivity is the layer's). Candidates are fitted on H without the measured
   samples (calibrate.fit_hessians), so every measurement is out of sample.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np

import lrqgraph.calib as calib
from lrqgraph.cache import cache_key
from lrqgraph.config import describe_config
from lrqgraph.errors import LrqError
from lrqgraph.evaluate import Degradation
from lrqgraph.kvcache import past_inputs
from lrqgraph.methods import METHODS, MethodConfig, configure
from lrqgraph.numerics import HessianInfo, Representation, activation_error, relative_error
from lrqgraph.numerics.allocation import lower_hull
from lrqgraph.numerics.representation import OUTPUT_ERROR
from lrqgraph.numerics.gptq import output_energy
from lrqgraph.passmanager import Context, register_analysis
from lrqgraph.plan import Layer
from lrqgraph.progress import progress

from .calibrate import measured_samples
from .factorize import factorize_weight, factorize_weights
from .lower import TABLE_BITS, check_layer, layer_target

log = logging.getLogger(__name__)
# the code its checkpointed results come from: a change to it starts them anew
TOLERANCE_CODE = ("lrqgraph.numerics", "lrqgraph.methods", "lrqgraph.evaluate", "lrqgraph.passes.factorize", __name__)


@dataclass
class Candidate:
    label: str
    rep: Representation | None     # None: keep the float weight
    bits: int                      # storage of the layer's weight in this form
    error: float                   # activation-aware (or relative Frobenius) error
    predicted: float = float("nan")  # predicted end-to-end degradation when only this layer changes
    polished: bool = False           # coordinate descent applied (after being chosen)
    family: str = "keep"             # dense, rotated, qlr, lowrank, kashin, kmeans (Method.family_of), or keep
    settings: tuple[str, dict] | None = None  # (method, fields) it was made with: the final refit remakes it
    lowering: str | None = None      # its own lowering when the latency budget picks one (lower.FOLD)


@dataclass
class LayerTolerance:
    layer: Layer
    candidates: list[Candidate]
    sensitivity: float = float("nan")
    probe: tuple[str, float] | None = None      # (label, measured degradation)
    check: tuple[str, float, float] | None = None  # (label, predicted, measured)
    power: float | None = None                  # of the power law through the probe and the check
    estimated: bool = False                     # not measured: the sensitivity of its role at its depth
    # other families' check candidates on a sample of layers: family -> (label, predicted, measured)
    family_checks: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    budgeted: bool = True  # False: a table at its fixed grid (guard_menu), outside the bpw goal


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


def menu_for(lowering: str, custom: tuple[tuple[int, int], ...] = (),
             families: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """(method, fields) of every candidate: each registered method's menu for the lowering (methods
    that start from a dense candidate after the dense ones; only ``families`` if given), or a
    custom (bits, block) menu of gptq grids. Without the dense family, Q + L·R quantizes its own Q."""
    if custom:
        return [("gptq", {"bits": bits, "block_size": block, "sweeps": 0}) for bits, block in custom]
    ordered = sorted(METHODS.items(), key=lambda item: item[1].warm_start)
    return [(name, fields) for name, m in ordered for fields in m.menu(lowering)
            if not families or m.family_of(fields) in families]


def candidate_label(rep: Representation) -> str:
    """The candidate as stored: method, grid (a block longer than K is stored as K), rank."""
    def grid(q) -> str:
        return f"{q.bits}b g{q.block_size}{'' if q.symmetric else ' asym'}"
    rotated = "rot " if rep.rotation is not None else ""
    if rep.form == "dense":
        return f"{rep.method} {rotated}{grid(rep.chains[0][0])}"
    if rep.form in ("lowrank", "dense+lowrank"):
        left = next(c for c in rep.chains if len(c) == 2)[0]
        dense = [c[0] for c in rep.chains if len(c) == 1]
        return f"{rep.method} {rotated}{grid(dense[0]) + ' + ' if dense else ''}r{rep.rank}x{left.bits}b"
    return f"{rep.method} {rep.chains[0][0].bits}b"


def solve_args(layer: Layer, menu: list[tuple[str, dict]], method_cfg: MethodConfig,
               h: np.ndarray | None) -> tuple:
    """The arguments of ``menu_representations`` for this layer (an executor task: arrays and configs)."""
    w = layer.weight_matrix()
    menu, h = layer_menu(layer, menu, h)
    cfgs = [configure(method_cfg, method=method, **fields) for method, fields in menu]
    return w, menu, cfgs, allocation_scales(method_cfg, layer.dtype), h, layer.stored_bits


def layer_menu(layer: Layer, menu: list[tuple[str, dict]], h: np.ndarray | None
               ) -> tuple[list[tuple[str, dict]], np.ndarray | None]:
    """An embedding table takes its own menu, data-free (table_menu); every other layer the menu and H."""
    return (table_menu(menu, layer.shape[0]), None) if layer.gathers else (menu, h)


def _grid(fields: dict) -> tuple:
    """The Q grid of a menu entry: a warm-started entry starts from the dense entry of its grid."""
    return fields.get("bits"), fields.get("block_size"), fields.get("symmetric", True), fields.get("rotate", False)


def menu_representations(w: np.ndarray, menu: list[tuple[str, dict]], cfgs: list[MethodConfig], scale_dtype: str,
                         h: np.ndarray | None, float_bits: int) -> list[tuple[Representation, float] | None]:
    """Each menu entry's representation of ``w`` with its activation-aware error (relative
    Frobenius without H), or None where the method makes none, it takes no fewer bits than the
    float weight, or an earlier entry made the same candidate (a block longer than K is K). One
    layer's solve, pure numpy: an executor task. H is factorized once for every entry; methods
    with ``warm_start`` (Q + L·R) start from the dense candidate of their Q grid."""
    info = HessianInfo.of(h)
    cold = [i for i, (method, _) in enumerate(menu) if not METHODS[method].warm_start]
    made = dict(zip(cold, factorize_weights(w, [cfgs[i] for i in cold], scale_dtype, info)))
    out, dense, labels, energy = [], {}, set(), None
    for i, (method, fields) in enumerate(menu):
        grid = _grid(fields)
        if i in made:
            rep, _ = made.pop(i)
        else:  # started from the dense candidate of its grid, made above (warm-started methods come last)
            rep, _ = factorize_weight(w, cfgs[i], scale_dtype, info, warm=dense.get(grid))
        if rep is not None and rep.form == "dense":
            dense[grid] = rep  # Q + L·R of the same grid starts from it
        if rep is None or rep.storage_bits() >= float_bits or candidate_label(rep) in labels:
            out.append(None)
            continue
        labels.add(candidate_label(rep))
        known = rep.info.get(OUTPUT_ERROR)
        if known is not None:  # the solver's own figure: not kept, a refit changes it
            rep = dataclasses.replace(rep, info={k: v for k, v in rep.info.items() if k != OUTPUT_ERROR})
        if h is not None and energy is None:
            energy = output_energy(w, h)
        if h is None:
            error = relative_error(w, rep.dequantize())
        elif known is not None:
            error = float(np.sqrt(known / energy)) if energy > 0 else float(np.sqrt(known))
        else:
            error = activation_error(w, rep.dequantize(), h, energy)
        out.append((rep, error))
    return out


def candidates_for(layer: Layer, menu: list[tuple[str, dict]], method_cfg: MethodConfig,
                   h: np.ndarray | None, lowering: str, keep: bool = True,
                   solved: list[tuple[Representation, float] | None] | None = None) -> list[Candidate]:
    """Every menu entry the lowering runs for this layer (cheapest first), then keeping the float
    weight (without ``keep``: only the cheapest entry, keeping when none runs). ``solved``: the
    layer's ``menu_representations``, if an executor made them already."""
    if solved is None:
        solved = menu_representations(*solve_args(layer, menu, method_cfg, h))
    menu, _ = layer_menu(layer, menu, h)
    out = [Candidate(candidate_label(rep), rep, rep.storage_bits(), error, family=METHODS[method].family_of(fields),
                     settings=(method, fields))
           for (method, fields), made in zip(menu, solved) if made is not None
           for rep, error in [made] if lowerable(layer, rep, lowering)]
    out.sort(key=lambda c: (c.bits, c.error))
    if not keep and out:
        return out[:1]
    out.append(Candidate("keep", None, layer.stored_bits, 0.0, predicted=0.0))
    return out


def guard_menu(target_bpw: float | None, tied_and_timed: bool = False) -> list[tuple[str, dict]]:
    """An embedding table's grid outside a --target-bpw budget (AllocateConfig.tables_in_budget):
    8 bits (the cheapest block its dimension takes) from 4 bits per weight up, where Gemma 3 270M
    measured 1.15x / 1.49x fp32 perplexity against 1.44x / 2.02x with its table competing at 4
    bits; below, the 4-bit grid of onnxruntime-genai's int4 (block 32, else 16): an 8-bit table would make
    a 3-bit model larger than a 4-bit one and, as a tied lm_head, slower on every token. The same
    4-bit grid for a tied lm_head under the latency budget (``tied_and_timed``): at 8 bits it reads
    twice the bytes of onnxruntime's 4-bit one on every token."""
    if tied_and_timed or (target_bpw is not None and target_bpw < 4):
        return [("gptq", {"bits": 4, "block_size": block, "symmetric": True, "sweeps": 0}) for block in (32, 16)]
    return [("gptq", {"bits": 8, "block_size": block, "symmetric": True, "sweeps": 0}) for block in (128, 64, 32)]


def table_menu(menu: list[tuple[str, dict]], dim: int) -> list[tuple[str, dict]]:
    """An embedding table's candidates: the menu's dense grids that lower rule 6 reads (4 or 8
    bits, blocks dividing the dimension), as plain round-to-nearest. The lookup side of a table
    has no input statistics, and GPTQ over a 262144-column tied lm_head costs minutes per grid."""
    grids = dict.fromkeys((f["bits"], f["block_size"], f.get("symmetric", True)) for m, f in menu
                          if METHODS[m].family_of(f) == "dense" and f.get("bits") in TABLE_BITS
                          and dim % f["block_size"] == 0)
    return [("rtn", {"bits": b, "block_size": g, "symmetric": sym, "clip_search": False}) for b, g, sym in grids]


def allocation_scales(cfg: MethodConfig, weight_dtype: str) -> str:
    """The scale type of the allocator's candidates: float16 unless ``--scale-dtype`` says
    otherwise. Every lowering stores float16 scales as they are (a float32 layer casts them once
    at load), so they halve the scale bytes at no cost in speed; their precision (11 bits) is far
    below any code's rounding error."""
    return "float16" if cfg.scale_dtype == "auto" else cfg.scales_for(weight_dtype)


def lowerable(layer: Layer, rep: Representation, lowering: str) -> bool:
    try:
        check_layer(layer, rep, lowering)
        return True
    except LrqError:
        return False


def measurement_batches(ctx: Context, config) -> tuple[list[dict[str, np.ndarray]], str]:
    """The first ``measure_samples`` calibration samples (synthetic inputs without --calib)."""
    data = ctx.analysis("calib_data")
    if data is not None:
        runs, _ = calib.split_runs(data.batches, measured_samples(ctx, config))
        source = f"{calib.count_samples(runs)} samples of {data.source}"
        return calib.pack_prompts(runs, past_inputs(ctx.model.graph)), source
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
    metric = cfg.metric_for(ctx.model.graph.outputs[0].name)
    return Degradation(ctx.model.to_onnx(), weights, batches, metric=metric, custom=cfg.metric)


@register_analysis("tolerance", requires=("layers", "fit_hessians", "degradation"),
                   config=("allocate", "factorize", "lowering"))
def layer_tolerance(ctx: Context, config) -> list[LayerTolerance]:
    cfg = config.allocate
    menus = {target: menu_for(target, cfg.menu, cfg.families) for target in dict.fromkeys((config.lowering, "std"))}
    hessians = ctx.analysis("fit_hessians", allocate=cfg)  # without the measured samples: see calibrate.fit_hessians
    meter = ctx.analysis("degradation", allocate=cfg)
    start = time.perf_counter()
    layers = [layer for layer in ctx.analysis("layers") if layer.rewrite]
    probed = probe_sample(layers, cfg.probe_layers)
    checked = len(probed) if cfg.check_layers is None else min(cfg.check_layers, len(probed))
    sampled = {probed[i] for i in np.linspace(0, len(probed) - 1, checked).round().astype(int)} if probed else set()
    probed = set(probed)
    # (layer, its menu, its method config, its H): the menus are solved on the executor, in order,
    # while this loop measures the layers already solved
    guarded = [not cfg.tables_join and bool(layer.gathers) for layer in layers]  # tables at a fixed grid
    work = [(layer, guard_menu(cfg.target_bpw, bool(layer.matmuls) and cfg.latency_budget) if guard else menus[layer_target(layer, config.lowering) if layer.kernel
                                                   else config.lowering],  # convolutions: std
             config.factorize.for_layer(layer.name, layer.weight), hessians.get(layer.weight))
            for layer, guard in zip(layers, guarded)]
    full = screen_sample(layers, cfg.screen_layers)
    rest = [i for i in range(len(layers)) if i not in full]
    saved = ctx.checkpoints("tolerance", meter_key(ctx, config))
    result: list[LayerTolerance | None] = [None] * len(layers)
    for i, layer in enumerate(layers):  # layers an interrupted run finished (--resume)
        fields = saved.get(i)
        if fields is not None:
            result[i] = LayerTolerance(layer, **fields)

    def solve(indices: list[int]):
        indices = [i for i in indices if result[i] is None]
        return ctx.executor.map(menu_representations, (solve_args(*work[i]) for i in indices),
                                costs=[work[i][0].params * len(work[i][1]) for i in indices])

    def solves():  # the screening layers first, then the others on their role's screened menus
        yield from solve(full)
        on_frontier = frontier_entries([result[i] for i in full])
        for i in rest:
            layer, menu, method_cfg, h = work[i]
            if not guarded[i] and role_of(layer) in on_frontier:
                work[i] = (layer, screened_menu(menu, on_frontier[role_of(layer)]), method_cfg, h)
        yield from solve(rest)

    solved = solves()
    for index in progress(full + rest, "tolerance"):
        if result[index] is not None:
            continue
        made = next(solved)
        layer, menu, method_cfg, h = work[index]
        cands = candidates_for(layer, menu, method_cfg, h, config.lowering, keep=not guarded[index], solved=made)
        tol = result[index] = LayerTolerance(layer, cands, budgeted=not guarded[index])
        lossy = [c for c in cands if c.rep is not None]
        if lossy and index in probed:
            # the probe: the cheapest dense grid (other families' cheapest can be far off the quadratic regime)
            probe = next((c for c in lossy if c.family == "dense"), lossy[0])
            measured = max(meter.measure_one({layer.weight: stored_layout(layer, probe.rep)}), 0.0)
            tol.probe = (probe.label, measured)
            tol.sensitivity = measured / probe.error ** 2 if probe.error > 0 else 0.0
            for c in lossy:
                c.predicted = tol.sensitivity * c.error ** 2
            same = [c for c in lossy if c.family == probe.family and c is not probe and c.error < probe.error]
            if cfg.validate and same and (cfg.check_layers is None or index in sampled):
                # the finest candidate of the probe's family below 8 bits (or the finest): where allocations land
                finer = [c for c in same if "8b" not in c.label] or same
                check = finer[len(finer) // 2]
                got = max(meter.measure_one({layer.weight: stored_layout(layer, check.rep)}), 0.0)
                tol.check = (check.label, check.predicted, got)  # the probe's prediction, before refining
                tol.power = _through_two_points(lossy, probe, check, measured, got)
            if cfg.validate and index in sampled:  # does the proxy hold for the other families too?
                for family in dict.fromkeys(c.family for c in lossy if c.family != probe.family):
                    own = [c for c in lossy if c.family == family]
                    pick = own[len(own) // 2]
                    got = max(meter.measure_one({layer.weight: stored_layout(layer, pick.rep)}), 0.0)
                    tol.family_checks[family] = (pick.label, pick.predicted, got)
        saved.put(index, {f.name: getattr(tol, f.name) for f in dataclasses.fields(tol) if f.name != "layer"})
    _unprobed_follow_their_role(result, probed)
    _unchecked_follow_the_checked(result)
    log.info("tolerance: %d layers, %d candidates in %.1f s", len(result),
             sum(len(t.candidates) for t in result), time.perf_counter() - start)
    return result


def meter_key(ctx: Context, config) -> str:
    """What the tolerance step's results depend on: the model, the calibration data and the config
    (the executor and --resume aside), for its checkpoints."""
    data = ctx.analysis("calib_data")
    return cache_key(ctx.model.digest(), data.digest if data is not None else "synthetic",
                     json.dumps(describe_config(config), sort_keys=True, default=str), code=TOLERANCE_CODE)


def screen_sample(layers: list[Layer], per_role: int | None) -> list[int]:
    """Indices of the layers that solve the whole menu, in model order: every layer without
    screening or in a role of at most ``per_role`` + 1 layers; otherwise ``per_role`` of each role
    at spread depths (first and last included)."""
    if per_role is None:
        return list(range(len(layers)))
    picked = []
    for members in _by_role(layers).values():
        if len(members) <= per_role + 1:
            picked += members
        else:
            picked += [members[j] for j in np.linspace(0, len(members) - 1, per_role).round().astype(int)]
    return sorted(set(picked))


def _entry(settings: tuple[str, dict]) -> tuple:
    method, fields = settings
    return method, tuple(sorted(fields.items()))


def frontier_entries(tols: list[LayerTolerance]) -> dict[tuple, set[tuple]]:
    """Per role, the menu entries on their family's frontier of error² against bits (the lower
    convex hull, keeping the float weight as its end) in at least one of these layers."""
    out: dict[tuple, set[tuple]] = {}
    for t in tols:
        kept = out.setdefault(role_of(t.layer), set())
        for family in {c.family for c in t.candidates if c.rep is not None}:
            own = [c for c in t.candidates if c.family in (family, "keep")]
            hull = lower_hull([c.bits for c in own], [c.error ** 2 for c in own])
            kept |= {_entry(own[i].settings) for i in hull if own[i].settings is not None}
    return out


def screened_menu(menu: list[tuple[str, dict]], kept: set[tuple]) -> list[tuple[str, dict]]:
    """The entries in ``kept``, and the dense grid each kept warm-started entry (Q + L·R) starts from."""
    warm = {_grid(f) for m, f in menu if METHODS[m].warm_start and _entry((m, f)) in kept}
    return [(m, f) for m, f in menu if _entry((m, f)) in kept
            or (METHODS[m].family_of(f) in ("dense", "rotated") and not METHODS[m].warm_start and _grid(f) in warm)]


def role_of(layer: Layer) -> tuple[str, tuple[int, ...]]:
    """A layer's place in the blocks a model repeats: its name with the numbers taken out, and its
    shape (exporters that name nodes by a counter leave the shape to tell q from gate)."""
    return re.sub(r"\d+", "#", layer.name), tuple(layer.shape)


def _by_role(layers: list[Layer]) -> dict[tuple, list[int]]:
    """Indices of the layers of each role, in model order (depth = position in the list)."""
    roles: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        roles.setdefault(role_of(layer), []).append(i)
    return roles


def probe_sample(layers: list[Layer], budget: int | None) -> list[int]:
    """Indices of the layers measured at their probe: every layer within the budget; beyond it,
    each role's layers at evenly spread depths (its first and last included where the budget allows),
    the budget shared among roles by their size."""
    if budget is None or len(layers) <= budget:
        return list(range(len(layers)))
    roles = _by_role(layers)
    share = max(budget / len(layers), 1e-9)
    picked = []
    for members in roles.values():
        count = min(len(members), max(1 if len(roles) * 2 > budget else 2, round(share * len(members))))
        picked += [members[j] for j in np.linspace(0, len(members) - 1, count).round().astype(int)]
    return sorted(set(picked))


def _unprobed_follow_their_role(result: list[LayerTolerance], probed: set[int]) -> None:
    """A layer not measured takes the sensitivity of its role at its depth: log-linear between the
    nearest measured layers of the role (the nearest one beyond them); its probe is then predicted,
    not measured (LayerTolerance.probe's value is s·e² and ``estimated`` says so)."""
    roles = _by_role([t.layer for t in result])
    measured_all = [t.sensitivity for i, t in enumerate(result) if i in probed and np.isfinite(t.sensitivity)]
    for members in roles.values():
        known = [(depth, result[i].sensitivity) for depth, i in enumerate(members)
                 if i in probed and np.isfinite(result[i].sensitivity)]
        for depth, i in enumerate(members):
            t = result[i]
            lossy = [c for c in t.candidates if c.rep is not None]
            if i in probed or not lossy:
                continue
            if known:
                depths, values = zip(*known)
                s = float(np.exp(np.interp(depth, depths, np.log(np.maximum(values, 1e-30)))))
            elif measured_all:
                s = float(np.median(measured_all))
            else:
                continue
            probe = next((c for c in lossy if c.family == "dense"), lossy[0])
            t.sensitivity, t.estimated = s, True
            for c in lossy:
                c.predicted = s * c.error ** 2
            t.probe = (probe.label, s * probe.error ** 2)


def _unchecked_follow_the_checked(result: list[LayerTolerance]) -> None:
    """Layers measured at the probe only: below the probe's error, the median power law of the
    checked layers instead of the quadratic one (the degradation of a big perturbation is not
    quadratic; the checked layers say how far off it is)."""
    powers = [t.power for t in result if t.power is not None]
    if not powers:
        return
    power = float(np.median(powers))
    for t in result:
        if t.power is not None or t.probe is None:
            continue
        e_probe = next(c.error for c in t.candidates if c.label == t.probe[0])
        for c in t.candidates:
            if c.rep is not None and 0 < c.error < e_probe:
                c.predicted = t.probe[1] * (c.error / e_probe) ** power


def _through_two_points(lossy: list[Candidate], probe: Candidate, check: Candidate, d_probe: float,
                        d_check: float) -> float | None:
    """Predictions from both measurements: a power law d = a·e^p through (e_probe, d_probe) and
    (e_check, d_check) between them, quadratic scaling beyond either end. Returns p."""
    e_probe, e_check = probe.error, check.error
    if not (0 < e_check < e_probe and d_check > 0 and d_probe > 0):
        return None
    power = np.log(d_probe / d_check) / np.log(e_probe / e_check)
    for c in lossy:
        if c.error <= e_check:
            c.predicted = d_check * (c.error / e_check) ** 2
        elif c.error >= e_probe:
            c.predicted = d_probe * (c.error / e_probe) ** 2
        else:
            c.predicted = d_check * (c.error / e_check) ** power
    return float(power)


def stored_layout(layer: Layer, rep: Representation) -> np.ndarray:
    """The dense approximation in the layout the model stores the weight (Gemm transB keeps Wᵀ)."""
    return layer.stored_layout(rep.dequantize())
