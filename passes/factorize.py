"""factorize: compute each selected weight's compressed representation (the graph is not touched).

Cases:
 1. ``rtn``: dense block quantization at ``bits``; ``gptq`` (the default): the same grid with
    GPTQ error feedback through the layer's input statistics H from ``calibrate``; without
    calibration data it is plain RTN, and the report says "data-free".
 2. ``svd`` / ``lplr``: quantized low-rank factors; ``qlr``: Q at ``bits`` plus low-rank factors
    at ``lr_bits``. The rank comes from ``rank``, ``rank_ratio`` or ``target_bpw`` (in that order;
    with none given, ``target_bpw = bits``, or ``bits + 1`` for qlr).
 3. ``kmeans``: per-tensor codebook; ``kashin``: Kashin decomposition with 2-D codebook.
 4. A layer whose representation would not take fewer bytes than the stored weight is kept, and
    the report says so.
Per-layer overrides (``FactorizeConfig.overrides``) apply before any of this.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from tqdm import tqdm

from lrqgraph.config import FactorizeConfig, with_fields
from lrqgraph.numerics import (HessianInfo, Representation, activation_error, codebook_quantize, gptq_factorize, lplr_factorize,
                               qlr_factorize, rank_for_bpw, relative_error, rtn_factorize, svd_factorize)
from lrqgraph.numerics.quant import CODEBOOK_BITS
from lrqgraph.numerics.kashin import kashin_quantize
from lrqgraph.numerics.lowrank import lowrank_storage_bits
from lrqgraph.numerics.pack import packed_nbytes
from lrqgraph.numerics.quant import spec_storage_bits
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass

log = logging.getLogger(__name__)
LOWRANK = ("svd", "lplr", "qlr")


def _lr_specs(cfg: FactorizeConfig, scale_dtype: str = "float32"):
    """(dense Q spec or None, factor spec) of a low-rank method."""
    if cfg.method == "qlr":
        return cfg.spec(scale_dtype), cfg.spec(scale_dtype, cfg.lr_bits)
    return None, cfg.spec(scale_dtype)


def choose_rank(cfg: FactorizeConfig, k: int, n: int) -> tuple[int, str]:
    """(rank, '') or (0, why no rank fits)."""
    full = min(k, n)
    if cfg.rank is not None:
        return min(cfg.rank, full), ""
    if cfg.rank_ratio is not None:
        return max(1, int(round(cfg.rank_ratio * full))), ""
    dense, factor = _lr_specs(cfg, cfg.scales_for("float32"))  # the scales the budget pays for
    target = cfg.target_bpw if cfg.target_bpw is not None else float(cfg.bits + (cfg.method == "qlr"))
    fixed = spec_storage_bits(k, n, dense) if dense else 0
    rank = rank_for_bpw(k, n, target, factor, factor, multiple=16, fixed_bits=fixed)
    if rank == 0:
        return 0, f"no rank fits {target:g} bits per weight with {factor.bits}-bit factors"
    return rank, ""


def planned_bpw(cfg: FactorizeConfig, k: int, n: int, rank: int | None) -> float:
    """Bits per weight of the plan, from shapes alone (Kashin adds its 2-D codebook)."""
    if cfg.method in ("rtn", "gptq"):
        bits = spec_storage_bits(k, n, cfg.spec())
    elif cfg.method in ("kmeans", "kashin"):
        entries = (1 << cfg.bits) * (2 if cfg.method == "kashin" else 1)
        bits = packed_nbytes(k * n, cfg.bits) * 8 + entries * CODEBOOK_BITS
    else:
        dense, factor = _lr_specs(cfg)
        bits = lowrank_storage_bits(k, n, rank, factor, factor) + (spec_storage_bits(k, n, dense) if dense else 0)
    return bits / (k * n)


def describe_plan(cfg: FactorizeConfig, k: int, n: int, stored_bits_per_weight: int) -> tuple[bool, str]:
    """(rewrite?, what and why) for a K x N weight, from shapes alone (no factorization)."""
    rank = None
    if cfg.method in LOWRANK:
        rank, why = choose_rank(cfg, k, n)
        if not rank:
            return False, why
    bpw = planned_bpw(cfg, k, n, rank)
    what = f"{cfg.method}{f' rank {rank}' if rank else ''}, {cfg.bits}-bit"
    if bpw >= stored_bits_per_weight:
        return False, f"{what} takes {bpw:.2f} bits per weight, no saving"
    return True, f"{what}: {bpw:.3f} bits per weight"


def factorize_weight(w: np.ndarray, cfg: FactorizeConfig, scale_dtype: str = "float32",
                     h: "np.ndarray | HessianInfo | None" = None) -> tuple[Representation | None, str]:
    """The representation ``cfg`` asks for, or (None, why not). ``h``: the layer's XᵀX, if known."""
    spec = cfg.spec(scale_dtype)
    if cfg.method == "rtn" or (cfg.method == "gptq" and h is None):
        rep = rtn_factorize(w, spec)
        if cfg.method == "gptq":  # without statistics GPTQ's feedback has nothing to weigh: RTN
            rep = Representation(rep.chains, "rtn", info={"requested": "gptq", "data_free": True})
        return rep, ""
    if cfg.method == "gptq":
        return gptq_factorize(w, spec, h, cfg.sweeps), ""
    if cfg.method == "kmeans":
        return Representation(((codebook_quantize(w, cfg.bits),),), "kmeans"), ""
    if cfg.method == "kashin":
        return kashin_quantize(w, cfg.bits, cfg.transform, cfg.seed, cfg.tol, cfg.max_iter), ""
    rank, why = choose_rank(cfg, *w.shape)
    if not rank:
        return None, why
    dense, factor = _lr_specs(cfg, scale_dtype)
    if cfg.method == "svd":
        return svd_factorize(w, rank, factor, factor), ""
    if cfg.method == "qlr":
        return qlr_factorize(w, rank, dense, factor, h=h, iters=cfg.iters, refits=cfg.refits, seed=cfg.seed,
                             sweeps=cfg.sweeps), ""
    return lplr_factorize(w, rank, factor, factor, h=h, init=cfg.init, refits=cfg.refits, seed=cfg.seed,
                          oversample=cfg.oversample, power_iters=cfg.power_iters), ""


