"""Dense and low-rank quantized factorizations of one weight matrix W[K, N].

- ``rtn``: W ≈ Q(W), block round-to-nearest (the baseline every method must beat).
- ``svd``: W ≈ Q(U√Σ)·Q(√ΣVᵀ), truncated SVD with both factors quantized independently (DSVD).
- ``lplr``: LPLR (Saha, Srivastava, Pilanci 2023): a seeded Gaussian sketch of W's range is
  quantized as the first factor L, then the second factor is the least-squares fit
  R = argmin ||Q(L)·R - W||, which absorbs L's quantization error, and is quantized in turn.
"""
from __future__ import annotations

import numpy as np

from .quant import QuantSpec, quantize, spec_storage_bits
from .representation import Representation


def rtn_factorize(w: np.ndarray, spec: QuantSpec) -> Representation:
    return Representation(chains=((quantize(w, spec),),), method="rtn")


def _balanced_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int):
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def svd_factorize(w: np.ndarray, rank: int, spec_l: QuantSpec, spec_r: QuantSpec) -> Representation:
    """DSVD: truncated SVD, singular values split evenly, each factor quantized on its own."""
    _check_rank(w, rank)
    u, s, vt = np.linalg.svd(np.asarray(w, np.float32), full_matrices=False)
    left, right = _balanced_factors(u, s, vt, rank)
    return Representation(chains=((quantize(left, spec_l), quantize(right, spec_r)),),
                          method="svd", rank=rank)


def lplr_factorize(
    w: np.ndarray,
    rank: int,
    spec_l: QuantSpec,
    spec_r: QuantSpec,
    *,
    seed: int = 0,
    oversample: int = 8,
    power_iters: int = 1,
) -> Representation:
    """LPLR: quantized sketch as the first factor, quantized least-squares second factor.

    ``oversample=0, power_iters=0`` is the paper's Algorithm 1 exactly (L = Q(W·S) with a K×rank
    sketch). With oversampling, a sketch of rank+oversample columns (sharpened by power iterations)
    is reduced to its best rank-``rank`` subspace before quantization: the error bound of the
    paper needs more sketch columns than the target rank.
    """
    _check_rank(w, rank)
    w = np.asarray(w, np.float32)
    k, n = w.shape
    rng = np.random.default_rng(seed)
    width = min(rank + oversample, n)
    sketch = w @ (rng.standard_normal((n, width)).astype(np.float32) / np.sqrt(width))
    for _ in range(power_iters):
        basis, _ = np.linalg.qr(sketch)
        sketch = w @ (w.T @ basis)
    if width > rank:
        basis, _ = np.linalg.qr(sketch)
        u, s, vt = np.linalg.svd(basis.T @ w, full_matrices=False)
        sketch = (basis @ u[:, :rank]) * np.sqrt(s[:rank])
    left = quantize(sketch, spec_l)
    left_deq = left.dequantize()
    right_fit, *_ = np.linalg.lstsq(left_deq, w, rcond=None)
    right = quantize(right_fit, spec_r)
    return Representation(chains=((left, right),), method="lplr", rank=rank,
                          info={"seed": seed, "oversample": oversample, "power_iters": power_iters})


def _check_rank(w: np.ndarray, rank: int) -> None:
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in 1..{min(w.shape)} for a {w.shape[0]}x{w.shape[1]} matrix, got {rank}")


def lowrank_storage_bits(k: int, n: int, rank: int, spec_l: QuantSpec, spec_r: QuantSpec) -> int:
    return spec_storage_bits(k, rank, spec_l) + spec_storage_bits(rank, n, spec_r)


def rank_for_bpw(k: int, n: int, target_bpw: float, spec_l: QuantSpec, spec_r: QuantSpec,
                 multiple: int = 16) -> int:
    """Largest rank (a multiple of ``multiple``, at most min(k, n)) whose factors fit the budget.

    Returns 0 when not even the smallest rank fits.
    """
    budget = target_bpw * k * n
    best = 0
    for rank in range(multiple, min(k, n) + 1, multiple):
        if lowrank_storage_bits(k, n, rank, spec_l, spec_r) > budget:
            break
        best = rank
    return best


def breakeven_rank(k: int, n: int, spec_l: QuantSpec, spec_r: QuantSpec, dense_bits: int = 32) -> int:
    """Largest rank whose factors still take fewer bits than the dense matrix at ``dense_bits``."""
    return rank_for_bpw(k, n, dense_bits * (1 - 1e-9), spec_l, spec_r, multiple=1)
