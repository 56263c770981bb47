"""Dense and low-rank quantized factorizations of one weight matrix W[K, N] (Y = X·W).

- ``rtn``: W ≈ Q(W), block round-to-nearest (the baseline every method must beat).
- ``svd``: W ≈ Q(U√Σ)·Q(√ΣVᵀ), truncated SVD with each factor quantized on its own (DSVD).
- ``lplr``: LPLR (Saha, Srivastava, Pilanci 2023): a seeded Gaussian sketch of W's range, quantized,
  is the first factor L; the second is the least-squares fit R = argmin ||Q(L)·R − W||, which
  absorbs L's quantization error, quantized in turn. Variants: an SVD basis instead of the sketch
  (LPLR-SVD) and alternating refits L ← W·R⁺, R ← fit, keeping the best iterate.

Activation-aware (when H = XᵀX is given): the output error is ||X·ΔW||² = ||Sᵀ ΔW||² with
H = S·Sᵀ, so bases come from the whitened A = Sᵀ W (SVD-LLM), R is the H-weighted least-squares
fit, and factors are quantized with GPTQ on their own input statistics (H for L, Lᵀ H L for R).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gptq import HessianInfo, gptq_quantize
from .refine import refine
from .quant import QuantSpec, QuantizedTensor, quantize, spec_storage_bits
from .representation import Representation


def rtn_factorize(w: np.ndarray, spec: QuantSpec) -> Representation:
    return Representation(chains=((quantize(w, spec),),), method="rtn")


def gptq_factorize(w: np.ndarray, spec: QuantSpec, h: np.ndarray | HessianInfo, sweeps: int = 2) -> Representation:
    """GPTQ, then ``sweeps`` coordinate-descent passes over codes and scales (see refine.py)."""
    return Representation(chains=((_quantize(w, spec, HessianInfo.of(h), sweeps),),), method="gptq",
                          info={"sweeps": sweeps})


@dataclass(frozen=True)
class Whitener:
    """S with H = S·Sᵀ, and S⁻¹ (identity when there is no H)."""

    s: np.ndarray | None
    s_inv: np.ndarray | None = None

    @classmethod
    def of(cls, h: HessianInfo | None) -> "Whitener":
        return cls(None) if h is None else cls(h.cholesky, h.cholesky_inverse)

    def apply(self, w: np.ndarray) -> np.ndarray:
        return w if self.s is None else self.s.T @ w

    def unapply(self, a: np.ndarray) -> np.ndarray:
        """S⁻ᵀ·a."""
        return a if self.s is None else self.s_inv.T @ a


def truncated_svd(a: np.ndarray, rank: int, seed: int = 0, oversample: int = 16, power_iters: int = 2):
    """Top-``rank`` SVD; randomized (Halko et al.) when the rank is small against the matrix."""
    small = min(a.shape)
    if small <= 512 or rank + oversample >= small // 2:
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    rng = np.random.default_rng(seed)
    y = a @ rng.standard_normal((a.shape[1], rank + oversample), dtype=np.float32).astype(a.dtype)
    for _ in range(power_iters):
        y, _ = np.linalg.qr(y)
        y = a @ (a.T @ y)
    q, _ = np.linalg.qr(y)
    u, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vt[:rank]


def fit_block(spec: QuantSpec, rows: int) -> QuantSpec:
    """``spec`` with its block no longer than ``rows`` (a power of two, at least 16), so a factor
    with few rows (R of a small rank) is not padded to a whole block."""
    if not spec.block_size or spec.block_size <= rows:
        return spec
    block = 1 << max(4, int(np.floor(np.log2(max(rows, 16)))))
    return QuantSpec(spec.bits, block, spec.symmetric, spec.clip_search, spec.scale_dtype)


def _quantize(m: np.ndarray, spec: QuantSpec, h: HessianInfo | np.ndarray | None, sweeps: int = 0) -> QuantizedTensor:
    """RTN without H; with H, GPTQ followed by ``sweeps`` rounds of coordinate descent."""
    if h is None:
        return quantize(m, spec)
    q = gptq_quantize(m, h, spec)
    return refine(m, q, h.h if isinstance(h, HessianInfo) else h, sweeps) if sweeps else q


def _score(w: np.ndarray, approx: np.ndarray, h: HessianInfo | None) -> float:
    """What best-iterate choices minimise: ||ΔW||² or tr(ΔWᵀ H ΔW) (unnormalised, one product)."""
    delta = np.asarray(w, np.float32) - np.asarray(approx, np.float32)
    if h is None:
        return float(np.einsum("ij,ij->", delta, delta, dtype=np.float64))
    return float(np.einsum("ij,ij->", delta, h.h @ delta, dtype=np.float64))


def fit_right(left: np.ndarray, w: np.ndarray, h: HessianInfo | None) -> np.ndarray:
    """argmin_R ||Sᵀ(L·R − W)||: solves (Lᵀ H L) R = Lᵀ H W (H = I without statistics)."""
    hl = left if h is None else h.h @ left
    gram = left.T @ hl
    gram[np.diag_indices_from(gram)] += 1e-7 * max(float(np.trace(gram)) / len(gram), 1e-30)
    return np.linalg.solve(gram, hl.T @ w)


def svd_factorize(w: np.ndarray, rank: int, spec_l: QuantSpec, spec_r: QuantSpec) -> Representation:
    """DSVD: truncated SVD, singular values split evenly, each factor quantized on its own."""
    _check_rank(w, rank)
    u, s, vt = truncated_svd(np.asarray(w, np.float32), rank)
    root = np.sqrt(s)
    return Representation(chains=((quantize(u * root, spec_l), quantize(root[:, None] * vt, fit_block(spec_r, rank))),),
                          method="svd", rank=rank)


def lplr_factorize(
    w: np.ndarray,
    rank: int,
    spec_l: QuantSpec,
    spec_r: QuantSpec,
    *,
    h: np.ndarray | HessianInfo | None = None,
    init: str = "sketch",
    refits: int = 0,
    seed: int = 0,
    oversample: int = 8,
    power_iters: int = 0,
) -> Representation:
    """Quantized L[K, r]·R[r, N] ≈ W with error feedback into R (see the module docstring).

    ``init="sketch", oversample=0, power_iters=0, refits=0`` is the paper's Algorithm 1 exactly
    (L = Q(W·S) with a K×rank Gaussian sketch). With oversampling, a sketch of rank+oversample
    columns (sharpened by power iterations) is reduced to its best rank-``rank`` subspace first:
    the paper's error bound needs more sketch columns than the target rank.
    """
    _check_rank(w, rank)
    w = np.asarray(w, np.float32)
    hinfo = HessianInfo.of(h)
    white = Whitener.of(hinfo)
    a = white.apply(w)
    if init == "svd":
        u, s, _ = truncated_svd(a, rank, seed)
        left = u * np.sqrt(s)
    elif init == "sketch":
        rng = np.random.default_rng(seed)
        width = min(rank + oversample, a.shape[1])
        left = a @ (rng.standard_normal((a.shape[1], width), dtype=np.float32) / np.float32(np.sqrt(width)))
        for _ in range(power_iters):
            basis, _ = np.linalg.qr(left)
            left = a @ (a.T @ basis)
        if width > rank:
            basis, _ = np.linalg.qr(left)
            u, s, _ = np.linalg.svd(basis.T @ a, full_matrices=False)
            left = (basis @ u[:, :rank]) * np.sqrt(s[:rank])
    else:
        raise ValueError(f"unknown init '{init}' (sketch or svd)")
    left = white.unapply(left)
    spec_r = fit_block(spec_r, rank)
    best, best_err = None, np.inf
    for step in range(refits + 1):
        if step:  # refit L to the quantized R (optimal for any H), then R again below
            right_d = right.dequantize()
            left = np.linalg.solve(right_d @ right_d.T + 1e-7 * np.eye(rank, dtype=np.float32), right_d @ w.T).T
        lq = _quantize(left, spec_l, hinfo)
        ld = lq.dequantize()
        right = _quantize(fit_right(ld, w, hinfo), spec_r, None if hinfo is None else ld.T @ hinfo.h @ ld)
        err = _score(w, ld @ right.dequantize(), hinfo) if refits else 0.0
        if err < best_err:
            best, best_err = (lq, right), err
    return Representation(chains=(best,), method="lplr", rank=rank,
                          info={"init": init, "refits": refits, "seed": seed, "oversample": oversample,
                                "power_iters": power_iters, "activation_aware": hinfo is not None})


def _check_rank(w: np.ndarray, rank: int) -> None:
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in 1..{min(w.shape)} for a {w.shape[0]}x{w.shape[1]} matrix, got {rank}")


def lowrank_storage_bits(k: int, n: int, rank: int, spec_l: QuantSpec, spec_r: QuantSpec) -> int:
    return spec_storage_bits(k, rank, spec_l) + spec_storage_bits(rank, n, fit_block(spec_r, rank))


def rank_for_bpw(k: int, n: int, target_bpw: float, spec_l: QuantSpec, spec_r: QuantSpec,
                 multiple: int = 16, fixed_bits: int = 0) -> int:
    """Largest rank (a multiple of ``multiple``, at most min(k, n)) whose factors, plus
    ``fixed_bits`` of other storage, fit the budget. 0 when not even the smallest rank fits."""
    budget = target_bpw * k * n - fixed_bits
    best = 0
    for rank in range(multiple, min(k, n) + 1, multiple):
        if lowrank_storage_bits(k, n, rank, spec_l, spec_r) > budget:
            break
        best = rank
    return best
