"""Constants that stay in their files: models larger than memory, read one tensor at a time.

A streamed model's initializers in external data are not loaded when the model is. Each becomes a
:class:`FileValues`, which reads the tensor's bytes from its file whenever they are asked for and
keeps nothing, so memory holds one layer's weights, not the model's. Constants a rewrite makes
(codes, scales) are appended to a :class:`Spill` file as soon as a layer is lowered and become
FileValues too. Inside lrqgraph such tensors are TensorProtos with data_location EXTERNAL and an
*absolute* location; :func:`write_external` copies them into an output data file in ranges,
:func:`inline` reads them into a proto for an onnxruntime session, :func:`hash_constant` digests
them in ranges.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import constant_to_onnx_tensor

from .errors import LrqError

# Bytes copied or hashed at a time
CHUNK = 64 << 20
# Tensors under this many bytes stay inside the .onnx file when a model is written
INLINE_BELOW = 1024
# Data offsets are aligned so that onnxruntime can memory-map each tensor; tensors under
# ALIGN_FROM bytes are packed unaligned (their pages matter little, and the padding would make a
# model with many small tensors larger than other writers make it)
ALIGN = 4096
ALIGN_FROM = 1 << 20


def _info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_range(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """(file, offset, length) of an external tensor as lrqgraph holds it (absolute location)."""
    info = _info(tensor)
    length = info.get("length")
    if length is None:
        length = _element_count(tensor) * _itemsize(tensor)
    return info["location"], int(info.get("offset", 0)), int(length)


def _element_count(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _itemsize(tensor: onnx.TensorProto) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def reference(name: str, like: onnx.TensorProto, path: str, offset: int, length: int) -> onnx.TensorProto:
    """A data-less TensorProto of ``like``'s type and shape pointing at ``length`` bytes of ``path``."""
    tensor = onnx.TensorProto(name=name, data_location=onnx.TensorProto.EXTERNAL, data_type=like.data_type)
    tensor.dims.extend(like.dims)
    for key, value in (("location", str(path)), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _chunks(tensor: onnx.TensorProto) -> Iterator[bytes]:
    """An external tensor's bytes, CHUNK at a time."""
    path, offset, length = external_range(tensor)
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            block = f.read(min(CHUNK, length))
            if not block:
                raise LrqError(f"{path}: external data of tensor '{tensor.name}' is truncated "
                               f"(offset {offset}, length {external_range(tensor)[2]})")
            yield block
            length -= len(block)


def read_bytes(tensor: onnx.TensorProto) -> bytes:
    return b"".join(_chunks(tensor))


class FileValues(LazyValues):
    """A constant's values in a file: read on every ``load``, never kept (see the module doc)."""

    def load(self) -> np.ndarray:
        t = self.tensor
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        path, offset, length = external_range(t)
        if dtype.kind in "fiub" and dtype.itemsize * _element_count(t) == length:
            values = np.fromfile(path, dtype=dtype, count=_element_count(t), offset=offset)
            if values.size != _element_count(t):
                raise LrqError(f"{path}: external data of tensor '{t.name}' is truncated")
            return values.reshape(tuple(t.dims))
        return numpy_helper.to_array(inline(t))  # packed or exotic element types: onnx decodes them


def stored_values(const: gs.Constant) -> np.ndarray:
    """A constant's values; a FileValues one is read afresh and not kept on the constant."""
    if isinstance(const._values, FileValues):
        return const._values.load()
    return const.values


def is_streamed(const: gs.Constant) -> bool:
    return isinstance(const._values, FileValues)


def inline(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of ``tensor`` with its bytes inside (read from its file when it is external)."""
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    if is_external(tensor):
        out.raw_data = read_bytes(tensor)
        del out.external_data[:]
        out.data_location = onnx.TensorProto.DEFAULT
    return out


def attach(graph: gs.Graph, base_dir: str | os.PathLike, source: str | os.PathLike) -> int:
    """Turn every external constant of ``graph`` (and its subgraphs) into FileValues with an
    absolute location under ``base_dir``; checks each file holds the bytes. Returns the count."""
    base = Path(base_dir).resolve()
    count = 0
    for const in _constants(graph):
        t = getattr(const._values, "tensor", None)
        if t is None or not is_external(t) or isinstance(const._values, FileValues):
            continue
        info = _info(t)
        location = info.get("location", "")
        path = (base / location).resolve()
        own = Path(location).is_absolute() and str(base) == "/"  # a proto lrqgraph made (see the module doc)
        if (Path(location).is_absolute() and not own) or ".." in Path(location).parts or not path.is_file():
            raise LrqError(f"{source}: tensor '{t.name}' reads external data '{location}', which is not "
                           f"a file beside the model; keep the data file in the model's folder")
        _, offset, length = external_range(t)
        if offset + length > path.stat().st_size:
            raise LrqError(f"{source}: tensor '{t.name}' reads bytes {offset}..{offset + length} of "
                           f"'{location}', which holds {path.stat().st_size}; the data file is truncated")
        const._values = FileValues(reference(t.name, t, str(path), offset, length))
        count += 1
    return count


def _constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    seen: set[int] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor
        for node in g.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Constant) and id(value) not in seen:
                    seen.add(id(value))
                    yield value
                elif isinstance(value, gs.Graph):
                    stack.append(value)
                elif isinstance(value, (list, tuple)):
                    stack.extend(v for v in value if isinstance(v, gs.Graph))


class Spill:
    """One append-only file of constants a rewrite made, in a temporary folder that is removed
    when the process exits (the ModelProto a run returns refers to it until then)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="lrqgraph-spill-"))
        self.path = self.folder / "constants.data"
        self._file = open(self.path, "wb")
        self._count = 0
        atexit.register(_remove, self._file, self.folder)

    def new_path(self, name: str) -> Path:
        """A file name of the spill folder no one has used yet."""
        self._count += 1
        return self.folder / f"{self._count}-{name}"

    def put(self, const: gs.Constant) -> None:
        """Append ``const``'s stored bytes to the file and point the constant at them."""
        proto = _proto_of(const)
        self._file.write(b"\0" * (-self._file.tell() % ALIGN))
        offset = self._file.tell()
        self._file.write(proto.raw_data)
        self._file.flush()
        const._values = FileValues(reference(const.name, proto, str(self.path), offset, len(proto.raw_data)))

