"""The torch way in: compress the nn.Linear / nn.Conv2d / nn.Embedding of a torch module, and export
the result to ONNX.

:func:`compress` exports the module (torch.onnx, dynamo), lets the ONNX pipeline decide every
layer (discover, calibrate, allocate or factorize: the same rules and numerics as
``lrqgraph optimize``), and returns a copy of the module whose chosen layers are
:class:`CompressedLinear` / :class:`CompressedConv2d` / :class:`CompressedEmbedding`, holding the
packed codes, scales and factors and computing with them in torch (CPU or CUDA). :func:`export`
writes such a module as ONNX with those layers lowered to the same subgraphs as the ONNX path
(``ort``, ``std`` or ``lrq``), from the very representations the module holds (nothing is fitted
again).

    small = lrqgraph.torch.compress(model, (x,), target_bpw=4, calib=[(x1,), (x2,)])
    lrqgraph.torch.export(small, (x,), "small.onnx", lowering="ort")
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import lrqgraph.passes  # noqa: F401  (registers the built-in passes and analyses)
from lrqgraph.config import AllocateConfig, FactorizeConfig, OptimizeConfig, SelectConfig
from lrqgraph.errors import LrqError
from lrqgraph.io import save_model
from lrqgraph.model import ModelState
from lrqgraph.passmanager import Context, PassManager
from lrqgraph.plan import use_plans

from .bridge import FilterFn, compressible, exclusion, owners, to_onnx, write_calibration
from .modules import CompressedConv2d, CompressedEmbedding, CompressedLinear, CompressedMatrix, CompressedWeight

__all__ = ["CompressedConv2d", "CompressedEmbedding", "CompressedLinear", "CompressedMatrix", "compress", "export"]


def compress(module: nn.Module, example_inputs: Any, *, target_bpw: float | None = None,
             target_size: int | None = None, method: str | None = None, calib: Any = None,
             filter_fn: FilterFn | None = None, config: OptimizeConfig | None = None,
             dynamic_shapes: Any = None) -> nn.Module:
    """A compressed copy of ``module`` (plain or a ``torch.fx.GraphModule``; the input is not modified).

    ``example_inputs``: a tensor or a tuple of positional inputs (their first axis is exported as
    dynamic). ``target_bpw`` / ``target_size`` (bytes of the exported model) ask for an
    allocation, ``method`` for one method on every layer (e.g. "gptq", "qlr"); ``calib`` (a tensor,
    a list of input tuples, or a DataLoader) gives real inputs for the statistics. ``filter_fn(module,
    qualified_name)`` keeps the modules it returns False for, and they do not count in the budget.
    ``config`` sets everything else as for ``lrqgraph.optimize``; ``dynamic_shapes`` goes to
    torch.onnx.export (calibration batches of several sequence lengths need that axis dynamic)."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    config = _config(config or OptimizeConfig(), target_bpw, target_size, method)
    out = copy.deepcopy(module).eval()
    proto = to_onnx(out, args, dynamic_shapes)
    candidates = compressible(out, filter_fn)
    with tempfile.TemporaryDirectory(prefix="lrqgraph-calib-") as tmp:
        if calib is not None:
            names = [i.name for i in proto.graph.input]
            config = dataclasses.replace(config, calib=write_calibration(calib, names, tmp))
        layers = Context(ModelState(proto), config, original=proto).analysis("layers")
        owned = owners(layers, candidates)
        # layers torch cannot swap (no selected Linear, Conv2d or Embedding) stay out of the decision and its budget
        others = [layer.weight for layer in layers if layer.rewrite and layer.weight not in owned]
        if others:
            select = dataclasses.replace(config.select, exclude=config.select.exclude + exclusion(others))
            config = dataclasses.replace(config, select=select)
        ctx = Context(ModelState(proto), config, original=proto)
        PassManager(_decide_pipeline(config)).run(ctx)
    for weight, plan in ctx.plans.items():
        if plan.rep is None:
            continue
        owner = owned[weight]
        matrix = CompressedMatrix(plan.rep, owner.column_scale)  # tied modules share it, as they shared the weight
        for fqn in owner.fqns:
            _compress_module(out, fqn, matrix)
    return out


