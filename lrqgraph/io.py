"""Loading and saving ONNX models: external data, clear errors, atomic writes."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import LrqError

log = logging.getLogger(__name__)

# Opsets this tool reads: 7 is where MatMul/Gemm take their modern form; the upper bound is what
# the installed onnx package knows.
MIN_OPSET = 7
# Past this many weight bytes a model is written with external data (protobuf's 2 GB ceiling
# leaves room for the graph itself).
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def cache_dir(*parts: str) -> Path:
    """lrqgraph's on-disk cache (``$LRQGRAPH_CACHE``, default ``~/.cache/lrqgraph``), created on use."""
    root = Path(os.environ.get("LRQGRAPH_CACHE", Path.home() / ".cache" / "lrqgraph")).joinpath(*parts)
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise LrqError saying why not."""
    path = Path(path)
    if not path.exists():
        raise LrqError(f"{path}: no such file")
    if path.is_dir():
        raise LrqError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise LrqError(f"{path}: not a readable ONNX model (the file is damaged, truncated or "
                       f"not ONNX: {type(exc).__name__})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise LrqError(f"{path}: not an ONNX model (no graph nodes found); is the file truncated?")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, onnx.checker.ValidationError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LrqError(f"{path}: cannot read its external data ({detail}); "
                       f"keep the data file beside the model") from None
    check_opset(model, path)
    try:
        # Structural check only: catches truncation that protobuf parsing lets through.
        if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LrqError(f"{path}: invalid ONNX model ({first})") from None
    return model


def check_opset(model: onnx.ModelProto, path: str | os.PathLike = "model") -> None:
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise LrqError(f"{path}: opset {opset} is not supported (lrqgraph reads opsets {MIN_OPSET}..{newest}); "
                       f"convert it with onnx.version_converter first")


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data in the graph's initializers (in memory or external)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
               source: str | os.PathLike | None = None) -> Path:
    """Write ``model`` atomically to ``path``; with external data the weights go to ``<name>.data``.

    ``external_data=None`` picks external data only when the model would pass protobuf's 2 GB
    limit. The files appear complete or not at all: they are written into a temporary folder
    beside the target and renamed into place. Refuses to overwrite ``source`` (the input model).
    With external data, the in-memory tensors are converted to external references.
    """
    path = Path(path)
    if source is not None and _same_file(path, Path(source)):
        raise LrqError(f"{path}: output path is the input model; choose another output path")
    if path.suffix == "" or path.is_dir():
        raise LrqError(f"{path}: output must be a file path such as model.lrq.onnx")
    if not path.parent.exists():
        raise LrqError(f"{path.parent}: output folder does not exist")
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    if source is not None and external_data and _same_file(path.parent / data_name, Path(source)):
        raise LrqError(f"{path}: its data file would overwrite the input model; choose another name")
    tmp = Path(tempfile.mkdtemp(prefix=".lrqgraph-", dir=path.parent))
    try:
        onnx.save_model(model, str(tmp / path.name), save_as_external_data=external_data,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        if external_data:
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s%s", path, f" (+ {data_name})" if external_data else "")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
