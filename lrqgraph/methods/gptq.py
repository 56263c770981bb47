"""gptq: dense block quantization with GPTQ error feedback through the layer's input statistics
H = XᵀX, then coordinate descent over codes and scales (numerics/refine.py). Without
calibration data there is nothing to weigh and it is plain round-to-nearest, which the plan says.
The allocator's dense menus come from here."""
from __future__ import annotations

from dataclasses import dataclass

from lrqgraph.errors import LrqError
from lrqgraph.numerics import Representation, gptq_factorize, rtn_factorize
from lrqgraph.numerics.gptq import gptq_grids_with_errors
from lrqgraph.numerics.representation import OUTPUT_ERROR

from .base import GridConfig, Method, register_method
from .rtn import dense_storage

# (bits, block[, symmetric]) menus per lowering: MatMulNBits runs 2/4/8-bit codes (symmetric 2- and
# 3-bit codes through its 4-bit kernel, widened when the session loads: lower.widened); the native
# ops any width; standard DequantizeLinear int4/int8. Asymmetric grids pay a zero point per block.
MENUS = {
    "ort": ((2, 128), (2, 64), (2, 64, False), (2, 32), (2, 16), (3, 128), (3, 64), (3, 32), (4, 256), (4, 128),
            (4, 128, False), (4, 64), (4, 32), (8, 128)),
    "lrq": ((2, 64), (2, 64, False), (2, 32), (2, 16), (3, 128), (3, 64), (3, 64, False), (3, 32), (4, 128),
            (4, 128, False), (4, 64), (4, 32), (8, 128)),
    "std": ((4, 128), (4, 128, False), (4, 64), (4, 32), (8, 128)),
}


@dataclass(frozen=True)
class GPTQConfig(GridConfig):
    method = "gptq"
    sweeps: int = 2     # coordinate-descent passes over codes and scales after GPTQ (with H)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.sweeps <= 100:
            raise LrqError(f"sweeps must be in 0..100, got {self.sweeps}")


def factorize(w, cfg: GPTQConfig, scale_dtype: str, h=None):
    if h is None:
        rep = rtn_factorize(w, cfg.spec(scale_dtype))
        return Representation(rep.chains, "rtn", info={"requested": "gptq", "data_free": True}), ""
    return gptq_factorize(w, cfg.spec(scale_dtype), h, cfg.sweeps), ""


def factorize_many(w, cfgs: list[GPTQConfig], scale_dtype: str, h=None) -> list:
    """The grids without coordinate descent (the allocator's menu) in one GPTQ pass over the rows;
    their info carries the output error tr(ΔWᵀHΔW) the pass measured (``OUTPUT_ERROR``)."""
    plain = [i for i, cfg in enumerate(cfgs) if cfg.sweeps == 0] if h is not None else []
    out = {i: factorize(w, cfg, scale_dtype, h) for i, cfg in enumerate(cfgs) if i not in plain}
    if plain:
        tensors, errors = gptq_grids_with_errors(w, h, [cfgs[i].spec(scale_dtype) for i in plain])
        out.update((i, (Representation(((q,),), "gptq", info={"sweeps": 0, OUTPUT_ERROR: e}), ""))
                   for i, q, e in zip(plain, tensors, errors))
    return [out[i] for i in range(len(cfgs))]


# grids also offered after a randomized Hadamard rotation of the input dimension (family "rotated")
ROTATED_MENUS = {"ort": ((2, 64), (3, 128), (3, 64), (4, 128), (4, 64), (4, 32)), "std": ((4, 128), (4, 64)),
                 "lrq": ((2, 64), (3, 128), (3, 64), (4, 128), (4, 64))}


def menu(lowering: str) -> tuple[dict, ...]:
    # no coordinate descent while ranking the menu: allocate polishes the candidates it chooses
    plain = tuple({"bits": grid[0], "block_size": grid[1], "symmetric": grid[2] if len(grid) > 2 else True,
                   "sweeps": 0} for grid in MENUS[lowering])
    rotated = tuple({"bits": bits, "block_size": block, "sweeps": 0, "rotate": True}
                    for bits, block in ROTATED_MENUS[lowering])
    return plain + rotated


METHOD = register_method(Method(
    "gptq", GPTQConfig, factorize, dense_storage, forms=("dense",), menu=menu, family="dense",
    factorize_many=factorize_many,
    summary="dense block quantization with GPTQ error feedback (uses --calib; without it, equals rtn)"))
