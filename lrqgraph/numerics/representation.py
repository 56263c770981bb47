"""A weight's compressed form: a sum of products of quantized matrices.

W[K, N] ≈ Σ_chains Π_i dequant(chain[i]). Dense quantization is one chain of one factor, low rank
``L·R`` one chain of two, ``Q + L·R`` two chains. Lowerings turn each chain into a MatMul chain and
the sum into Adds, so every method shares one rewrite and one storage formula. With a
``rotation`` R the chains stand for RᵀW: W ≈ R·Σ_chains Π_i dequant(chain[i]), and a lowering
rotates the layer's input (X·R) before the chains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from .quant import QuantizedTensor
from .rotation import Rotation

# Representation.info key: tr(ΔWᵀHΔW) under the H the solver was given, where the solve yields it
# for free (GPTQ's walk); the allocator then skips the K²N product of activation_error
OUTPUT_ERROR = "output_error"

@dataclass(frozen=True)
class Representation:
    chains: tuple[tuple[QuantizedTensor, ...], ...]
    method: str
    rank: int | None = None
    info: dict = field(default_factory=dict)
    rotation: Rotation | None = None

    def __post_init__(self) -> None:
        shapes = {(c[0].shape[0], c[-1].shape[1]) for c in self.chains}
        if len(shapes) != 1:
            raise ValueError(f"chains disagree on the weight shape: {sorted(shapes)}")
        for chain in self.chains:
            for a, b in zip(chain, chain[1:]):
                if a.shape[1] != b.shape[0]:
                    raise ValueError(f"chain factors do not compose: {a.shape} then {b.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.chains[0][0].shape[0], self.chains[0][-1].shape[1])

    @property
    def form(self) -> str:
        """What lowerings match on: ``dense`` (one uniform grid), ``lowrank`` (L·R),
        ``dense+lowrank`` (Q + L·R), ``codebook`` (one codebook tensor: Kashin or k-means), or
        ``chains`` (any other sum of products of uniform grids)."""
        factors = [q for chain in self.chains for q in chain]
        if len(factors) == 1 and not _uniform(factors[0]):
            return "codebook"
        if not all(_uniform(q) for q in factors):
            return "mixed"
        lengths = sorted(len(chain) for chain in self.chains)
        return {(1,): "dense", (2,): "lowrank", (1, 2): "dense+lowrank"}.get(tuple(lengths), "chains")

    def dequantize(self) -> np.ndarray:
        inner = sum(reduce(np.matmul, (q.dequantize() for q in chain)) for chain in self.chains)
        return inner if self.rotation is None else self.rotation.unrotate_weight(inner)

    def storage_bits(self) -> int:
        rotation = 0 if self.rotation is None else self.rotation.storage_bits()
        return sum(q.storage_bits() for chain in self.chains for q in chain) + rotation

    def bits_per_weight(self) -> float:
        k, n = self.shape
        return self.storage_bits() / (k * n)


def _uniform(q) -> bool:
    """A block grid down K (what MatMulNBits, DequantizeLinear and lrq::QMatMul store)."""
    return isinstance(q, QuantizedTensor) and q.codebook is None and q.axis == 0


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    """||W - Ŵ||_F / ||W||_F (0 for an all-zero W approximated exactly)."""
    norm = float(np.linalg.norm(w))
    # in float64 a slab of rows at a time: whole-matrix float64 copies would triple a layer's memory
    rows = max(1, (1 << 22) // max(1, w.shape[-1])) if w.ndim == 2 else len(w)
    squares = sum(float(np.square(np.asarray(w[i:i + rows], np.float64) - approx[i:i + rows]).sum())
                  for i in range(0, len(w), rows))
    diff = squares ** 0.5
    return diff / norm if norm > 0 else diff
