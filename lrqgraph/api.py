"""The Python entry points: ``optimize(model, config)`` and ``run`` (which also returns the report)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from . import __version__
from .config import OptimizeConfig, VerifyConfig, as_dict
from .io import load_model, tensor_bytes
from .model import ModelState
from .passmanager import Context, Pass, PassManager


def default_pipeline(config: OptimizeConfig) -> str:
    calibrate = "calibrate," if config.calib else ""
    plan = "allocate" if config.allocate.active else "factorize"
    return f"discover,{calibrate}{plan},lower({config.lowering}),cleanup,verify"


@dataclass
class Result:
    model: onnx.ModelProto
    report: dict[str, Any]


def run(model: onnx.ModelProto | str | os.PathLike, config: OptimizeConfig | None = None,
        passes: str | list[Pass] | None = None) -> Result:
    """Run a pipeline (default: discover, factorize, lower, cleanup, verify) and build the report.

    ``model`` is a ModelProto or a path; the input is never modified.
    """
    config = config or OptimizeConfig()
    if isinstance(model, (str, os.PathLike)):
        original: Any = os.fspath(model)
        proto = load_model(model)
    else:
        original = proto = model
    manager = PassManager(passes if passes is not None else default_pipeline(config),
                          check_each=config.check_each_pass)
    ctx = Context(ModelState(proto), config, original=original)
    manager.run(ctx)
    ctx.model.set_metadata("lrqgraph.pipeline", repr(manager))
    ctx.model.set_metadata("lrqgraph.config", json.dumps(as_dict(config), sort_keys=True, default=str))
    result = ctx.model.to_onnx()
    ctx.report["model"] = summarize(proto, result, ctx.report["layers"])
    ctx.report["version"] = __version__
    ctx.report["pipeline"] = repr(manager)
    ctx.report.setdefault("calibration", f"H = XᵀX from {config.calib}" if config.calib
                          else "none: all methods ran data-free")
    ctx.report["layers"] = list(ctx.report["layers"].values())
    return Result(result, ctx.report)


def optimize(model: onnx.ModelProto | str | os.PathLike, config: OptimizeConfig | None = None,
             passes: str | list[Pass] | None = None) -> onnx.ModelProto:
    """Rewrite ``model`` per ``config`` and return the new ModelProto (torchao's ``quantize_`` shape)."""
    return run(model, config, passes).model


def inspect_layers(model: onnx.ModelProto | str | os.PathLike,
                   config: OptimizeConfig | None = None) -> list[dict[str, Any]]:
    """Per layer: name, op, shape, params, the action optimize would take and why (no rewriting)."""
    from lrqgraph.passes.factorize import describe_plan

    config = config or OptimizeConfig()
    proto = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    ctx = Context(ModelState(proto), config, original=model)
    rows = []
    for layer in ctx.analysis("layers"):
        rewrite, why = layer.rewrite, layer.reason
        if rewrite:
            cfg = config.factorize.for_layer(layer.name, layer.weight)
            rewrite, why = describe_plan(cfg, *layer.shape, np.dtype(layer.dtype).itemsize * 8)
            if len(layer.nodes) > 1:
                why += f" (shared by {len(layer.nodes)} nodes)"
        rows.append({"name": layer.name, "op": layer.op, "shape": list(layer.shape), "params": layer.params,
                     "action": "rewrite" if rewrite else "keep", "why": why})
    return rows


def compare_models(reference: str | os.PathLike, candidate: str | os.PathLike,
                   config: VerifyConfig | None = None) -> dict[str, Any]:
    """Run two models with the same signature on the same inputs and compare their outputs."""
    from lrqgraph.passes.verify import compare_outputs

    config = config or VerifyConfig()
    ref, cand = load_model(reference), load_model(candidate)
    return compare_outputs(os.fspath(reference), os.fspath(candidate), cand, ModelState(ref).graph, config)


def _float_params(model: onnx.ModelProto) -> int:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)


def summarize(before: onnx.ModelProto, after: onnx.ModelProto, layers: dict[str, dict]) -> dict[str, Any]:
    rewritten = [e for e in layers.values() if e.get("action") == "rewrite" and "stored_bytes" in e]
    params = sum(e["params"] for e in rewritten)
    stored = sum(e["stored_bytes"] for e in rewritten)
    original_params = _float_params(before)
    bytes_after = tensor_bytes(after)
    return {
        "weight_bytes_before": tensor_bytes(before),
        "weight_bytes_after": bytes_after,
        "layers_rewritten": len(rewritten),
        "params_rewritten": params,
        # every stored byte of the rewritten layers' codes, scales and zero points
        "rewritten_bpw": round(stored * 8 / params, 4) if params else None,
        # all initializer bytes of the output over the float parameters of the input
        "model_bpw": round(bytes_after * 8 / original_params, 4) if original_params else None,
    }
