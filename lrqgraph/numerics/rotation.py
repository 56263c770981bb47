"""Incoherence processing: a seeded randomized Hadamard rotation of a layer's input dimension.

For Y = X·W, an orthogonal R[K, K] leaves the product unchanged, Y = (X·R)·(Rᵀ·W), while RᵀW
spreads every row's outliers over all rows (QuIP#, QuaRot), so a block grid fits it with a
smaller error. R = D·(Q_b ⊗ H_p) in the layout of transforms._Axis: random signs D, then for
K = p·b (p a power of two, b odd) a seeded orthogonal b×b and the normalized Walsh-Hadamard
transform of size p, itself H_p1 ⊗ H_p2 with p1·p2 = p. Applying it costs K·(b + p1 + p2)
multiply-adds per row, and what is stored (signs and the two small Hadamards as ±1 bytes, the
b×b block in float32, one normalizing scalar) is about K + p1² + p2² bytes, shared by every layer
that reads the same input.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .transforms import _Axis, _hadamard, _split


@dataclass(frozen=True)
class Rotation:
    k: int
    seed: int = 0

    @cached_property
    def axis(self) -> _Axis:
        """The transform as lrqgraph.numerics.transforms lays it out (signs, small block)."""
        return _Axis("hadamard", self.k, self.seed)

    def rotate_inputs(self, x: np.ndarray) -> np.ndarray:
        """X·R (rows of ``x`` are input vectors of length K)."""
        return self.axis.forward(np.asarray(x, np.float32))

    def rotate_weight(self, w: np.ndarray) -> np.ndarray:
        """Rᵀ·W for W[K, N]."""
        return np.ascontiguousarray(self.axis.forward(np.asarray(w, np.float32).T).T)

    def unrotate_weight(self, w_rotated: np.ndarray) -> np.ndarray:
        """R·W' (the weight a rotated representation stands for)."""
        return np.ascontiguousarray(self.axis.inverse(np.asarray(w_rotated, np.float32).T).T)

    def rotate_hessian(self, h: np.ndarray) -> np.ndarray:
        """Rᵀ·H·R: the statistics of the rotated inputs X·R."""
        half = self.axis.forward(np.asarray(h, np.float32))        # H·R
        return np.ascontiguousarray(self.axis.forward(half.T).T)   # Rᵀ·(H·R), H symmetric

    def factors(self) -> dict[str, np.ndarray]:
        """What a lowering stores: signs [K] and the unnormalized Hadamards h1 [p1, p1], h2 [p2, p2]
        (p1·p2 = p) as int8 ±1, small [b, b] in float32 (absent when b = 1), and norm = 1/√p, the
        Hadamards' normalization, which the lowering folds into the signs."""
        power, odd = _split(self.k)
        i = int(np.log2(power)) // 2
        unit = lambda n: np.rint(_hadamard(n) * np.sqrt(np.float32(n))).astype(np.int8)  # noqa: E731
        out = {"signs": self.axis.signs.astype(np.int8), "h1": unit(1 << i), "h2": unit(power >> i),
               "norm": np.array(1 / np.sqrt(power), np.float32)}
        if odd > 1:
            out["small"] = self.axis.small.astype(np.float32)
        return out

    def storage_bits(self) -> int:
        return sum(v.nbytes for v in self.factors().values()) * 8
