"""Codebook (non-uniform) quantization: each entry stores the index of its nearest centroid.

1-D k-means with a deterministic quantile initialisation, vectorised through sorting: in one
dimension the nearest centroid is found by binary search among the midpoints.
"""
from __future__ import annotations

import numpy as np

from .quant import QuantizedTensor

def kmeans_1d(values: np.ndarray, clusters: int, iters: int = 30) -> np.ndarray:
    """Sorted centroids of a 1-D k-means (Lloyd) started from evenly spaced quantiles."""
    flat = np.sort(values.astype(np.float64).ravel())
    centroids = np.quantile(flat, (np.arange(clusters) + 0.5) / clusters)
    for _ in range(iters):
        edges = np.searchsorted(flat, (centroids[1:] + centroids[:-1]) / 2)
        bounds = np.concatenate([[0], edges, [flat.size]])
        sums = np.add.reduceat(flat, bounds[:-1]) if flat.size else np.zeros(clusters)
        counts = np.diff(bounds)
        # reduceat returns the single element for empty segments; keep old centroids there
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(updated, centroids, rtol=0, atol=1e-12 * (np.abs(centroids).max() + 1e-30)):
            break
        centroids = updated
    return np.sort(centroids)


def nearest(values: np.ndarray, sorted_centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every value (centroids sorted ascending)."""
    mids = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return np.searchsorted(mids, values)


def codebook_quantize(w: np.ndarray, bits: int, iters: int = 30) -> QuantizedTensor:
    """Per-tensor 1-D k-means with 2**bits levels (centroids rounded to float16), no scales."""
    centroids = kmeans_1d(w, 1 << bits, iters).astype(np.float16).astype(np.float32)
    centroids = np.sort(centroids)
    return QuantizedTensor(codes=nearest(w, centroids).astype(np.uint8), scales=None, zero_points=None,
                           bits=bits, block_size=w.shape[0], codebook=centroids)
