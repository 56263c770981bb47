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
from .external import has_absolute_external, write_external
from .ortops import as_contrib

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


def load_model(path: str | os.PathLike, stream_above: int | None = None) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise LrqError saying why not. With
    ``stream_above``, a model holding more weight bytes than that in external data is returned
    without them, for lrqgraph.external to read one tensor at a time (:func:`uses_external_data`
    then holds)."""
    path = Path(path)
    if not path.exists():
        raise LrqError(f"{path}: no such file")
    if path.is_dir():
        raise LrqError(f"{path}: is a folder without genai_config.json; give an .onnx file or an "
                       f"onnxruntime-genai model folder")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise LrqError(f"{path}: not a readable ONNX model (the file is damaged, truncated or "
                       f"not ONNX: {type(exc).__name__})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise LrqError(f"{path}: not an ONNX model (no graph nodes found); is the file truncated?")
    if stream_above is not None and uses_external_data(model) and tensor_bytes(model) > stream_above:
        check_opset(model, path)
        return model
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
            with as_contrib(model, default_opset(model)):
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


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


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
            if tmp.is_dir() and target.is_dir():  # a folder replaces a folder: the old one goes aside
                os.replace(target, tmp.parent / ".replaced")
            os.replace(tmp, target)
        self._staged.clear()

    def staged_files(self) -> list[Path]:
        """The temporary files staged so far (before :meth:`commit`)."""
        return [tmp for tmp, _ in self._staged]

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
    streamed = has_absolute_external(model)
    if external_data is None or streamed:
        external_data = streamed or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    if source is not None and external_data and any(_same_file(path.parent / data_name, f)
                                                    for f in (Path(source), *data_files(source))):
        raise LrqError(f"{path}: its data file {data_name} would overwrite the input model's; choose another name")
    with Outputs() as own:
        staging = outputs or own
        tmp = staging.stage(path)
        if external_data:  # streamed data is copied range by range: never the whole model in memory
            data_tmp = staging.stage(path.parent / data_name)
            shell = onnx.ModelProto()
            shell.CopyFrom(model)  # the caller's model keeps its data
            write_external(shell, data_tmp, data_name)
            onnx.save_model(shell, str(tmp))
        else:
            onnx.save_model(model, str(tmp))
        if outputs is None:
            own.commit()
    log.info("wrote %s%s", path, f" (+ {data_name})" if external_data else "")
    return path


def data_files(source: str | os.PathLike) -> list[Path]:
    """The external data files a model file refers to (none when it cannot be read)."""
    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception:  # noqa: BLE001  (not a model: nothing of it to protect beyond the file itself)
        return []
    folder = Path(source).parent
    return [folder / e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
