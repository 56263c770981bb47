"""qlr: W ≈ Q + L·R, a dense quantized Q at ``bits`` plus low-rank factors at ``lr_bits``
(CALDERA / LoftQ style alternation; activation-aware with H)."""
from __future__ import annotations

from dataclasses import dataclass

from lrqgraph.errors import LrqError
from lrqgraph.numerics import QuantSpec, qlr_factorize

from .base import Method, register_method
from .lowrank import LowRankConfig, choose_rank, lowrank_storage


@dataclass(frozen=True)
class QLRConfig(LowRankConfig):
    method = "qlr"
    lr_bits: int = 8               # bits of the low-rank factors (Q takes ``bits``)
    iters: int = 5                 # outer Q / L·R alternations
    refits: int = 0                # alternating refits of L and R inside each alternation
    sweeps: int = 2                # coordinate-descent passes on the last Q (with H)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.lr_bits <= 8:
            raise LrqError(f"lr_bits must be in 2..8, got {self.lr_bits}")
        if not 0 <= self.sweeps <= 100:
            raise LrqError(f"sweeps must be in 0..100, got {self.sweeps}")

    def specs(self, scale_dtype: str) -> tuple[QuantSpec | None, QuantSpec]:
        return self.spec(scale_dtype), self.spec(scale_dtype, self.lr_bits)

    def default_bpw(self) -> float:
        return float(self.bits + 1)


def factorize(w, cfg: QLRConfig, scale_dtype: str, h=None):
    rank, why = choose_rank(cfg, *w.shape, scale_dtype)
    if not rank:
        return None, why
    dense, factor = cfg.specs(scale_dtype)
    return qlr_factorize(w, rank, dense, factor, h=h, iters=cfg.iters, refits=cfg.refits, seed=cfg.seed,
                         sweeps=cfg.sweeps), ""


METHOD = register_method(Method(
    "qlr", QLRConfig, factorize, lowrank_storage, forms=("dense+lowrank",),
    summary="Q + L·R: dense quantized Q plus quantized low-rank factors (--lr-bits)"))
