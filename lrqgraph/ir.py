"""lrqgraph inside onnx_ir flows: the pipeline as an ``onnx_ir`` pass.

``torch.onnx.export(..., dynamo=True)`` returns an ``ONNXProgram`` whose ``.model`` is an
``onnx_ir.Model``; post-export passes plug into ``onnx_ir.passes``. :class:`OptimizePass` is one:
it runs lrqgraph's pipeline (the default, or ``passes``) on the model in memory and returns a new
model (a functional pass: the input is not modified). After it runs, ``report`` holds the
pipeline's report (what ``lrqgraph.run`` returns beside the model)::

    prog = torch.onnx.export(module, args, dynamo=True)
    prog.model = lrqgraph.ir.OptimizePass(OptimizeConfig(calib="calib.npz"))(prog.model).model
    prog.save("model.onnx")
"""
from __future__ import annotations

from typing import Any

import onnx_ir as ir

from .api import run
from .config import OptimizeConfig


class OptimizePass(ir.passes.FunctionalPass):
    """lrqgraph's pipeline as an ``onnx_ir`` functional pass (usable in ``onnx_ir.passes.PassManager``)."""

    def __init__(self, config: OptimizeConfig | None = None, passes: str | None = None) -> None:
        super().__init__()
        self.config = config or OptimizeConfig()
        self.passes = passes
        self.report: dict[str, Any] | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        proto = ir.serde.serialize_model(model)
        result = run(proto, self.config, self.passes)
        self.report = result.report
        # a functional pass hands back a new model, changed or not (run returns its input unchanged)
        return ir.passes.PassResult(ir.serde.deserialize_model(result.model), modified=result.model is not proto)


def optimize(model: ir.Model, config: OptimizeConfig | None = None, passes: str | None = None) -> ir.Model:
    """The optimized copy of an ``onnx_ir.Model`` (:class:`OptimizePass` as a function)."""
    return OptimizePass(config, passes)(model).model
