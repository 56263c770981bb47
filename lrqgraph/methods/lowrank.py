"""What the low-rank methods (svd, lplr, qlr) share: how the rank is chosen and what it costs."""
from __future__ import annotations

from dataclasses import dataclass

from lrqgraph.errors import LrqError
from lrqgraph.numerics import QuantSpec, rank_for_bpw
from lrqgraph.numerics.lowrank import lowrank_storage_bits
from lrqgraph.numerics.quant import spec_storage_bits
from lrqgraph.numerics.rotation import Rotation

from .base import GridConfig


@dataclass(frozen=True)
class LowRankConfig(GridConfig):
    rank: int | None = None
    rank_ratio: float | None = None
    target_bpw: float | None = None   # the largest rank (multiple of 16) within this many bits per weight

    def __post_init__(self) -> None:
        super().__post_init__()
        if sum(x is not None for x in (self.rank, self.rank_ratio, self.target_bpw)) > 1:
            raise LrqError("give at most one of rank, rank_ratio and target_bpw")
        if self.rank is not None and self.rank < 1:
            raise LrqError(f"rank must be positive, got {self.rank}")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise LrqError(f"rank ratio must be in (0, 1], got {self.rank_ratio}")
        if self.target_bpw is not None and self.target_bpw <= 0:
            raise LrqError(f"target bits per weight must be positive, got {self.target_bpw}")

    def specs(self, scale_dtype: str) -> tuple[QuantSpec | None, QuantSpec]:
        """(dense Q spec or None, factor spec)."""
        return None, self.spec(scale_dtype)

    def default_bpw(self) -> float:
        return float(self.bits)

    def budget_bpw(self, fixed_bpw: float) -> float:
        """Bits per weight the whole representation may take, ``fixed_bpw`` of them already spent
        on a dense Q (the rank is the largest that fits)."""
        return self.target_bpw if self.target_bpw is not None else self.default_bpw()


def choose_rank(cfg: LowRankConfig, k: int, n: int, scale_dtype: str) -> tuple[int, str]:
    """(rank, '') or (0, why no rank fits)."""
    full = min(k, n)
    if cfg.rank is not None:
        return min(cfg.rank, full), ""
    if cfg.rank_ratio is not None:
        return max(1, int(round(cfg.rank_ratio * full))), ""
    dense, factor = cfg.specs(scale_dtype)  # the scales the budget pays for
    fixed = spec_storage_bits(k, n, dense) if dense else 0
    target = cfg.budget_bpw(fixed / (k * n))
    rank = rank_for_bpw(k, n, target, factor, factor, multiple=16, fixed_bits=fixed)
    if rank == 0:
        return 0, f"no rank fits {target:g} bits per weight with {factor.bits}-bit factors"
    return rank, ""


def lowrank_storage(cfg: LowRankConfig, k: int, n: int, scale_dtype: str) -> tuple[int | None, str]:
    rank, why = choose_rank(cfg, k, n, scale_dtype)
    if not rank:
        return None, why
    dense, factor = cfg.specs(scale_dtype)
    bits = lowrank_storage_bits(k, n, rank, factor, factor) + (spec_storage_bits(k, n, dense) if dense else 0)
    bits += Rotation(k, cfg.seed).storage_bits() if cfg.rotate else 0
    return bits, f"{cfg.method} rank {rank}, {cfg.bits}-bit"
