"""The model as the passes see it: an onnx-graphsurgeon graph plus the ModelProto fields around it."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import external
from .graph import Namer
from .numerics import Representation
from .plan import SpilledRepresentation

# IR version 10 introduced int4/uint4 tensors; onnxruntime 1.31 refuses IR 14, onnx 1.23's
# default for new models, so lowerings raise the IR version only as far as they need.
IR_VERSION_INT4 = 10
_SHELL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


class ModelState:
    """A graph under rewrite. Passes edit ``graph`` in place; :meth:`to_onnx` rebuilds a ModelProto.

    With ``external_dir`` (the folder of a model loaded without its external data) the model is
    *streamed*: its external constants stay in their files (lrqgraph.external), and constants a
    rewrite makes go to a spill file as each layer is lowered (:meth:`spill`).
    """

    def __init__(self, model: onnx.ModelProto, external_dir: str | os.PathLike | None = None,
                 source: str | os.PathLike = "model"):
        self.graph: gs.Graph = gs.import_onnx(model)
        self.streaming = external_dir is not None
        self._spill: external.Spill | None = None
        if self.streaming:
            external.attach(self.graph, external_dir, source)
        self.shell = onnx.ModelProto()
        for name in _SHELL_FIELDS:
            setattr(self.shell, name, getattr(model, name))
        self.shell.metadata_props.extend(model.metadata_props)
        self.shell.graph.input.extend(model.graph.input)  # the signature, for calibration data
        self.shell.graph.initializer.extend(onnx.TensorProto(name=t.name) for t in model.graph.initializer)
        self.structure_bytes = structure_bytes(model)
        self.min_ir_version = 0
        self._namer: Namer | None = None
        # values lowerings emit once and share between layers (a rotated input read by q, k and v)
        self.shared_values: dict = {}

    def adopt_spill(self, other: "ModelState") -> None:
        """Keep ``other``'s spill file alive as this state's (a converted copy of the same model)."""
        self._spill = self._spill or other._spill

    def spill_representation(self, rep: Representation | None, path: str | os.PathLike | None = None
                             ) -> "Representation | SpilledRepresentation | None":
        """``rep`` written to ``path`` (default: a new file of the spill folder) as a
        SpilledRepresentation on a streamed model; as is otherwise."""
        if not self.streaming or rep is None:
            return rep
        return SpilledRepresentation.write(rep, path or self._spill_file().new_path("rep.pkl"))

    def spill_folder(self) -> str:
        """The temporary folder of this streamed model's spill file, for other per-layer data."""
        return str(self._spill_file().folder)

    def _spill_file(self) -> external.Spill:
        if self._spill is None:
            self._spill = external.Spill()
        return self._spill

    def spill(self, constants: list[gs.Constant]) -> None:
        """Move the given new constants out of memory (streamed models only; a no-op otherwise)."""
        if self.streaming:
            external.spill_constants(constants, self._spill_file())

    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def set_metadata(self, key: str, value: str) -> None:
        for prop in self.shell.metadata_props:
            if prop.key == key:
                prop.value = value
                return
        self.shell.metadata_props.add(key=key, value=value)

    def unique_name(self, base: str) -> str:
        """A node or tensor name no part of the graph uses yet (reserved once returned)."""
        if self._namer is None:
            self._namer = Namer(self.graph)
        return self._namer(base)

    def constant_bytes(self) -> int:
        """Bytes of constant data: initializers and Constant-node values of the main graph."""
        seen: set[int] = set()
        total = 0
        for t in self.graph.tensors().values():
            value = t if isinstance(t, gs.Constant) else None
            if value is None and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
                value = t.inputs[0].attrs.get("value")
            if isinstance(value, gs.Constant) and id(value) not in seen:
                seen.add(id(value))
                total += _nbytes(value)
        return total

    def signature(self) -> onnx.ModelProto:
        """A weightless ModelProto with the graph inputs (what calibration data must match)."""
        return self.shell

    def digest(self) -> str:
        """SHA-256 of the graph and every weight, hashed node by node and tensor by tensor (no
        whole-model serialization, so models past protobuf's 2 GB limit hash too)."""
        h = hashlib.sha256()
        _hash_graph(h, self.graph)
        return h.hexdigest()

    def identity(self) -> str:
        """:meth:`digest`, except that a streamed weight counts by its file, range, file size and
        modification time instead of its bytes: a key for checkpoints that does not read a model
        larger than memory once more."""
        h = hashlib.sha256()
        _hash_graph(h, self.graph, by_reference=True)
        return h.hexdigest()

    def to_onnx(self) -> onnx.ModelProto:
        model = gs.export_onnx(self.graph, do_type_check=False)
        for name in _SHELL_FIELDS:
            setattr(model, name, getattr(self.shell, name))
        model.ir_version = max(self.shell.ir_version, self.min_ir_version)
        del model.metadata_props[:]
        model.metadata_props.extend(self.shell.metadata_props)
        return model


def structure_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the serialized model besides its constants' data: nodes, names, shapes, the
    tensors' headers (what --target-size pays for beyond the weights)."""
    constants = sum(len(a.t.raw_data) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute)
    headers = sum(t.ByteSize() - len(t.raw_data) for t in model.graph.initializer)
    graph = model.graph
    rest = sum(m.ByteSize() for field in (graph.node, graph.input, graph.output, graph.value_info) for m in field)
    rest += sum(m.ByteSize() for field in (model.opset_import, model.metadata_props, model.functions) for m in field)
    rest += sum(len(text) for text in (model.producer_name, model.producer_version, model.domain, model.doc_string))
    return rest - constants + headers


def _nbytes(const: gs.Constant) -> int:
    if external.is_streamed(const):
        return external.stored_nbytes(const)
    tensor = getattr(const._values, "tensor", None)  # lazily loaded: read the proto, not the values
    if tensor is not None and tensor.raw_data:
        return len(tensor.raw_data)
    return int(np.asarray(const.values).nbytes)


def _hash_value(h, value, by_reference: bool = False) -> None:
    if isinstance(value, gs.Constant) and external.is_streamed(value):
        h.update(f"const|{value.name}|{np.dtype(value.dtype)}|{tuple(value.shape)}|".encode())
        if by_reference:
            path, offset, length = external.external_range(value._values.tensor)
            stat = os.stat(path)
            h.update(f"{path}|{offset}|{length}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        else:
            external.hash_constant(h, value._values.tensor)
    elif isinstance(value, gs.Constant):
        arr = np.ascontiguousarray(value.values)
        h.update(f"const|{value.name}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    elif isinstance(value, gs.Graph):
        _hash_graph(h, value, by_reference)
    elif isinstance(value, gs.Tensor):
        h.update(f"tensor|{value.name}|".encode())
    else:
        h.update(repr(value).encode())


def _hash_graph(h, graph: gs.Graph, by_reference: bool = False) -> None:
    h.update(f"graph|{graph.opset}|".encode())
    for t in graph.inputs + graph.outputs:
        h.update(f"io|{t.name}|{t.dtype}|{t.shape}|".encode())
    for node in graph.nodes:
        h.update(f"node|{node.op}|{node.domain}|{node.name}|".encode())
        for t in node.inputs:
            _hash_value(h, t, by_reference)
        h.update(("->" + "|".join(t.name for t in node.outputs)).encode())
        for key in sorted(node.attrs):
            h.update(f"|{key}=".encode())
            _hash_value(h, node.attrs[key], by_reference)
