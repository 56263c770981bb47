"""svd: truncated SVD with the singular values split evenly and each factor quantized (DSVD)."""
from __future__ import annotations

from dataclasses import dataclass

from lrqgraph.numerics import svd_factorize

from .base import Method, register_method
from .lowrank import LowRankConfig, choose_rank, lowrank_storage


@dataclass(frozen=True)
class SVDConfig(LowRankConfig):
    method = "svd"


def factorize(w, cfg: SVDConfig, scale_dtype: str, h=None):
    rank, why = choose_rank(cfg, *w.shape, scale_dtype)
    if not rank:
        return None, why
    spec = cfg.spec(scale_dtype)
    return svd_factorize(w, rank, spec, spec), ""


METHOD = register_method(Method(
    "svd", SVDConfig, factorize, lowrank_storage, forms=("lowrank",), family="lowrank",
    summary="truncated SVD with quantized factors (DSVD)"))
