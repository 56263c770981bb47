"""Torch modules that hold a layer's compressed form and compute with it on CPU or CUDA.

A :class:`~lrqgraph.numerics.Representation` (W[K, N] ≈ R·Σ_chains Π dequant(factor)) becomes
buffers: each uniform factor's codes packed at its bit width, its block scales as stored (float16
for a float32 layer, as in the ONNX file) and zero points; a codebook's entries. Forward rotates
the input when the representation is rotated, then runs each chain as matmuls of dequantized
factors (a low-rank chain never forms the K×N product) and sums the chains: the numbers the ONNX
lowerings compute, in torch. Factors of other kinds (Kashin's paired codebook) are held as their
dequantized float32 matrix.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrqgraph.numerics import Representation
from lrqgraph.numerics.pack import pack_bits
from lrqgraph.numerics.quant import QuantizedTensor
from lrqgraph.numerics.rotation import Rotation


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of a little-endian bit stream (numerics.pack's layout), as int32."""
    stream = (packed[:, None].to(torch.int32) >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    planes = stream.reshape(-1)[:count * bits].reshape(count, bits)
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (planes * weights).sum(-1, dtype=torch.int32)


class QuantizedFactor(nn.Module):
    """One quantized matrix of a chain: dequantize() gives its float32 [K, N]."""

    def __init__(self, q) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in q.shape)
        uniform = isinstance(q, QuantizedTensor) and q.codebook is None
        scalar_book = isinstance(q, QuantizedTensor) and q.codebook is not None and q.codebook.ndim == 1
        self.kind = "grid" if uniform else "codebook" if scalar_book else "float"
        if self.kind == "float":  # e.g. Kashin's (U, Ṽ) pairs: no torch kernel for the joint code
            self.register_buffer("weight", torch.from_numpy(np.asarray(q.dequantize(), np.float32).copy()))
            return
        self.bits, self.block, self.axis = int(q.bits), int(q.block_size), int(q.axis)
        self.register_buffer("codes", torch.from_numpy(pack_bits(q.codes.reshape(1, -1), q.bits)[0]))
        if self.kind == "codebook":
            self.register_buffer("codebook", torch.from_numpy(np.asarray(q.codebook, np.float32).copy()))
            scales = None if q.scales is None else q.scales
        else:
            scales = q.scales
            self.register_buffer("zero_points", torch.from_numpy(q.zero_point_array().astype(np.uint8)))
        self.register_buffer("scales", None if scales is None else torch.from_numpy(np.ascontiguousarray(scales)))

    def _per_entry(self, blocked: torch.Tensor) -> torch.Tensor:
        k, n = self.shape
        return torch.repeat_interleave(blocked, self.block, dim=self.axis)[:k, :n]

    def dequantize(self) -> torch.Tensor:
        if self.kind == "float":
            return self.weight
        k, n = self.shape
        codes = _unpack(self.codes, self.bits, k * n).reshape(k, n)
        if self.kind == "codebook":
            levels = self.codebook[codes]
        else:
            levels = codes.to(torch.float32) - self._per_entry(self.zero_points.to(torch.float32))
        if self.scales is None:
            return levels
        return levels * self._per_entry(self.scales.to(torch.float32))


