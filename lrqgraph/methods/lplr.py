"""lplr: LPLR, randomized low-rank and low-precision factors (a quantized Gaussian sketch of W's
range, then the least-squares second factor that absorbs the first factor's error);
activation-aware with H."""
from __future__ import annotations

from dataclasses import dataclass

from lrqgraph.errors import LrqError
from lrqgraph.numerics import lplr_factorize

from .base import Method, register_method
from .lowrank import LowRankConfig, choose_rank, lowrank_storage


@dataclass(frozen=True)
class LPLRConfig(LowRankConfig):
    method = "lplr"
    oversample: int = 8            # extra sketch columns
    power_iters: int = 0           # power iterations on the sketch
    init: str = "sketch"           # first factor from a Gaussian sketch or the SVD
    refits: int = 0                # alternating refits of L and R (best iterate kept)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("sketch", "svd"):
            raise LrqError(f"init must be sketch or svd, got '{self.init}'")


def factorize(w, cfg: LPLRConfig, scale_dtype: str, h=None):
    rank, why = choose_rank(cfg, *w.shape, scale_dtype)
    if not rank:
        return None, why
    spec = cfg.spec(scale_dtype)
    return lplr_factorize(w, rank, spec, spec, h=h, init=cfg.init, refits=cfg.refits, seed=cfg.seed,
                          oversample=cfg.oversample, power_iters=cfg.power_iters), ""


def menu(lowering: str) -> tuple[dict, ...]:
    # L·R alone, the rank filling 2 bits per weight with 4-bit factors or 3 with 8-bit ones
    return ({"bits": 4, "block_size": 32, "target_bpw": 2.0, "init": "svd"},
            {"bits": 8, "block_size": 32, "target_bpw": 3.0, "init": "svd"})


METHOD = register_method(Method(
    "lplr", LPLRConfig, factorize, lowrank_storage, forms=("lowrank",), menu=menu, family="lowrank",
    summary="LPLR: randomized sketch, quantized, least-squares second factor"))
