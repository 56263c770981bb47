"""rtn: dense block round-to-nearest on a uniform grid (the baseline every method must beat)."""
from __future__ import annotations

from dataclasses import dataclass

from lrqgraph.numerics import rtn_factorize
from lrqgraph.numerics.quant import spec_storage_bits
from lrqgraph.numerics.rotation import Rotation

from .base import GridConfig, Method, register_method


@dataclass(frozen=True)
class RTNConfig(GridConfig):
    method = "rtn"


def dense_storage(cfg: GridConfig, k: int, n: int, scale_dtype: str) -> tuple[int, str]:
    """Exact stored bits of one dense grid (codes, scales, packed zero points) from shapes alone."""
    block = f"block {cfg.block_size}" if cfg.block_size else "per channel"
    rotation = Rotation(k, cfg.seed).storage_bits() if cfg.rotate else 0
    return (spec_storage_bits(k, n, cfg.spec(scale_dtype)) + rotation,
            f"{cfg.method}, {'rotated, ' if cfg.rotate else ''}{cfg.bits}-bit {block}")


def factorize(w, cfg: RTNConfig, scale_dtype: str, h=None):
    return rtn_factorize(w, cfg.spec(scale_dtype)), ""


METHOD = register_method(Method(
    "rtn", RTNConfig, factorize, dense_storage, forms=("dense",), family="dense",
    summary="dense block quantization, round to nearest"))