class HadamardRotation(nn.Module):
    """X·R for numerics.rotation.Rotation from its stored factors (signs, odd block, two Hadamards),
    in the order of the ONNX lowering: O(K·(b + p1 + p2)) per row, never a K×K matrix."""

    def __init__(self, rotation: Rotation) -> None:
        super().__init__()
        factors = rotation.factors()
        self.p1, self.p2 = len(factors["h1"]), len(factors["h2"])
        self.odd = rotation.k // (self.p1 * self.p2)
        factors["signs"] = factors["signs"] * factors["norm"]  # the normalization, folded as the lowering does
        for name in ("signs", "h1", "h2", "small"):
            value = factors.get(name)
            self.register_buffer(name, None if value is None else torch.from_numpy(np.asarray(value, np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = (x * self.signs).reshape(-1, self.p1, self.p2, self.odd)
        if self.small is not None:
            y = y @ self.small
        y = (self.h1 @ y.reshape(-1, self.p1, self.p2 * self.odd)).reshape(-1, self.p1, self.p2, self.odd)
        return (self.h2 @ y).reshape(shape)


class CompressedMatrix(nn.Module):
    """x ↦ x·Ŵ for a Representation Ŵ[K, N]: rotation, then the sum of each chain's matmuls; with
    ``column_scale`` c, x ↦ x·Ŵ·diag(1/c) (Ŵ stands for the weight with a following BatchNorm's
    γ/σ folded in, as the exporter wrote it, and the module keeps that BatchNorm)."""

    def __init__(self, rep: Representation, column_scale: np.ndarray | None = None) -> None:
        super().__init__()
        self.representation = rep  # what export lowers (the buffers below are its torch form)
        self.column_scale = column_scale
        inverse = None if column_scale is None else torch.from_numpy((1.0 / column_scale).astype(np.float32))
        self.register_buffer("inverse_scale", inverse)
        self.shape = rep.shape
        self.method, self.form = rep.method, rep.form
        self.storage_bits = rep.storage_bits()
        self.rotation = None if rep.rotation is None else HadamardRotation(rep.rotation)
        self.chains = nn.ModuleList(nn.ModuleList(QuantizedFactor(q) for q in chain) for chain in rep.chains)

    def extra_repr(self) -> str:
        return f"form={self.form}, bits_per_weight={self.storage_bits / math.prod(self.shape):.3f}"

    def weight(self) -> torch.Tensor:
        """The module's matrix as float32: R·Σ_chains Π factors (·diag(1/c))."""
        inner = sum(_product([f.dequantize() for f in chain]) for chain in self.chains)
        if self.rotation is None:
            return self._unscaled(inner)
        # R·W': the rotation maps the identity's rows to R's (x ↦ x·R), formed only here, never in forward
        eye = torch.eye(inner.shape[0], dtype=inner.dtype, device=inner.device)
        return self._unscaled(self.rotation(eye) @ inner)

    def _unscaled(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.inverse_scale is None else y * self.inverse_scale.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.rotation is None else self.rotation(x)
        out = None
        for chain in self.chains:
            y = x
            for factor in chain:
                y = y @ factor.dequantize().to(x.dtype)
            out = y if out is None else out + y
        return self._unscaled(out)


def _product(mats: list[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = out @ m
    return out


class CompressedLinear(nn.Module):
    """nn.Linear with its weight held compressed (y = x·Ŵ + b, Ŵ = weightᵀ's Representation)."""

    def __init__(self, matrix: CompressedMatrix, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = matrix.shape
        self.matrix = matrix
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matrix(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.matrix.extra_repr()}"


class CompressedConv2d(nn.Module):
    """nn.Conv2d with its weight held compressed: the kernel is rebuilt from Ŵ[C_in/g·kh·kw, C_out]
    on each call (the layout the ONNX path uses) and convolved with the original geometry."""

    def __init__(self, matrix: CompressedMatrix, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (zeros only)")
        self.kernel = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.matrix = matrix
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.matrix.weight().T.reshape(self.kernel).to(x.dtype)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"{self.matrix.extra_repr()}")


class CompressedEmbedding(nn.Module):
    """nn.Embedding with its table held compressed: Ŵ[dim, vocab] is the table transposed (the
    ONNX path's layout for a Gather table); a lookup reads rows of Ŵᵀ. The whole table is
    dequantized per call (simple, not fast: a lookup kernel over the gathered columns' codes
    would read only those)."""

    def __init__(self, matrix: CompressedMatrix, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding_dim, self.num_embeddings = matrix.shape
        self.padding_idx = embedding.padding_idx
        self.matrix = matrix

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.matrix.weight().T, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.matrix.extra_repr()}"


class CompressedWeight:
    """A subclass of nn.Linear / nn.Conv2d with its own forward (EfficientNet's
    Conv2dStaticSamePadding pads before convolving) keeps that forward: its ``weight`` parameter is
    removed, the module holds the CompressedMatrix as ``lrq_matrix``, and a pre-forward hook
    rebuilds ``weight`` from it for the call (dropped again after it)."""

    @staticmethod
    def attach(module: nn.Module, matrix: CompressedMatrix) -> None:
        shape = tuple(module.weight.shape)
        del module.weight
        module.lrq_matrix = matrix
        module.lrq_weight_shape = shape
        module.lrq_hooks = (module.register_forward_pre_hook(CompressedWeight._build),
                            module.register_forward_hook(CompressedWeight._drop))

    @staticmethod
    def detach(module: nn.Module, weight: torch.Tensor) -> None:
        """Back to a float module whose weight is ``weight`` (what export traces)."""
        for hook in module.lrq_hooks:
            hook.remove()
        del module.lrq_matrix, module.lrq_weight_shape, module.lrq_hooks
        module.weight = nn.Parameter(weight, requires_grad=False)

    @staticmethod
    def _build(module: nn.Module, args) -> None:
        w = module.lrq_matrix.weight()
        module.weight = w.T.reshape(module.lrq_weight_shape).to(args[0].dtype)

    @staticmethod
    def _drop(module: nn.Module, args, output) -> None:
        del module.weight
