"""Block-wise uniform quantization of a matrix along its first axis.

A weight W[K, N] (ONNX MatMul layout: K inputs, N outputs) is cut into blocks of ``block_size``
consecutive rows for every column, the layout shared by MatMulNBits and blocked
DequantizeLinear(axis=0). Codes are stored unsigned; symmetric tensors use the implicit zero
point 2**(bits-1), asymmetric ones carry a zero point per block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .pack import pack_bits, packed_nbytes

# Candidate clipping ratios for the MSE scale search: shrinking the range trades clipping error on
# the few largest weights for finer steps on all the others.
_CLIP_RATIOS = np.linspace(1.0, 0.55, 10)
CODEBOOK_BITS = 16  # codebook entries are stored as float16


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor."""

    bits: int = 4
    block_size: int = 32          # 0 means one block per column (per-channel)
    symmetric: bool = True
    clip_search: bool = False     # pick per-block clipping that minimises squared error
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.block_size and not 16 <= self.block_size <= 256:
            raise ValueError(f"block size must be 0 (per-channel) or in 16..256, got {self.block_size}")
        if self.scale_dtype not in ("float32", "float16"):
            raise ValueError(f"scale dtype must be float32 or float16, got {self.scale_dtype}")

    def block_for(self, rows: int) -> int:
        """The block length used for a matrix with ``rows`` rows: a block never exceeds the rows."""
        return min(self.block_size, rows) if self.block_size else rows


