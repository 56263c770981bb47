"""factorize: plan each selected weight's compressed representation (the graph is not touched).

Cases:
 1. The method comes from the registry (lrqgraph.methods): ``gptq`` (the default) uses the
    layer's input statistics H from ``calibrate``; without calibration data it is plain RTN, and
    the plan says "data-free". Options given to the pass override the config's, and an option
    the method does not have is refused when the pipeline is parsed.
 2. A method that cannot make a representation (no rank fits the budget) keeps the layer, with its reason.
 3. A layer whose representation would not take fewer bytes than the stored weight is kept, and
    the report says so.
Per-layer overrides (``overrides`` of the method config) apply before any of this.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np

from lrqgraph.cache import cache_key
from lrqgraph.config import describe_config
from lrqgraph.errors import LrqError
from lrqgraph.hessian import load_hessian
from lrqgraph.methods import METHODS, MethodConfig, configure, method_config, method_of
from lrqgraph.numerics import HessianInfo, Representation, activation_error, relative_error
from lrqgraph.numerics.rotation import Rotation
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass
from lrqgraph.plan import Layer, LayerPlan, WeightFile, materialize
from lrqgraph.progress import progress

from .lower import check_form

log = logging.getLogger(__name__)
# the code its checkpointed results come from: a change to it starts them anew
FACTORIZE_CODE = ("lrqgraph.numerics", "lrqgraph.methods", __name__)


def plan_settings(cfg: MethodConfig, rep: Representation) -> dict:
    """What the report says about a representation: method as run, rank, and the first factor's grid."""
    first = rep.chains[0][0]
    settings = {"method": rep.method, "rank": rep.rank, "bits": getattr(first, "bits", cfg.bits)}
    if hasattr(cfg, "block_size"):
        settings.update(block=cfg.block_size, symmetric=cfg.symmetric)
    return settings


def factorize_weight(w: np.ndarray, cfg: MethodConfig, scale_dtype: str = "float32",
                     h: "np.ndarray | HessianInfo | None" = None,
                     warm: Representation | None = None) -> tuple[Representation | None, str]:
    """The representation ``cfg`` asks for, or (None, why not). ``h``: the layer's XᵀX, if known;
    ``warm``: a dense representation of the same grid for methods that start from one."""
    method = method_of(cfg)
    info = HessianInfo.of(h)
    rotation = Rotation(w.shape[0], cfg.seed) if getattr(cfg, "rotate", False) else None
    if rotation is not None:  # factorize RᵀW against the rotated inputs' statistics
        w, info = rotation.rotate_weight(w), None if info is None else info.rotated(rotation)
    extra = {"warm": warm} if warm is not None and method.warm_start else {}
    rep, why = method.factorize(w, cfg, scale_dtype, info, **extra)
    return _rotated(rep, rotation), why


def factorize_weights(w: np.ndarray, cfgs: list[MethodConfig], scale_dtype: str = "float32",
                      h: "np.ndarray | HessianInfo | None" = None) -> list[tuple[Representation | None, str]]:
    """``factorize_weight`` for each config (none warm-started); the configs of one method and
    rotation go through its ``factorize_many`` together where it has one (one GPTQ pass for all
    dense grids of a menu)."""
    info = HessianInfo.of(h)
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        many = method_of(cfg).factorize_many is not None
        groups.setdefault((cfg.method, getattr(cfg, "rotate", False), cfg.seed) if many else ("one", i), []).append(i)
    out: dict[int, tuple[Representation | None, str]] = {}
    for key, members in groups.items():
        if key[0] == "one":
            out[members[0]] = factorize_weight(w, cfgs[members[0]], scale_dtype, info)
            continue
        _, rotate, seed = key
        rotation = Rotation(w.shape[0], seed) if rotate else None
        target, stats = (w, info) if rotation is None else (
            rotation.rotate_weight(w), None if info is None else info.rotated(rotation))
        made = method_of(cfgs[members[0]]).factorize_many(target, [cfgs[i] for i in members], scale_dtype, stats)
        out.update((i, (_rotated(rep, rotation), why)) for i, (rep, why) in zip(members, made))
    return [out[i] for i in range(len(cfgs))]


def _rotated(rep: Representation | None, rotation: Rotation | None) -> Representation | None:
    return rep if rep is None or rotation is None else dataclasses.replace(rep, rotation=rotation)


