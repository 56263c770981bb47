"""Loading and saving ONNX models: external data, clear errors, atomic writes."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .cache import cache_dir  # noqa: F401  (re-exported)
from .errors import LrqError

log = logging.getLogger(__name__)

# Opsets this tool reads: 7 is where MatMul/Gemm take their modern form; the upper bound is what
# the installed onnx package knows.
MIN_OPSET = 7
# Past this many weight bytes a model is written with external data (protobuf's 2 GB ceiling
# leaves room for the graph itself).
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


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


def constant_bytes(model: onnx.ModelProto) -> int:
    """Bytes of constant data: :func:`tensor_bytes` plus the values of Constant nodes."""
    return tensor_bytes(model) + sum(len(a.t.raw_data) or a.t.ByteSize() for n in model.graph.node
                                     if n.op_type == "Constant" for a in n.attribute if a.name == "value")


class Outputs:
    """Files that appear together or not at all: each is written to a temporary file beside its
    target (:meth:`stage`), and all are renamed into place by :meth:`commit`. Leaving the ``with``
    block without a commit (an error) removes every temporary."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._dirs: list[Path] = []

    def stage(self, target: str | os.PathLike) -> Path:
        """A temporary path to write ``target``'s content to."""
        target = Path(target)
        tmp = Path(tempfile.mkdtemp(prefix=".lrqgraph-", dir=target.parent))
        self._dirs.append(tmp)
        self._staged.append((tmp / target.name, target))
        return tmp / target.name

    def commit(self) -> None:
        for tmp, target in self._staged:
            os.replace(tmp, target)
        self._staged.clear()

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        for tmp in self._dirs:
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_path(path: str | os.PathLike, what: str = "output", source: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, an output path that cannot be written or would overwrite the input."""
    path = Path(path)
    if path.is_dir():
        raise LrqError(f"{path}: is a directory; give a file path for the {what}")
    if not path.parent.exists():
        raise LrqError(f"{path.parent}: {what} folder does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise LrqError(f"{path.parent}: {what} folder is not writable")
    if source is not None and _same_file(path, Path(source)):
        raise LrqError(f"{path}: {what} path is the input model; choose another path")
    return path


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
               source: str | os.PathLike | None = None, outputs: Outputs | None = None) -> Path:
    """Write ``model`` atomically to ``path``; with external data the weights go to ``<name>.data``.

    ``external_data=None`` picks external data only when the model would pass protobuf's 2 GB
    limit. The files appear complete or not at all: they are written to temporaries beside the
    target and renamed into place, now or by ``outputs.commit()`` when ``outputs`` is given.
    Refuses to overwrite ``source`` (the input model) or its data.
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
    with Outputs() as own:
        staging = outputs or own
        tmp = staging.stage(path)
        if external_data:
            data_tmp = staging.stage(path.parent / data_name)
            # onnx writes the data file beside the model under ``location``: point it at our temporary
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(tmp.parent / data_name, data_tmp)
        else:
            onnx.save_model(model, str(tmp))
        if outputs is None:
            own.commit()
    log.info("wrote %s%s", path, f" (+ {data_name})" if external_data else "")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