@dataclass(frozen=True)
class QuantizedTensor:
    """The one stored form of a quantized 2-D matrix: codes, block scales, zero points, codebook.

    Blocks of ``block_size`` consecutive entries run along ``axis`` (0: down the K rows of a [K, N]
    MatMul weight, the MatMulNBits and DequantizeLinear(axis=0) layout; 1: along each row). A code
    c stands for level(c) × its block's scale, where level(c) = c − zero point on a uniform grid
    (implicit zero point 2**(bits-1) when symmetric) or codebook[c] with a codebook, whose entries
    are scalars ([2**bits]) or vectors ([2**bits, d]: one code carries d values, as Kashin's pairs).
    Codebook tensors may have no scales (unit scale).
    """

    codes: np.ndarray                 # uint8 [K, N], values < 2**bits
    scales: np.ndarray | None         # [ceil(K/block), N] for axis 0 ([K, ceil(N/block)] for axis 1)
    zero_points: np.ndarray | None    # uint8, the scales' shape; None: symmetric (or codebook)
    bits: int
    block_size: int
    axis: int = 0
    codebook: np.ndarray | None = None  # float32 [2**bits] or [2**bits, d], stored as float16

    def __post_init__(self) -> None:
        if self.axis not in (0, 1):
            raise ValueError(f"axis must be 0 or 1, got {self.axis}")
        if self.scales is None and self.codebook is None:
            raise ValueError("a uniform grid needs scales")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def zero_point_array(self) -> np.ndarray:
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)

    def _per_entry(self, blocked: np.ndarray) -> np.ndarray:
        """Expand a per-block array to one value per entry of the matrix."""
        return np.repeat(blocked, self.block_size, axis=self.axis)[:self.shape[0], :self.shape[1]]

    def levels(self) -> np.ndarray:
        """Unscaled values: [K, N], or [K, N, d] for a vector codebook."""
        if self.codebook is not None:
            return self.codebook[self.codes]
        return self.codes.astype(np.float32) - self._per_entry(self.zero_point_array().astype(np.float32))

    def dequantize(self) -> np.ndarray:
        """The float32 matrix this tensor stands for (vector codebooks: [K, N, d])."""
        levels = self.levels().astype(np.float32)
        if self.scales is None:
            return levels
        scale = self._per_entry(self.scales.astype(np.float32))
        return levels * (scale if levels.ndim == 2 else scale[..., None])

    def packed_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The MatMulNBits / lrq-op layout (blocks along K): codes [N, blocks, blob] packed low bits
        first (the last block padded with its zero point), scales [N, blocks], zero points [N, blocks]
        unpacked (None when symmetric)."""
        n, blocks = self.shape[1], self.scales.shape[0]
        zero_points = None if self.zero_points is None else np.ascontiguousarray(self.zero_points.T)
        return (pack_bits(self.padded_codes().T.reshape(n, blocks, self.block_size), self.bits),
                np.ascontiguousarray(self.scales.T), zero_points)

    def padded_codes(self) -> np.ndarray:
        """codes [blocks · block_size, N]: the last block padded with its zero point (axis 0 blocks)."""
        k, n = self.shape
        width = self.scales.shape[0] * self.block_size
        if width == k:
            return self.codes
        return np.concatenate([self.codes, np.broadcast_to(self.zero_point_array()[-1:], (width - k, n))])

    def storage_bits(self) -> int:
        """Every stored bit: codes (packed per block when there are scales, as MatMulNBits pads
        them; over the whole tensor otherwise), scales, packed zero points, float16 codebook."""
        k, n = self.shape
        book = 0 if self.codebook is None else self.codebook.size * CODEBOOK_BITS
        if self.scales is None:
            return packed_nbytes(k * n, self.bits) * 8 + book
        rows, cols = (k, n) if self.axis == 0 else (n, k)
        return storage_bits(rows, cols, self.bits, self.block_size, self.scales.dtype.itemsize * 8,
                            self.zero_points is not None) + book


def storage_bits(rows: int, cols: int, bits: int, block_size: int, scale_bits: int,
                 has_zero_points: bool) -> int:
    """Bits to store a [rows, cols] matrix quantized block-wise along rows, packed at ``bits``.

    Counts codes (each column's blocks padded to whole blocks and bytes, as MatMulNBits stores
    them), one scale per block and, when asymmetric, one packed zero point per block.
    """
    block = block_size or rows
    blocks = -(-rows // block)
    code_bits = cols * blocks * packed_nbytes(block, bits) * 8
    zp_bits = cols * packed_nbytes(blocks, bits) * 8 if has_zero_points else 0
    return code_bits + cols * blocks * scale_bits + zp_bits


def spec_storage_bits(rows: int, cols: int, spec: "QuantSpec") -> int:
    """:func:`storage_bits` for a matrix quantized with ``spec``, from its shape alone."""
    return storage_bits(rows, cols, spec.bits, spec.block_for(rows),
                        np.dtype(spec.scale_dtype).itemsize * 8, not spec.symmetric)


def _blocked(w: np.ndarray, block: int) -> np.ndarray:
    """[K, N] -> [blocks, block, N], zero-padding K up to a whole block."""
    k, n = w.shape
    blocks = -(-k // block)
    if blocks * block != k:
        w = np.concatenate([w, np.zeros((blocks * block - k, n), w.dtype)], axis=0)
    return w.reshape(blocks, block, n)


def _block_range(wb: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """What a block's grid is set from: its largest-magnitude value with its sign (symmetric), or
    its min and max. Independent of the clipping ratio, so computed once per matrix."""
    if symmetric:
        idx = np.abs(wb).argmax(axis=1)[:, None, :]
        return np.take_along_axis(wb, idx, axis=1)[:, 0, :], None
    return wb.min(axis=1), wb.max(axis=1)


def _scales_for(wb: np.ndarray, bits: int, symmetric: bool, ratio: float, dtype: np.dtype,
                extent: tuple[np.ndarray, np.ndarray | None] | None = None):
    """Scales and zero points for blocked weights at one clipping ratio (zero points None if
    symmetric); ``extent`` is _block_range(wb), when the caller has it."""
    first, second = extent if extent is not None else _block_range(wb, symmetric)
    if symmetric:
        # Map the largest-magnitude value (with its sign) to the most negative code, so that all
        # 2**bits levels are used, as onnxruntime's own quantizer does.
        scale = (first * ratio / -(1 << (bits - 1))).astype(dtype).astype(np.float32)
        scale[scale == 0] = 1.0
        return scale, None
    lo = np.minimum(first, 0.0) * ratio
    hi = np.maximum(second, 0.0) * ratio
    scale = ((hi - lo) / ((1 << bits) - 1)).astype(dtype).astype(np.float32)
    scale[scale == 0] = 1.0
    zp = np.clip(np.rint(-lo / scale), 0, (1 << bits) - 1).astype(np.float32)
    return scale, zp


def _codes_for(wb: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, bits: int) -> np.ndarray:
    offset = (1 << (bits - 1)) if zp is None else zp[:, None, :]
    codes = np.divide(wb, scale[:, None, :])
    np.rint(codes, out=codes)
    codes += offset
    return np.clip(codes, 0, (1 << bits) - 1, out=codes)


# Values quantized per pass (2 MB of float32): the clip search walks its slab of columns ten
# times, and a slab stays in cache where a whole weight streams from memory on every walk (one
# core of this machine, best of 3: 1.42 s against 1.70 s for 4096 x 11008, 1.93 s either way for
# 11008 x 4096; the same codes)
_SLAB_VALUES = 1 << 19


def quantize(w: np.ndarray, spec: QuantSpec, axis: int = 0) -> QuantizedTensor:
    """Quantize a 2-D float matrix with blocks along ``axis`` (0: down the rows, MatMul layout)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    if axis == 1:
        q = quantize(np.asarray(w).T, spec)
        return dataclasses.replace(q, codes=q.codes.T, scales=q.scales.T, axis=1,
                                   zero_points=None if q.zero_points is None else q.zero_points.T)
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    slab = max(16, _SLAB_VALUES // max(k, 1) // 16 * 16)
    if n > slab:  # columns are independent: the same codes, slab by slab
        parts = [quantize(w[:, i:i + slab], spec) for i in range(0, n, slab)]
        return QuantizedTensor(
            codes=np.concatenate([p.codes for p in parts], axis=1),
            scales=np.concatenate([p.scales for p in parts], axis=1),
            zero_points=None if parts[0].zero_points is None else
            np.concatenate([p.zero_points for p in parts], axis=1),
            bits=spec.bits, block_size=parts[0].block_size)
    block = spec.block_for(k)
    dtype = np.dtype(spec.scale_dtype)
    wb = _blocked(w, block)
    extent = _block_range(wb, spec.symmetric)
    ratio = _CLIP_RATIOS[0]
    if spec.clip_search:
        # each block's clipping ratio of least squared error; its grid is then made once
        best_err, ratio = None, np.full(extent[0].shape, _CLIP_RATIOS[0])
        for r in _CLIP_RATIOS:
            scale, zp = _scales_for(wb, spec.bits, spec.symmetric, r, dtype, extent)
            offset = (1 << (spec.bits - 1)) if zp is None else zp[:, None, :]
            delta = _codes_for(wb, scale, zp, spec.bits)  # then, in place: (code - offset)·scale − w, squared
            delta -= offset
            delta *= scale[:, None, :]
            delta -= wb
            err = np.einsum("ijk,ijk->ik", delta, delta)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = np.where(better, err, best_err)
            ratio[better] = r
    scale, zp = _scales_for(wb, spec.bits, spec.symmetric, ratio, dtype, extent)
    codes = _codes_for(wb, scale, zp, spec.bits)
    codes = codes.reshape(-1, n)[:k].astype(np.uint8)
    return QuantizedTensor(
        codes=codes,
        scales=scale.astype(dtype),
        zero_points=None if zp is None else zp.astype(np.uint8),
        bits=spec.bits,
        block_size=block,
    )


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """The float32 matrix a quantized tensor stands for."""
    return q.dequantize()
