"""Image patches of a 2-D convolution as the rows of a matrix product (im2col).

A Conv with weight [C_out, C_in, kh, kw] is the product of each input patch (C_in·kh·kw values,
channel slowest, then kernel row, then kernel column: the order of ``weight.reshape(C_out, -1)``)
with W[C_in·kh·kw, C_out]. The statistics H = XᵀX of a convolution are those of its patches. A
grouped convolution (group g, weight [C_out, C_in/g, kh, kw]) multiplies each group's patches by its
own columns: its rows are the patches of every group, so H is summed over the groups (one H shared
by all output channels: GPTQ's solution for a column depends on H only up to a scale, and the
groups of one layer see inputs of the same kind).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvPatches:
    """The geometry of one convolution (ONNX Conv attributes, 2-D)."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    auto_pad: str = "NOTSET"
    groups: int = 1

    @classmethod
    def of(cls, attrs: dict, kernel: tuple[int, int]) -> "ConvPatches":
        """From a Conv node's attributes (absent ones at their ONNX defaults)."""
        auto_pad = attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return cls(tuple(kernel), tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("pads", (0, 0, 0, 0))),
                   tuple(attrs.get("dilations", (1, 1))), auto_pad, int(attrs.get("group", 1)))

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) for an input of this size (auto_pad resolved)."""
        if self.auto_pad in ("NOTSET", "VALID"):
            return self.pads if self.auto_pad == "NOTSET" else (0, 0, 0, 0)
        before, after = [], []
        for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            before.append(small if self.auto_pad == "SAME_UPPER" else large)
            after.append(large if self.auto_pad == "SAME_UPPER" else small)
        return before[0], before[1], after[0], after[1]

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Every patch of x [N, C, H, W] as a row: [N·H_out·W_out, C·kh·kw] (grouped: the
        patches of each group of C/g channels, [N·g·H_out·W_out, C/g·kh·kw])."""
        if self.groups > 1:
            x = x.reshape(x.shape[0] * self.groups, x.shape[1] // self.groups, *x.shape[2:])
        top, left, bottom, right = self.padding(x.shape[2], x.shape[3])
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        windows = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
        windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, H_out, W_out, kh, kw]
        n, c, ho, wo = windows.shape[:4]
        return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
