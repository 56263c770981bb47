"""Between torch modules and the ONNX pipeline: export, calibration feeds, and which ONNX layer
each nn.Linear / nn.Conv2d became.

Layers are matched by value first: exporters rename weights (torch.onnx's dynamo exporter folds a
Linear's transpose into a new initializer ``val_0``), but the layer's effective matrix W[K, N]
(discover's ``weight_matrix``) is the module's weightᵀ (a Conv's weight reshaped to
[C_out, C_in/g·kh·kw], transposed) byte for byte, whatever the exporter called it. A Conv followed
by a BatchNorm is exported with the normalization folded into its weight (W·γ/σ per output
channel) under the conv's own name: those are matched by name and that per-column scale.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from lrqgraph.errors import LrqError

FilterFn = Callable[[nn.Module, str], bool]


def to_onnx(module: nn.Module, args: tuple, dynamic_shapes: Any = None, **kwargs: Any) -> onnx.ModelProto:
    """``module`` exported by torch.onnx (dynamo); every input's first axis dynamic unless
    ``dynamic_shapes`` says otherwise."""
    if dynamic_shapes is None:
        dynamic_shapes = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None
                               for a in args)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False, **kwargs)
    return program.model_proto


def matrix_key(w: np.ndarray) -> str:
    w = np.ascontiguousarray(w, np.float32)
    return hashlib.sha256(f"{w.shape}".encode() + w.tobytes()).hexdigest()


def module_matrix(module: nn.Module) -> np.ndarray:
    """The effective W[K, N] of an nn.Linear, nn.Conv2d or nn.Embedding (its table transposed, as
    discover lays out a Gather table), as the ONNX layer's weight_matrix."""
    w = module.weight.detach().to(torch.float32).cpu().numpy()
    return w.reshape(w.shape[0], -1).T


def compressible(module: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """{qualified name: module} of the nn.Linear, nn.Conv2d and nn.Embedding (without max_norm,
    which rewrites its table) that ``filter_fn`` accepts."""
    def swappable(m: nn.Module) -> bool:
        return isinstance(m, (nn.Linear, nn.Conv2d)) or type(m) is nn.Embedding and m.max_norm is None
    return {fqn: m for fqn, m in module.named_modules() if swappable(m) and (filter_fn is None or filter_fn(m, fqn))}


@dataclass(frozen=True)
class Owner:
    """The modules holding one ONNX layer's matrix: W_onnx = W_module · diag(column_scale)
    (None: equal). A scale comes from a normalization the exporter folded into the weight
    (Conv + BatchNorm: W·γ/σ per output channel, the initializer keeping the conv's name)."""
    fqns: list[str]
    column_scale: np.ndarray | None = None


def owners(layers: Iterable, modules: dict[str, nn.Module]) -> dict[str, Owner]:
    """{ONNX weight name: its Owner}: by value, else by name with a per-column scale (folded
    normalizations); layers neither finds have no module torch could swap."""
    by_key: dict[str, list[str]] = {}
    for fqn, m in modules.items():
        by_key.setdefault(matrix_key(module_matrix(m)), []).append(fqn)
    out = {}
    for layer in layers:
        if not layer.shape or len(layer.shape) != 2 or layer.source is None:
            continue
        w = layer.weight_matrix()
        fqns = by_key.get(matrix_key(w))
        if fqns:
            out[layer.weight] = Owner(fqns)
            continue
        fqn = layer.weight.removesuffix(".weight")
        if layer.weight.endswith(".weight") and fqn in modules:
            scale = column_scale(w, module_matrix(modules[fqn]))
            if scale is not None:
                out[layer.weight] = Owner([fqn], scale)
    return out


def column_scale(w: np.ndarray, base: np.ndarray, tol: float = 1e-5) -> np.ndarray | None:
    """c with w ≈ base · diag(c) to ``tol`` of w's largest entry, every c_j away from 0; else None."""
    if w.shape != base.shape:
        return None
    w64, b64 = w.astype(np.float64), base.astype(np.float64)
    norms = (b64 * b64).sum(0)
    c = np.where(norms > 0, (w64 * b64).sum(0) / np.where(norms > 0, norms, 1), 1.0)
    if np.abs(c).min() < 1e-12 or np.abs(w64 - b64 * c).max() > tol * max(np.abs(w64).max(), 1e-30):
        return None
    return c


def exclusion(weights: Iterable[str]) -> tuple[str, ...]:
    """SelectConfig.exclude patterns that match exactly these weight names."""
    return tuple(f"^{re.escape(w)}$" for w in sorted(weights))


def write_calibration(calib: Any, input_names: list[str], folder: str | os.PathLike) -> str:
    """Calibration inputs as a folder of .npz files (one per batch, in order), the form
    lrqgraph.calib reads. ``calib``: a tensor (the model's only input), a list of input tuples
    (or of dicts by input name), or an iterable of batches such as a DataLoader."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batches = [calib] if isinstance(calib, torch.Tensor) else calib
    count = 0
    for i, batch in enumerate(batches):
        np.savez(folder / f"{i:06d}.npz", **_feed(batch, input_names))
        count += 1
    if not count:
        raise LrqError("calib: no calibration batches (an empty list or DataLoader)")
    return str(folder)


def _feed(batch: Any, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(batch, dict):
        unknown = sorted(set(batch) - set(names))
        if unknown:
            raise LrqError(f"calib: batch keys {unknown} are not inputs of the model ({', '.join(names)})")
        items = batch.items()
    else:
        values = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
        if len(values) != len(names):
            raise LrqError(f"calib: a batch has {len(values)} tensors, the model takes {len(names)} inputs "
                           f"({', '.join(names)})")
        items = zip(names, values)
    return {name: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for name, v in items}
