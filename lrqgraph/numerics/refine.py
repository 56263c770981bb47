"""Coordinate descent on a quantized matrix's codes and scales against the layer's output error.

GPTQ visits each row once and never revisits an early decision. With H = XᵀX fixed, the output
error f(Q) = tr((W − Q)ᵀ H (W − Q)) is, along any one row of codes or any one block's scales, a
1-D quadratic whose exact minimiser is cheap: rounding a row to the grid point nearest to

    target_k = w_k + (H·Δ)_k / H_kk − Δ_k           (Δ = W − Q)

or shifting a block's scale by cᵀ(H·Δ) / cᵀ H c. Each step can only lower f, so sweeps converge
(a local search over the grid, as in QuIP's greedy pass). The gradient G = H·Δ is kept up to date
lazily: exact within a chunk of rows, folded into all rows with one matrix product per chunk, so
a sweep costs one K×K×N product like GPTQ itself.
"""
from __future__ import annotations

import numpy as np

from .quant import QuantizedTensor


def refine(w: np.ndarray, q: QuantizedTensor, h: np.ndarray, sweeps: int = 4,
           chunk: int = 128) -> QuantizedTensor:
    """Lower tr(ΔWᵀ H ΔW) of ``q`` by ``sweeps`` passes over every row's codes and block's scales.

    Zero points stay fixed; scales stay representable in their dtype (rounded before use, so the
    error tracked is the error stored). Inputs with H_kk = 0 carry no signal and are left alone.
    """
    w = np.asarray(w, np.float32)
    h = np.asarray(h, np.float32)
    k, n = w.shape
    block = q.block_size
    top = (1 << q.bits) - 1
    offsets = q.zero_point_array().astype(np.float32)
    scales = q.scales.astype(np.float32)
    codes = q.codes.astype(np.float32)
    diag = np.diag(h).copy()
    live = diag > 0
    inv_diag = np.where(live, 1.0 / np.where(live, diag, 1.0), 0.0)
    if block <= chunk:
        chunk = chunk // block * block  # chunks hold whole blocks: scales are refit inside them
    delta = w - (codes - np.repeat(offsets, block, axis=0)[:k]) * np.repeat(scales, block, axis=0)[:k]
    grad = h @ delta
    for _ in range(sweeps):
        for start in range(0, k, chunk):
            stop = min(start + chunk, k)
            before = delta[start:stop].copy()
            local = grad[start:stop].copy()  # exact for the rows of this chunk not yet visited
            for i in range(start, stop):
                if not live[i]:
                    continue
                b = i // block
                target = w[i] + (local[i - start] * inv_diag[i] - delta[i])
                c = np.clip(np.rint(target / scales[b]) + offsets[b], 0, top)
                new = w[i] - (c - offsets[b]) * scales[b]
                moved = new - delta[i]
                if moved.any():
                    local[i - start + 1:] += np.outer(h[i + 1:stop, i], moved)
                    delta[i] = new
                    codes[i] = c
            if block <= chunk:
                local = grad[start:stop] + h[start:stop, start:stop] @ (delta[start:stop] - before)
                for lo in range(start, stop, block):
                    hi = min(lo + block, stop)
                    change = _scale_step(codes, offsets, scales, h, local[lo - start:hi - start], lo, hi, block,
                                         q.scales.dtype)
                    if change is not None:
                        delta[lo:hi] += change
                        local += h[start:stop, lo:hi] @ change
            grad += h[:, start:stop] @ (delta[start:stop] - before)
            if block > chunk and (stop == k or stop % block == 0):
                lo = (stop - 1) // block * block
                change = _scale_step(codes, offsets, scales, h, grad[lo:stop], lo, stop, block, q.scales.dtype)
                if change is not None:
                    delta[lo:stop] += change
                    grad += h[:, lo:stop] @ change
    return QuantizedTensor(codes=codes.astype(np.uint8), scales=scales.astype(q.scales.dtype),
                           zero_points=q.zero_points, bits=q.bits, block_size=block)


def _scale_step(codes, offsets, scales, h, grad, lo: int, hi: int, block: int, dtype) -> np.ndarray | None:
    """Move block lo // block's scales to the exact line minimum for every column; return ΔΔ rows."""
    b = lo // block
    c = codes[lo:hi] - offsets[b]
    curvature = np.einsum("kn,kn->n", c, h[lo:hi, lo:hi] @ c)
    slope = np.einsum("kn,kn->n", c, grad)
    ok = curvature > 0
    proposed = scales[b] + np.where(ok, slope / np.where(ok, curvature, 1.0), 0.0)
    proposed = proposed.astype(dtype).astype(np.float32)  # the scale that will be stored
    proposed = np.where((proposed == 0) | ~np.isfinite(proposed), scales[b], proposed)
    shift = proposed - scales[b]
    if not shift.any():
        return None
    scales[b] = proposed
    return -c * shift
