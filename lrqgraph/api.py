"""The Python entry points: ``optimize(model, config)`` and ``run`` (which also returns the report).

This is the top layer: it imports the built-in passes (which registers them) and assembles the
report from the pipeline's typed results.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

import lrqgraph.passes  # noqa: F401  (registers the built-in passes and analyses)
from lrqgraph.passes.factorize import describe_plan
from lrqgraph.passes.verify import compare_outputs

from .config import OptimizeConfig, VerifyConfig, describe_config
from .errors import LrqError
from .executor import Executor
from .io import load_model, tensor_bytes, uses_external_data
from .model import ModelState
from .passmanager import Context, Pass, PassManager
from .report import build_report
from .version import __version__


def default_pipeline(config: OptimizeConfig) -> str:
    calibrate = "calibrate," if config.calib else ""
    plan = "allocate" if config.allocate.active else "factorize"
    return f"discover,{calibrate}{plan},lower({config.lowering}),cleanup,verify"


@dataclass
class Result:
    model: onnx.ModelProto
    report: dict[str, Any]
    rewritten: int = 0         # layers rewritten; 0 means ``model`` is the input, unchanged


def run(model: onnx.ModelProto | str | os.PathLike, config: OptimizeConfig | None = None,
        passes: str | list[Pass] | None = None) -> Result:
    """Run a pipeline (default: discover, factorize, lower, cleanup, verify) and build the report.

    ``model`` is a ModelProto or a path; the input is never modified. When no layer is rewritten,
    the result's model is the input itself and the report says why.
    """
    config = config or OptimizeConfig()
    original: Any = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    proto, state = _open(model, config)
    manager = PassManager(passes if passes is not None else default_pipeline(config),
                          check_each=config.check_each_pass)
    with Executor(config.executor) as executor:
        ctx = Context(state, config, original=original, executor=executor)
        manager.run(ctx)  # which drops the per-layer checkpoints unless interrupted
    rewritten = len(ctx.lowered)
    if rewritten or _changed(ctx):
        ctx.model.set_metadata("lrqgraph.pipeline", repr(manager))
        ctx.model.set_metadata("lrqgraph.config", json.dumps(describe_config(config), sort_keys=True, default=str))
        result = ctx.model.to_onnx()
    else:
        result = proto
    report = build_report(ctx, proto, result, pipeline=repr(manager), version=__version__)
    return Result(result, report, rewritten)


def _open(model: onnx.ModelProto | str | os.PathLike, config: OptimizeConfig) -> tuple[onnx.ModelProto, ModelState]:
    """The input as loaded and as the passes see it; a path past ``config.stream_above`` is
    streamed (its external data stays in its files)."""
    if not isinstance(model, (str, os.PathLike)):
        return model, ModelState(model)
    proto = load_model(model, stream_above=config.stream_above)
    streamed = uses_external_data(proto)  # still external: not loaded
    if streamed and config.allocate.active:
        raise LrqError(f"{model}: its {tensor_bytes(proto) / 2**30:.1f} GiB of weights are streamed "
                       f"(--stream-above {config.stream_above}), and the allocation (--target-*, --min-cosine, "
                       f"--max-kl, --labels) does not run on streamed models yet; raise --stream-above to load "
                       f"the model whole, or use --bits/--method")
    return proto, ModelState(proto, external_dir=Path(model).parent if streamed else None, source=model)


def _changed(ctx: Context) -> bool:
    """Whether a pass other than cleanup modified the graph (e.g. relower), without lowering layers."""
    return any(t.modified and not t.name.startswith("cleanup") for t in ctx.timings)


def optimize(model: onnx.ModelProto | str | os.PathLike, config: OptimizeConfig | None = None,
             passes: str | list[Pass] | None = None) -> onnx.ModelProto:
    """Rewrite ``model`` per ``config`` and return the new ModelProto (torchao's ``quantize_`` shape)."""
    return run(model, config, passes).model


def inspect_layers(model: onnx.ModelProto | str | os.PathLike,
                   config: OptimizeConfig | None = None) -> list[dict[str, Any]]:
    """Per layer: name, op, shape, params, the action optimize would take and why (no rewriting)."""
    config = config or OptimizeConfig()
    ctx = Context(_open(model, config)[1], config, original=model)
    rows = []
    for layer in ctx.analysis("layers"):
        rewrite, why = layer.rewrite, layer.reason
        if rewrite:
            rewrite, why = describe_plan(config.factorize.for_layer(layer.name, layer.weight), layer)
            if len(layer.nodes) > 1:
                why += f" (shared by {len(layer.nodes)} nodes)"
        rows.append({"name": layer.name, "op": layer.op, "shape": list(layer.shape), "params": layer.params,
                     "action": "rewrite" if rewrite else "keep", "why": why})
    return rows


def compare_models(reference: str | os.PathLike, candidate: str | os.PathLike,
                   config: VerifyConfig | None = None) -> dict[str, Any]:
    """Run two models with the same signature on the same inputs and compare their outputs."""
    config = config or VerifyConfig()
    ref, cand = load_model(reference), load_model(candidate)
    return compare_outputs(os.fspath(reference), os.fspath(candidate), cand, ModelState(ref).graph, config).as_report()


def optimize_folder(folder: str | os.PathLike, output: str | os.PathLike, config: OptimizeConfig | None = None,
                    passes: str | list[Pass] | None = None) -> Result:
    """An onnxruntime-genai model folder in, one out (lrqgraph.genai): the model its
    genai_config.json names is rewritten (``config``'s open fields, or all of it when None, as
    :func:`lrqgraph.genai.deploy_config` sets them for decoders)
    and ``output`` is written whole or not at all, ready for ``onnxruntime_genai.Model``."""
    from . import genai
    from .io import Outputs

    source = genai.open_folder(folder)
    genai.check_output_folder(output, source)
    result = run(source.model_file, genai.deploy_config(config, source), passes)
    with Outputs() as outputs:
        genai.write_folder(source, result.model, output, outputs, library=genai.custom_ops_library(result.model))
        outputs.commit()
    return result