def solve_layer(w: "np.ndarray | WeightFile", cfg: MethodConfig, scale_dtype: str, h: np.ndarray | None
                ) -> tuple[Representation | None, str, float | None, float | None, float]:
    """(representation or None, why not, relative error, activation-aware error, seconds): one
    layer's solve, pure numpy (an executor task)."""
    start = time.perf_counter()
    w, h = materialize(w), load_hessian(h)
    rep, why = factorize_weight(w, cfg, scale_dtype, h)
    if rep is None:
        return None, why, None, None, time.perf_counter() - start
    approx = rep.dequantize()
    return (rep, why, round(relative_error(w, approx), 6),
            round(activation_error(w, approx, h), 6) if h is not None else None, time.perf_counter() - start)


def plan_layer(layer: Layer, cfg: MethodConfig, solved: tuple) -> LayerPlan:
    """The plan from a layer's ``solve_layer``: kept when the representation takes no fewer bits
    than the stored weight or its form cannot be lowered."""
    rep, why, rel_error, act_error, seconds = solved
    if rep is not None and rep.storage_bits() >= layer.stored_bits:
        why = (f"{cfg.method}{f' at rank {rep.rank}' if rep.rank else ''} takes {rep.bits_per_weight():.2f} bits "
               f"per weight, no fewer than the {layer.source.stored_dtype} weight")
        rep = None
    if rep is not None:
        try:
            check_form(layer, rep)
        except LrqError as exc:
            rep, why = None, str(exc).split(": ", 1)[1]
    if rep is None:
        return LayerPlan(layer, None, why)
    if rep.info.get("fallback"):
        log.warning("layer '%s': %s", layer.name, rep.info["fallback"])
    return LayerPlan(layer, rep, "", plan_settings(cfg, rep), rel_error=rel_error, act_error=act_error,
                     seconds=round(seconds, 4))


def describe_plan(cfg: MethodConfig, layer: Layer) -> tuple[bool, str]:
    """(rewrite?, what and why) for a layer, from shapes alone (no factorization): ``inspect``."""
    k, n = layer.shape
    bits, what = method_of(cfg).storage(cfg, k, n, cfg.scales_for(layer.dtype))
    if bits is None:
        return False, what
    bpw = bits / (k * n)
    if bits >= layer.stored_bits:
        return False, f"{what} takes {bpw:.2f} bits per weight, no saving"
    return True, f"{what}: {bpw:.3f} bits per weight"


def factorize_key(ctx: Context, base: MethodConfig) -> str:
    """What the plans depend on, for their checkpoints: the model (streamed weights by file and
    modification time), the calibration data, the method as configured and the config."""
    data = ctx.analysis("calib_data")
    return cache_key(ctx.model.identity(), data.digest if data is not None else "data-free", repr(base),
                     json.dumps(describe_config(ctx.config), sort_keys=True, default=str), code=FACTORIZE_CODE)


@register_pass
class Factorize(Pass):
    """Plan a representation for every layer that ``discover`` selected; options override the config."""

    name = "factorize"

    def validate(self) -> None:
        fields = dict(self.params)
        if "method" in fields:
            method_config(**fields)
            return
        known = {f for m in METHODS.values() for f in m.config.__dataclass_fields__}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise LrqError(f"unknown option(s) {', '.join(unknown)} for factorize; known: {', '.join(sorted(known))}")

    def run(self, ctx: Context) -> PassResult:
        base = configure(ctx.config.factorize, **self.params)
        layers = [layer for layer in ctx.analysis("layers") if layer.rewrite]
        hessians = ctx.analysis("hessians")
        cfgs = [base.for_layer(layer.name, layer.weight) for layer in layers]
        saved = ctx.checkpoints("factorize", factorize_key(ctx, base))
        done = [saved.get(i) for i in range(len(layers))]  # plans an interrupted run finished (--resume)
        todo = [i for i, fields in enumerate(done) if fields is None]
        tasks = ((layers[i].weight_task(), cfgs[i], cfgs[i].scales_for(layers[i].dtype), hessians.get(layers[i].weight))
                 for i in todo)
        solved = iter(ctx.executor.map(solve_layer, tasks, costs=[layers[i].params for i in todo]))
        plans = {}
        for i, layer in enumerate(progress(layers, "factorize")):
            if done[i] is not None:
                plans[layer.weight] = LayerPlan(layer, **done[i])
                continue
            plan = plan_layer(layer, cfgs[i], next(solved))
            # a streamed model's codes wait on disk for lower, beside the checkpoint: plans never
            # hold them all at once, and a resumed run finds them
            plan = dataclasses.replace(plan, rep=ctx.model.spill_representation(plan.rep, saved.folder / f"{i}.rep"))
            saved.put(i, {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name != "layer"})
            plans[layer.weight] = plan
        ctx.plans = plans
        log.info("factorize: planned %d of %d layers", sum(p.rewrite for p in plans.values()), len(plans))
        return PassResult(modified=False)