@register_pass
class Factorize(Pass):
    """Plan a Representation for every layer that ``discover`` selected; options override the config."""

    name = "factorize"

    def run(self, ctx: Context) -> PassResult:
        base = with_fields(ctx.config.factorize, self.params)
        layers = [layer for layer in ctx.analysis("layers") if layer.rewrite]
        hessians = ctx.analysis("hessians")
        for layer in tqdm(layers, desc="factorize", unit="layer", disable=None, leave=False):
            cfg = base.for_layer(layer.name, layer.weight)
            start = time.perf_counter()
            w = layer.weight_matrix()
            rep, why = factorize_weight(w, cfg, cfg.scales_for(layer.dtype), hessians.get(layer.weight))
            entry = ctx.report["layers"].setdefault(layer.name, {"name": layer.name})
            stored_bits = np.dtype(layer.dtype).itemsize * 8 * w.size
            if rep is not None and rep.storage_bits() >= stored_bits:
                why = (f"{cfg.method} at rank {rep.rank} takes {rep.bits_per_weight():.2f} bits per weight, "
                       f"no fewer than the {layer.dtype} weight")
                rep = None
            if rep is None:
                entry.update(action="keep", reason=why)
                ctx.plans.pop(layer.weight, None)
                continue
            ctx.plans[layer.weight] = rep
            if rep.info.get("fallback"):
                log.warning("layer '%s': %s", layer.name, rep.info["fallback"])
            entry.update(action="rewrite", reason="", method=rep.method, rank=rep.rank, bits=cfg.bits,
                         block=cfg.block_size, symmetric=cfg.symmetric,
                         info=rep.info,
                         bpw=round(rep.bits_per_weight(), 4),
                         rel_error=round(relative_error(w, approx := rep.dequantize()), 6),
                         act_error=(round(activation_error(w, approx, hessians[layer.weight]), 6)
                                    if layer.weight in hessians else None),
                         seconds=round(time.perf_counter() - start, 4))
        log.info("factorize: planned %d layers", len(ctx.plans))
        return PassResult(modified=False)
