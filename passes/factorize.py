"""factorize: compute each selected weight's compressed representation (the graph is not touched).

Cases:
 1. ``rtn``: dense block quantization at ``bits``.
 2. ``svd`` / ``lplr``: a rank from ``rank``, ``rank_ratio`` or ``target_bpw`` (in that order of
    precedence; with none given, ``target_bpw = bits``), then quantized factors.
 3. A layer whose representation would not take fewer bytes than the stored weight is kept, and
    the report says so.
Per-layer overrides (``FactorizeConfig.overrides``) apply before any of this.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from tqdm import tqdm

from lrqgraph.config import FactorizeConfig, with_fields
from lrqgraph.numerics import (Representation, lplr_factorize, rank_for_bpw, relative_error,
                               rtn_factorize, svd_factorize)
from lrqgraph.numerics.lowrank import lowrank_storage_bits
from lrqgraph.numerics.quant import spec_storage_bits
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass

log = logging.getLogger(__name__)


def choose_rank(cfg: FactorizeConfig, k: int, n: int) -> tuple[int, str]:
    """(rank, '') or (0, why no rank fits)."""
    full = min(k, n)
    if cfg.rank is not None:
        return min(cfg.rank, full), ""
    if cfg.rank_ratio is not None:
        return max(1, int(round(cfg.rank_ratio * full))), ""
    target = cfg.target_bpw if cfg.target_bpw is not None else float(cfg.bits)
    spec = cfg.spec()
    rank = rank_for_bpw(k, n, target, spec, spec, multiple=16)
    if rank == 0:
        return 0, f"no rank fits {target:g} bits per weight at {cfg.bits}-bit factors"
    return rank, ""


def describe_plan(cfg: FactorizeConfig, k: int, n: int, stored_bits_per_weight: int) -> tuple[bool, str]:
    """(rewrite?, what and why) for a K x N weight, from shapes alone (no factorization)."""
    spec = cfg.spec()
    if cfg.method == "rtn":
        bpw = spec_storage_bits(k, n, spec) / (k * n)
        return True, f"rtn {cfg.bits}-bit, block {cfg.block_size}: {bpw:.3f} bits per weight"
    rank, why = choose_rank(cfg, k, n)
    if not rank:
        return False, why
    bpw = lowrank_storage_bits(k, n, rank, spec, spec) / (k * n)
    if bpw >= stored_bits_per_weight:
        return False, f"{cfg.method} at rank {rank} takes {bpw:.2f} bits per weight, no saving"
    return True, f"{cfg.method} rank {rank}, {cfg.bits}-bit factors: {bpw:.3f} bits per weight"


def factorize_weight(w: np.ndarray, cfg: FactorizeConfig,
                     scale_dtype: str = "float32") -> tuple[Representation | None, str]:
    """The representation ``cfg`` asks for, or (None, why not)."""
    spec = cfg.spec(scale_dtype)
    if cfg.method == "rtn":
        return rtn_factorize(w, spec), ""
    rank, why = choose_rank(cfg, *w.shape)
    if not rank:
        return None, why
    if cfg.method == "svd":
        return svd_factorize(w, rank, spec, spec), ""
    return lplr_factorize(w, rank, spec, spec, seed=cfg.seed, oversample=cfg.oversample,
                          power_iters=cfg.power_iters), ""


@register_pass
class Factorize(Pass):
    """Plan a Representation for every layer that ``discover`` selected; options override the config."""

    name = "factorize"

    def run(self, ctx: Context) -> PassResult:
        base = with_fields(ctx.config.factorize, self.params)
        layers = [layer for layer in ctx.analysis("layers") if layer.rewrite]
        for layer in tqdm(layers, desc="factorize", unit="layer", disable=None, leave=False):
            cfg = base.for_layer(layer.name, layer.weight)
            start = time.perf_counter()
            w = layer.weight_matrix()
            rep, why = factorize_weight(w, cfg, layer.dtype)
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
            entry.update(action="rewrite", reason="", method=rep.method, rank=rep.rank, bits=cfg.bits,
                         block=cfg.block_size, symmetric=cfg.symmetric,
                         bpw=round(rep.bits_per_weight(), 4),
                         rel_error=round(relative_error(w, rep.dequantize()), 6),
                         seconds=round(time.perf_counter() - start, 4))
        log.info("factorize: planned %d layers", len(ctx.plans))
        return PassResult(modified=False)