def _remove(file, folder: Path) -> None:
    file.close()
    shutil.rmtree(folder, ignore_errors=True)


def _proto_of(const: gs.Constant) -> onnx.TensorProto:
    """The constant as a TensorProto with raw bytes (a lowering's packed int4 protos as they are)."""
    proto = const._values.tensor if isinstance(const._values, LazyValues) else constant_to_onnx_tensor(const)
    if not proto.HasField("raw_data"):
        proto = numpy_helper.from_array(numpy_helper.to_array(proto), const.name)
    return proto


def stored_nbytes(const: gs.Constant) -> int:
    """Bytes a constant takes in the file (packed element types as packed)."""
    if isinstance(const._values, FileValues):
        return external_range(const._values.tensor)[2]
    return len(_proto_of(const).raw_data)


def spill_constants(constants: list[gs.Constant], spill: Spill) -> int:
    """Spill those of ``constants`` held in memory with at least INLINE_BELOW bytes."""
    count = 0
    for const in constants:
        if isinstance(const._values, FileValues) or stored_nbytes(const) < INLINE_BELOW:
            continue
        spill.put(const)
        count += 1
    return count


def hash_constant(h: "hashlib._Hash", tensor: onnx.TensorProto) -> None:
    """Feed an external tensor's bytes to ``h`` in ranges."""
    for block in _chunks(tensor):
        h.update(block)


def write_external(model: onnx.ModelProto, data_path: Path, data_name: str) -> None:
    """Move the data of ``model``'s tensors into ``data_path`` (named ``data_name`` in the
    model): external ones are copied range by range, in-proto ones of INLINE_BELOW bytes or more
    are written and cleared. ``model`` is edited in place (pass a copy)."""
    with open(data_path, "wb") as out:
        for tensor in _all_tensors(model):
            external = is_external(tensor)
            if not external and len(tensor.raw_data) < INLINE_BELOW:
                continue
            if _nbytes(tensor) >= ALIGN_FROM:
                out.write(b"\0" * (-out.tell() % ALIGN))
            offset = out.tell()
            if external:
                length = _copy_range(tensor, out)
            else:
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)


def _nbytes(tensor: onnx.TensorProto) -> int:
    return int(_info(tensor).get("length", 0)) if is_external(tensor) else len(tensor.raw_data)


def _copy_range(tensor: onnx.TensorProto, out) -> int:
    length = 0
    for block in _chunks(tensor):
        out.write(block)
        length += len(block)
    return length


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)


def has_absolute_external(model: onnx.ModelProto) -> bool:
    """Whether the proto refers to data the way lrqgraph holds streamed constants."""
    return any(is_external(t) and Path(_info(t).get("location", "")).is_absolute() for t in _all_tensors(model))


def absolutize(model: onnx.ModelProto, base_dir: str | os.PathLike) -> onnx.ModelProto:
    """Point ``model``'s external tensors (relative to ``base_dir``) at absolute locations, in place."""
    base = Path(base_dir).resolve()
    for tensor in _all_tensors(model):
        if is_external(tensor):
            for entry in tensor.external_data:
                if entry.key == "location" and not Path(entry.value).is_absolute():
                    entry.value = str(base / entry.value)
    return model
