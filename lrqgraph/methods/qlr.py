"""qlr: W ≈ Q + L·R, a dense quantized Q at ``bits`` plus low-rank factors at ``lr_bits``
(CALDERA / LoftQ style alternation; activation-aware with H)."""
from __future__ import annotations

from dataclasses import dataclass

from lrqgraph.errors import LrqError
from lrqgraph.numerics import QuantSpec, Representation, qlr_factorize

from .base import Method, register_method
from .lowrank import LowRankConfig, choose_rank, lowrank_storage

# the allocator's Q + L·R candidates: Q grids (bits, block, symmetric) the lowering runs, each with
# L·R factors of ``lr_bits`` taking ``lr_bpw`` more bits per weight (the rank follows the shape)
MENU_GRIDS = {"ort": ((2, 64, True), (4, 128, True)), "std": ((4, 128, True),),
              "lrq": ((2, 64, True), (3, 64, True), (4, 128, True))}
MENU_FACTORS = ((8, 0.25), (8, 0.5))


@dataclass(frozen=True)
class QLRConfig(LowRankConfig):
    method = "qlr"
    lr_bits: int = 8               # bits of the low-rank factors (Q takes ``bits``)
    iters: int = 5                 # outer Q / L·R alternations
    refits: int = 0                # alternating refits of L and R inside each alternation
    sweeps: int = 2                # coordinate-descent passes on the last Q (with H)
    lr_bpw: float | None = None    # the rank: the largest multiple of 16 whose factors fit this many extra bits per weight

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.lr_bits <= 8:
            raise LrqError(f"lr_bits must be in 2..8, got {self.lr_bits}")
        if not 0 <= self.sweeps <= 100:
            raise LrqError(f"sweeps must be in 0..100, got {self.sweeps}")
        if self.lr_bpw is not None and (self.lr_bpw <= 0 or self.rank is not None or self.rank_ratio is not None
                                        or self.target_bpw is not None):
            raise LrqError("lr_bpw must be positive, and excludes rank, rank_ratio and target_bpw")

    def specs(self, scale_dtype: str) -> tuple[QuantSpec | None, QuantSpec]:
        return self.spec(scale_dtype), self.spec(scale_dtype, self.lr_bits)

    def default_bpw(self) -> float:
        return float(self.bits + 1)

    def budget_bpw(self, fixed_bpw: float) -> float:
        return fixed_bpw + self.lr_bpw if self.lr_bpw is not None else super().budget_bpw(fixed_bpw)


def factorize(w, cfg: QLRConfig, scale_dtype: str, h=None, warm: Representation | None = None):
    rank, why = choose_rank(cfg, *w.shape, scale_dtype)
    if not rank:
        return None, why
    dense, factor = cfg.specs(scale_dtype)
    q0 = warm.chains[0][0] if warm is not None and warm.form == "dense" else None
    return qlr_factorize(w, rank, dense, factor, h=h, iters=cfg.iters, refits=cfg.refits, seed=cfg.seed,
                         sweeps=cfg.sweeps, q0=q0), ""


def menu(lowering: str) -> tuple[dict, ...]:
    # one alternation from the dense candidate of the same grid, no coordinate descent: the
    # allocator ranks many of these per layer
    return tuple({"bits": bits, "block_size": block, "symmetric": sym, "lr_bits": lr_bits, "lr_bpw": lr_bpw,
                  "iters": 1, "refits": 0, "sweeps": 0}
                 for bits, block, sym in MENU_GRIDS[lowering] for lr_bits, lr_bpw in MENU_FACTORS)


METHOD = register_method(Method(
    "qlr", QLRConfig, factorize, lowrank_storage, forms=("dense+lowrank",), menu=menu, warm_start=True,
    summary="Q + L·R: dense quantized Q plus quantized low-rank factors (--lr-bits)"))