def export(module: nn.Module, args: Any, path: str | os.PathLike, *, lowering: str = "ort",
           accuracy_level: int | None = None, dynamic_shapes: Any = None, **kwargs: Any) -> Path:
    """Write ``module`` (from :func:`compress`) to ``path`` as ONNX, its compressed layers lowered
    as the ONNX path lowers them (``lowering``: ort, std or lrq). ``dynamic_shapes`` and ``kwargs``
    go to torch.onnx.export (default: every input's first axis dynamic). Written atomically."""
    args = args if isinstance(args, tuple) else (args,)
    plain = copy.deepcopy(module).eval()
    compressed: dict[str, CompressedMatrix] = {}
    weights = _FloatWeights()
    for fqn, m in list(plain.named_modules()):
        if isinstance(m, (CompressedLinear, CompressedConv2d, CompressedEmbedding)):
            compressed[fqn] = m.matrix
            _replace(plain, fqn, _float_module(m, weights))
        elif isinstance(getattr(m, "lrq_matrix", None), CompressedMatrix):
            compressed[fqn] = m.lrq_matrix
            CompressedWeight.detach(m, weights(m.lrq_matrix, m.lrq_weight_shape))
    proto = to_onnx(plain, args, dynamic_shapes, **kwargs)
    # every layer a candidate, so that discover ties a table to its lm_head as the deciding run did
    select = SelectConfig(embeddings=True, keep_output_layers=False, min_params=0)
    config = OptimizeConfig(lowering=lowering, accuracy_level=accuracy_level, select=select)
    ctx = Context(ModelState(proto), config, original=proto)
    # the exporter folds a following BatchNorm into the float weight again: matched by name and scale
    found = owners(ctx.analysis("layers"), {fqn: plain.get_submodule(fqn) for fqn in compressed})
    chosen = {weight: compressed[owner.fqns[0]].representation for weight, owner in found.items()}
    missing = sorted(set(compressed) - {fqn for owner in found.values() for fqn in owner.fqns})
    if missing:
        raise LrqError(f"export: the exported graph has no MatMul/Gemm/Conv layer for {', '.join(missing)}")
    use_plans(ctx, chosen)
    PassManager(f"lower({lowering}),cleanup").run(ctx)
    return save_model(ctx.model.to_onnx(), path)


def _config(config: OptimizeConfig, target_bpw: float | None, target_size: int | None,
            method: str | None) -> OptimizeConfig:
    if target_bpw is not None or target_size is not None:
        config = dataclasses.replace(config, allocate=dataclasses.replace(
            config.allocate if config.allocate.active else AllocateConfig(), target_bpw=target_bpw,
            target_size=target_size))
    if method is not None:
        config = dataclasses.replace(config, factorize=FactorizeConfig(method))
    return config


def _decide_pipeline(config: OptimizeConfig) -> str:
    calibrate = "calibrate," if config.calib else ""
    return f"discover,{calibrate}{'allocate' if config.allocate.active else 'factorize'}"


def _compress_module(root: nn.Module, fqn: str, matrix: CompressedMatrix) -> None:
    original = root.get_submodule(fqn)
    if type(original) is nn.Conv2d:
        _replace(root, fqn, CompressedConv2d(matrix, original))
    elif type(original) is nn.Embedding:
        _replace(root, fqn, CompressedEmbedding(matrix, original))
    elif type(original) is nn.Linear:
        _replace(root, fqn, CompressedLinear(matrix, original.bias))
    else:  # a subclass with its own forward keeps it
        CompressedWeight.attach(original, matrix)


class _FloatWeights:
    """One float Parameter per (compressed matrix, layout): modules that share a matrix (a tied
    embedding and lm_head) share their float weight, so the export keeps one initializer and
    the lowering stores the table once, as the ONNX path does."""

    def __init__(self) -> None:
        self.made: dict[tuple, nn.Parameter] = {}

    def __call__(self, matrix: CompressedMatrix, shape: tuple[int, ...]) -> nn.Parameter:
        key = (id(matrix), tuple(shape))
        if key not in self.made:
            w = torch.from_numpy(np.ascontiguousarray(_float_matrix(matrix).T)).reshape(shape)
            self.made[key] = nn.Parameter(w, requires_grad=False)
        return self.made[key]


def _float_module(m: nn.Module, weights: _FloatWeights) -> nn.Module:
    """A plain module computing with the compressed module's matrix (what the exporter traces and
    folds normalizations into, as it did for the original; lowering then replaces it)."""
    if isinstance(m, CompressedEmbedding):
        out = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx)
        shape = (m.num_embeddings, m.embedding_dim)
    elif isinstance(m, CompressedConv2d):
        out = nn.Conv2d(m.kernel[1] * m.groups, m.kernel[0], m.kernel[2:], m.stride, m.padding, m.dilation,
                        m.groups, bias=m.bias is not None)
        shape = m.kernel
    else:
        out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        shape = (m.out_features, m.in_features)
    out.weight = weights(m.matrix, shape)
    if getattr(m, "bias", None) is not None:
        out.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    return out


def _float_matrix(matrix: CompressedMatrix) -> np.ndarray:
    """The module's W[K, N] in float32: Ŵ, over the folded normalization's scale if any."""
    w_hat = matrix.representation.dequantize()
    scale = matrix.column_scale
    return np.asarray(w_hat if scale is None else w_hat / scale.astype(np.float32), np.float32)


def _replace(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)
