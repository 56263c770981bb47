"""Kashin quantization (Merkulov et al. 2024): X = U + Q1·Ṽ·Q2ᵀ with small ∞-norms, coded jointly.

1. Greedy decomposition over the overcomplete dictionary [I, Q] (Q = Q2ᵀ⊗Q1ᵀ orthogonal): at
   each step the residual R is matched by a sign pattern, either sign(R) in the coordinate basis
   or Q1·sign(Q1ᵀRQ2)·Q2ᵀ in the rotated one (whichever has the larger ℓ1 norm, i.e. removes more
   energy); its coefficient goes into U or Ṽ. Both factors end up with entries of size about
   ‖X‖/√(mn), whatever outliers X had.
2. The pairs (U_ij, Ṽ_ij) are coded jointly by 2-D k-means with 2^bits centroids: one index per
   weight holds both factors, since their entries cluster around a few peaks.
Storage: bits per weight + 2^bits × 2 float16 centroids + the norm + the transform's seed.
A decomposition that does not reach ``tol`` within ``max_iter`` falls back to per-tensor 1-D
k-means with the same bits, and says so in ``info``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .codebook import codebook_quantize
from .quant import QuantizedTensor
from .representation import Representation, relative_error
from .transforms import MatrixTransform


@dataclass(frozen=True)
class KashinTensor:
    """norm · (U + Q1·Ṽ·Q2ᵀ) with the (U, Ṽ) pairs in one QuantizedTensor with a 2-D codebook."""

    pairs: QuantizedTensor       # codes [m, n], codebook [2**bits, 2] of (U, Ṽ) centroids
    norm: float                  # ‖X‖_F, stored as float32
    transform: MatrixTransform = field(repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pairs.shape

    @property
    def bits(self) -> int:
        return self.pairs.bits

    def dequantize(self) -> np.ndarray:
        uv = self.pairs.dequantize()
        return self.norm * (uv[..., 0] + self.transform.inverse(uv[..., 1]))

    def storage_bits(self) -> int:
        return self.pairs.storage_bits() + 32 + self.transform.stored_bits()


def kashin_decompose(x: np.ndarray, transform: MatrixTransform, tol: float = 1e-3, max_iter: int = 200):
    """Greedy split of X (normalized to unit Frobenius norm) into U + Q1·Ṽ·Q2ᵀ.

    Returns (U, Ṽ, iterations, relative residual).
    """
    r = np.asarray(x, np.float32).copy()
    u = np.zeros_like(r)
    v = np.zeros_like(r)
    size = np.sqrt(r.size)
    residual, it = float(np.linalg.norm(r)), 0
    for it in range(1, max_iter + 1):
        rotated = transform.forward(r)
        if np.abs(r).sum() >= np.abs(rotated).sum():
            c = np.abs(r).sum() / size
            step = np.sign(r) * (c / size)
            u += step
            r -= step
        else:
            c = np.abs(rotated).sum() / size
            step = np.sign(rotated) * (c / size)
            v += step
            r -= transform.inverse(step)
        residual = float(np.linalg.norm(r))
        if residual < tol:
            break
    return u, v, it, residual


def kmeans_2d(points: np.ndarray, clusters: int, iters: int = 25, sample: int = 200_000,
              seed: int = 0) -> np.ndarray:
    """Centroids of 2-D k-means, started from a uniform grid over the points' box (deterministic)."""
    rng = np.random.default_rng(seed)
    fit = points if len(points) <= sample else points[rng.choice(len(points), sample, replace=False)]
    side = int(np.ceil(np.sqrt(clusters)))
    lo, hi = fit.min(axis=0), fit.max(axis=0)
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], side), np.linspace(lo[1], hi[1], side))
    centroids = np.stack([gx.ravel(), gy.ravel()], axis=1)[:clusters].astype(np.float64)
    for _ in range(iters):
        labels = assign(fit, centroids)
        counts = np.bincount(labels, minlength=clusters)
        sums = np.stack([np.bincount(labels, fit[:, d], minlength=clusters) for d in range(2)], axis=1)
        empty = counts == 0
        updated = np.where(empty[:, None], centroids, sums / np.maximum(counts, 1)[:, None])
        if np.allclose(updated, centroids, atol=1e-9):
            break
        centroids = updated
    return centroids


def assign(points: np.ndarray, centroids: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Nearest centroid of every point, in chunks to bound memory."""
    out = np.empty(len(points), np.int64)
    for start in range(0, len(points), chunk):
        p = points[start:start + chunk]
        d = ((p[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)
        out[start:start + chunk] = d.argmin(axis=1)
    return out


def kashin_quantize(w: np.ndarray, bits: int = 4, transform: str = "hadamard", seed: int = 0,
                    tol: float = 1e-3, max_iter: int = 200) -> Representation:
    """Kashin-code W; falls back to 1-D k-means (reported in ``info``) if the split does not converge."""
    w = np.asarray(w, np.float32)
    norm = float(np.linalg.norm(w))
    t = MatrixTransform(transform, w.shape, seed)
    u, v, iters, residual = kashin_decompose(w / max(norm, 1e-30), t, tol, max_iter)
    info = {"transform": transform, "iterations": iters, "residual": residual, "converged": residual < tol}
    if residual >= tol:
        info["fallback"] = (f"decomposition reached residual {residual:.2e} > tol {tol:g} after {iters} "
                            f"iterations; coded with per-tensor 1-D k-means instead")
        return Representation(chains=((codebook_quantize(w, bits),),), method="kashin", info=info)
    pairs = np.stack([u.ravel(), v.ravel()], axis=1)
    centroids = kmeans_2d(pairs, 1 << bits, seed=seed).astype(np.float16).astype(np.float32)
    codes = assign(pairs, centroids.astype(np.float64)).astype(np.uint8).reshape(w.shape)
    tensor = KashinTensor(QuantizedTensor(codes=codes, scales=None, zero_points=None, bits=bits,
                                          block_size=w.shape[0], codebook=centroids), norm, t)
    info["rel_error"] = relative_error(w, tensor.dequantize())
    return Representation(chains=((tensor,),), method="kashin", info=info)
