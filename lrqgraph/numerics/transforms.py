"""Orthogonal transforms of a matrix, X ↦ Q1ᵀ·X·Q2 and back, for Kashin decompositions.

- ``dct``: orthonormal DCT-II on both axes through the FFT, O(mn log(mn)), nothing stored.
- ``hadamard``: randomized Hadamard-Kronecker: an axis of length n = 2^a·b is transformed by
  (H_{2^a}/√2^a ⊗ Q_b)·diag(±1): a Walsh-Hadamard transform on the power-of-two part (itself
  the Kronecker product of two small Hadamards) and a small seeded orthogonal b×b on the rest;
  O(n·(√2^a + b)) per vector, only a seed stored.
- ``qr``: dense seeded orthogonal matrices from the QR of a Gaussian, O(mn(m+n)).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("dct", "hadamard", "qr")


def dct_ortho(x: np.ndarray, axis: int) -> np.ndarray:
    """Orthonormal DCT-II along ``axis`` (Makhoul's FFT algorithm)."""
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    v = np.concatenate([x[..., ::2], x[..., 1::2][..., ::-1]], axis=-1)
    spectrum = np.fft.fft(v, axis=-1)
    k = np.arange(n)
    y = 2 * (spectrum * np.exp(-1j * np.pi * k / (2 * n))).real
    y *= np.where(k == 0, np.sqrt(1 / (4 * n)), np.sqrt(1 / (2 * n)))
    return np.moveaxis(y, -1, axis)


def idct_ortho(y: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`dct_ortho` (orthonormal DCT-III)."""
    y = np.moveaxis(y, axis, -1)
    n = y.shape[-1]
    k = np.arange(n)
    raw = y / np.where(k == 0, np.sqrt(1 / (4 * n)), np.sqrt(1 / (2 * n)))
    shifted = np.concatenate([np.zeros_like(raw[..., :1]), raw[..., :0:-1]], axis=-1)  # y_{n-k}, y_n = 0
    spectrum = np.exp(1j * np.pi * k / (2 * n)) * (raw - 1j * shifted) / 2
    v = np.fft.ifft(spectrum, axis=-1).real
    half = (n + 1) // 2
    x = np.empty_like(v)
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:][..., ::-1]
    return np.moveaxis(x, -1, axis)


def _hadamard(n: int) -> np.ndarray:
    """The n×n Sylvester Hadamard matrix divided by √n (orthogonal and symmetric)."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(np.float32(n))


def _walsh(x: np.ndarray, power: int) -> np.ndarray:
    """Normalized Walsh-Hadamard transform over axis -2 of x[..., power, odd].

    H_{2^a} = H_{2^i} ⊗ H_{2^j}: two small matrix products instead of log2(power) butterfly
    passes, so the work runs in BLAS (2·(2^i + 2^j) flops per element).
    """
    i = int(np.log2(power)) // 2
    p1, p2 = 1 << i, power >> i
    lead, odd = x.shape[:-2], x.shape[-1]
    y = x.reshape(*lead, p1, p2 * odd)
    y = np.matmul(_hadamard(p1), y)                              # over the first factor
    y = y.reshape(*lead, p1, p2, odd)
    y = np.einsum("qj,...pjo->...pqo", _hadamard(p2), y, optimize=True)  # over the second
    return y.reshape(*lead, power, odd)


def _split(n: int) -> tuple[int, int]:
    """n = 2^a · b with b odd."""
    power = n & -n
    return power, n // power


@dataclass
class _Axis:
    """The orthogonal transform of one axis."""

    kind: str
    n: int
    seed: int
    signs: np.ndarray = field(init=False, repr=False)
    small: np.ndarray | None = field(init=False, repr=False, default=None)
    dense: np.ndarray | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        if self.kind == "qr":
            q, r = np.linalg.qr(rng.standard_normal((self.n, self.n)))
            self.dense = (q * np.sign(np.diag(r))).astype(np.float32)
        elif self.kind == "hadamard":
            self.signs = rng.choice(np.array([-1.0, 1.0], np.float32), self.n)
            power, odd = _split(self.n)
            if odd > 1:
                q, r = np.linalg.qr(rng.standard_normal((odd, odd)))
                self.small = (q * np.sign(np.diag(r))).astype(np.float32)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Qᵀ applied along the last axis (rows of x are vectors)."""
        if self.kind == "dct":
            return dct_ortho(x, -1)
        if self.kind == "qr":
            return x @ self.dense
        power, odd = _split(self.n)
        y = (x * self.signs).reshape(*x.shape[:-1], power, odd)
        if self.small is not None:
            y = y @ self.small
        return _walsh(y, power).reshape(x.shape)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        if self.kind == "dct":
            return idct_ortho(y, -1)
        if self.kind == "qr":
            return y @ self.dense.T
        power, odd = _split(self.n)
        x = _walsh(y.reshape(*y.shape[:-1], power, odd), power)  # H is its own inverse
        if self.small is not None:
            x = x @ self.small.T
        return x.reshape(y.shape) * self.signs


class MatrixTransform:
    """X ↦ Q1ᵀ·X·Q2 with Q1 (m×m), Q2 (n×n) orthogonal of one ``kind``, seeded."""

    def __init__(self, kind: str, shape: tuple[int, int], seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"unknown transform '{kind}'; choose one of {', '.join(KINDS)}")
        self.kind, self.shape, self.seed = kind, shape, seed
        self.rows = _Axis(kind, shape[0], seed)
        self.cols = _Axis(kind, shape[1], seed + 1)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return np.ascontiguousarray(self.rows.forward(self.cols.forward(x).T).T, dtype=np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, np.float32)
        return np.ascontiguousarray(self.rows.inverse(self.cols.inverse(y).T).T, dtype=np.float32)

    def stored_bits(self) -> int:
        """What must be stored to rebuild the transform: a seed (64 bits), nothing for DCT."""
        return 0 if self.kind == "dct" else 64
