"""The model as the passes see it: an onnx-graphsurgeon graph plus the ModelProto fields around it."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

# IR version 10 introduced int4/uint4 tensors; onnxruntime 1.31 refuses IR 14, onnx 1.23's
# default for new models, so lowerings raise the IR version only as far as they need.
IR_VERSION_INT4 = 10
_SHELL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


class ModelState:
    """A graph under rewrite. Passes edit ``graph`` in place; :meth:`to_onnx` rebuilds a ModelProto."""

    def __init__(self, model: onnx.ModelProto):
        self.graph: gs.Graph = gs.import_onnx(model)
        self.shell = onnx.ModelProto()
        for name in _SHELL_FIELDS:
            setattr(self.shell, name, getattr(model, name))
        self.shell.metadata_props.extend(model.metadata_props)
        self.min_ir_version = 0

    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def set_opset(self, version: int) -> None:
        self.graph.opset = version
        for imp in self.graph.import_domains or []:
            if imp.domain in ("", "ai.onnx"):
                imp.version = version

    def set_metadata(self, key: str, value: str) -> None:
        for prop in self.shell.metadata_props:
            if prop.key == key:
                prop.value = value
                return
        self.shell.metadata_props.add(key=key, value=value)

    def to_onnx(self) -> onnx.ModelProto:
        model = gs.export_onnx(self.graph, do_type_check=False)
        for name in _SHELL_FIELDS:
            setattr(model, name, getattr(self.shell, name))
        model.ir_version = max(self.shell.ir_version, self.min_ir_version)
        del model.metadata_props[:]
        model.metadata_props.extend(self.shell.metadata_props)
        return model
