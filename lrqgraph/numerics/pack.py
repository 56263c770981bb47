"""Bit packing along the last axis, low bits first (the MatMulNBits and ONNX int4 convention)."""
from __future__ import annotations

import numpy as np


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2**bits) along the last axis into uint8, least significant bit first.

    Element i of a row occupies bits [i*bits, (i+1)*bits) of the row's bit stream; a row whose
    bit count is not a multiple of 8 is zero-padded to a whole byte.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.copy()
    if bits == 4 and codes.shape[-1] % 2 == 0:  # fast path: the common case
        return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    bitplanes = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = bitplanes.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of each row."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : count * bits]
    planes = stream.reshape(*packed.shape[:-1], count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8))
    return (planes * weights).sum(axis=-1, dtype=np.uint8)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits packed into one row."""
    return (count * bits + 7) // 8
