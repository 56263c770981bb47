"""Input statistics of weight layers from real data: H = XᵀX of every MatMul/Gemm input.

The model is run in onnxruntime with the layers' input tensors exposed as extra outputs; each
batch's activations are folded into the running sums right away, so only H (K×K per layer) is
kept, never the activations. Features are the last axis; a convolution's rows are its input
patches (C·kh·kw features, numerics.patches); other 4-D (NCHW) inputs have channels as features
and pixels as rows. Rows where the mask
input is 0 (padding tokens) are left out. Nothing is written beside the user's model: the session
is built from memory (or, for models past protobuf's limit, from a private temporary folder).

:meth:`HessianPart.shrunk` pulls each H towards its diagonal, H' = (1 - a)·H + a·diag(H) with
a = K / (K + n) for n rows of K features: the correlations of n < K rows (a classifier after global
pooling has one row per image: EfficientNet-Lite0's fc gets 64 rows for K = 1280) are mostly
noise, and GPTQ fitted to them puts its error in the directions the calibration never saw, which
other inputs do see. With n ≫ K the shrinkage vanishes. MiniLM calibrated on KJV verses keeps its
KJV cosine and gains on movie reviews (0.9009 -> 0.9126 at --target-bpw 3, 0.9722 -> 0.9748 at 4).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from .blocks import run_blocks
from .errors import LrqError
from .evaluate import open_session
from .external import has_absolute_external
from .io import load_model
from .numerics.patches import ConvPatches
from .progress import progress
from .slicing import with_outputs


def shrunk(h: np.ndarray, rows: int) -> np.ndarray:
    """H from ``rows`` rows shrunk towards its diagonal by K / (K + rows) (see the module doc)."""
    a = h.shape[0] / (h.shape[0] + max(rows, 0))
    out = (1 - a) * h
    out[np.diag_indices_from(out)] += a * np.diag(h)
    return out


@dataclass(frozen=True)
class StoredHessian:
    """A streamed model's H in a file until a solve reads it (lrqgraph.blocks computes H block by
    block; holding every layer's at once would take more memory than the model), shrunk by
    ``rows`` (:func:`shrunk`) when read if set."""

    path: str
    rows: int | None = None

    def load(self) -> np.ndarray:
        h = np.load(self.path)
        return h if self.rows is None else shrunk(h, self.rows)


def load_hessian(h: "np.ndarray | StoredHessian | None") -> np.ndarray | None:
    """H as an array (read from its file when stored)."""
    return h.load() if isinstance(h, StoredHessian) else h


@dataclass(frozen=True)
class HessianPart:
    """Σ XᵀX per weight over some calibration rows, with the number of rows behind each. Weights
    reading one tensor share one array, here and in what the methods return."""
    h: dict[str, np.ndarray]
    rows: dict[str, int]

    def shrunk(self) -> dict[str, np.ndarray]:
        """Each H shrunk by its own row count (:func:`shrunk`)."""
        done: dict[int, np.ndarray] = {}
        for name, h in self.h.items():
            if id(h) not in done:
                done[id(h)] = replace(h, rows=self.rows[name]) if isinstance(h, StoredHessian) else \
                    shrunk(h, self.rows[name])
        return {name: done[id(h)] for name, h in self.h.items()}

    @staticmethod
    def total(parts: list[HessianPart]) -> HessianPart:
        """The statistics of every part's rows together: sums of H and of rows, not of shrunk H
        (shrinking each part by its own count would pull a small part almost to its diagonal)."""
        if len(parts) == 1:
            return parts[0]
        summed: dict[int, np.ndarray] = {}
        for name, h in parts[0].h.items():
            if id(h) not in summed:
                summed[id(h)] = sum(part.h[name] for part in parts)
        return HessianPart({name: summed[id(h)] for name, h in parts[0].h.items()},
                           {name: sum(part.rows[name] for part in parts) for name in parts[0].rows})


def collect_hessians(model: onnx.ModelProto | str | os.PathLike, inputs: dict[str, str],
                     batches: Iterable[dict[str, np.ndarray]], mask_input: str | None = None) -> dict[str, np.ndarray]:
    """H per weight for ``inputs`` = {weight name: activation tensor name}, summed over ``batches``.

    ``model`` is a ModelProto or a path (external data beside it is read). ``mask_input`` names a
    [batch, seq] feed whose zeros mark rows to ignore (e.g. an attention mask).
    """
    return collect_hessian_parts(model, inputs, [batches], mask_input)[0].h


def collect_hessian_parts(model: onnx.ModelProto | str | os.PathLike, inputs: dict[str, str],
                          parts: list[Iterable[dict[str, np.ndarray]]],
                          mask_input: str | None = None,
                          patches: dict[str, ConvPatches] | None = None,
                          store: str | os.PathLike | None = None) -> list[HessianPart]:
    """:func:`collect_hessians` for each part of the batches, from one session and one pass (the
    allocator's held-out statistics); every part holds at least one batch. ``patches`` gives the
    geometry of convolution weights: their H is over input patches (one image at a time). A
    streamed model (lrqgraph.external) runs block by block and its H go to files in ``store``."""
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    names = sorted(set(inputs.values()))
    patches = patches or {}
    keys = {weight: (tensor, patches.get(weight)) for weight, tensor in inputs.items()}
    if has_absolute_external(proto):
        if len(parts) != 1:
            raise LrqError("an allocation's held-out calibration statistics are not computed for streamed models "
                           "yet; raise --stream-above above the model's size to load it whole")
        return [_blockwise_part(proto, keys, [feed for batches in parts for feed in batches], mask_input, store)]
    sess = open_session(with_outputs(proto, names))
    out = []
    for batches in parts:
        sums = _Sums()
        for feed in progress(list(batches), "calibrate: H", every_s=10.0, unit="run"):
            acts = dict(zip(names, sess.run(names, feed)))
            keep = None if mask_input is None else feed[mask_input].reshape(-1).astype(bool)
            for key in dict.fromkeys(keys.values()):
                sums.add(key, acts[key[0]], keep)
        out.append(HessianPart({weight: sums.total(key) for weight, key in keys.items()},
                               {weight: sums.rows[key] for weight, key in keys.items()}))
    return out


class _Sums:
    """Σ rowsᵀ·rows per (tensor, geometry) key over the batches. Rows wait until about half an
    input width of them is pending, then go in as one product: a K×K update per small batch (one
    text line of a cached decoder is a batch) costs the K² memory traffic of the update for a few
    dozen rows, 18 ms per 2048-wide layer. The pending rows stay in the activations' type and
    hold at most about a quarter of H's bytes."""

    MIN_ROWS = 256

    def __init__(self) -> None:
        self.sums: dict[tuple, np.ndarray] = {}
        self.rows: dict[tuple, int] = {}
        self._pending: dict[tuple, list[np.ndarray]] = {}

    def add(self, key: tuple, x: np.ndarray, keep: np.ndarray | None) -> None:
        geometry = key[1]
        if geometry is not None:  # convolution patches: summed image by image as they come
            h, n = _products(x, geometry, keep)
            self.sums[key], self.rows[key] = self.sums.get(key, 0) + h, self.rows.get(key, 0) + n
            return
        rows = _rows(x, keep)
        pending = self._pending.setdefault(key, [])
        pending.append(rows)
        self.rows[key] = self.rows.get(key, 0) + len(rows)
        if sum(len(r) for r in pending) >= max(self.MIN_ROWS, rows.shape[1] // 2):
            self._flush(key)

    def _flush(self, key: tuple) -> None:
        pending = self._pending.pop(key, [])
        if pending:
            stacked = np.concatenate(pending).astype(np.float64)
            self.sums[key] = self.sums.get(key, 0) + stacked.T @ stacked

    def total(self, key: tuple) -> np.ndarray:
        self._flush(key)
        return self.sums[key]

    def pop(self, key: tuple) -> np.ndarray:
        self._flush(key)
        return self.sums.pop(key)


def _blockwise_part(model: onnx.ModelProto, keys: dict[str, tuple], feeds: list[dict[str, np.ndarray]],
                    mask_input: str | None, store: str | os.PathLike | None) -> HessianPart:
    """H of a streamed model, block by block (lrqgraph.blocks): each input tensor's H is summed as
    its block runs and written to ``store`` once every feed went through that block."""
    if store is None:
        raise ValueError("a streamed model's H needs a folder to be stored in")
    sums = _Sums()
    stored: dict[tuple, StoredHessian] = {}
    by_tensor: dict[str, list[tuple]] = {}
    for key in dict.fromkeys(keys.values()):
        by_tensor.setdefault(key[0], []).append(key)

    def tap(i: int, name: str, value: np.ndarray) -> None:
        keep = None if mask_input is None else feeds[i][mask_input].reshape(-1).astype(bool)
        for key in by_tensor[name]:
            sums.add(key, value, keep)

    def done(names: list[str]) -> None:
        for key in (k for name in names for k in by_tensor[name]):
            path = Path(store) / f"h{len(stored)}.npy"
            np.save(path, sums.pop(key))
            stored[key] = StoredHessian(str(path))

    run_blocks(model, feeds, what="calibrate", taps=by_tensor, on_tap=tap, on_block=done)
    return HessianPart({weight: stored[key] for weight, key in keys.items()},
                       {weight: sums.rows[key] for weight, key in keys.items()})


def _products(x: np.ndarray, geometry: ConvPatches | None, keep: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(Σ rowsᵀ·rows, number of rows) of one batch's activations: patches of a convolution's input,
    pixels of another 4-D (NCHW) input (samples of a C-dimensional input), else rows of the last axis."""
    if geometry is not None:
        total, count = 0, 0
        for image in x:  # one image's patches at a time: never every patch of the batch at once
            rows = geometry.rows(image[None].astype(np.float64))
            total, count = total + rows.T @ rows, count + len(rows)
        return total, count
    rows = _rows(x, keep).astype(np.float64)
    return rows.T @ rows, len(rows)


def _rows(x: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """The samples of a layer input as rows: pixels of a 4-D (NCHW) input, else rows of the last
    axis; only the ``keep`` ones (positions the mask keeps) when given."""
    if x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    rows = x.reshape(-1, x.shape[-1])
    if keep is not None and len(keep) == len(rows):
        rows = rows[keep]
    return rows
