"""Model inputs for verification and calibration.

Calibration data comes as an .npz (keys = the model's input names, samples stacked on axis 0), a
folder of such .npz files (each may have its own sequence length), or a text file with one sample
per line plus a tokenizer (a ``tokenizer.json`` or a folder holding one). Without data, inputs are
synthesised from the signature (verification only).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import LrqError
from .kvcache import PastShape, past_inputs

SYMBOLIC_DIM = 16   # length used for a symbolic non-batch dimension (sequence, spatial size)

_ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                  onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
                  onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
                  onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]   # ints are fixed, others symbolic

    @property
    def batch_fixed(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if tensor.elem_type not in _ONNX_TO_NUMPY:
            raise LrqError(f"input '{value.name}' has element type "
                           f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}, which lrqgraph cannot feed")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(_ONNX_TO_NUMPY[tensor.elem_type]), dims))
    return specs


def _index_bound(graph: gs.Graph, name: str) -> int | None:
    """If ``name`` indexes a constant table through a Gather (maybe after a Cast), the table size."""
    tensors = graph.tensors()
    frontier = [tensors[name]] if name in tensors else []
    for _ in range(3):
        nxt = []
        for tensor in frontier:
            for node in tensor.outputs:
                if node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is tensor \
                        and isinstance(node.inputs[0], gs.Constant):
                    return int(node.inputs[0].shape[int(node.attrs.get("axis", 0))])
                if node.op in ("Cast", "Unsqueeze", "Reshape", "Flatten"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return None


def synthesize(model: onnx.ModelProto, graph: gs.Graph, samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible inputs from the signature: token ids below the embedding size, masks of ones,
    standard-normal floats, an empty KV cache (lrqgraph.kvcache); ``samples`` along the batch
    axis, other symbolic dims set to 16."""
    rng = np.random.default_rng(seed)
    past = past_inputs(graph)
    feeds = {}
    for spec in input_specs(model):
        shape = [samples if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) else SYMBOLIC_DIM)
                 for i, d in enumerate(spec.shape)]
        if spec.batch_fixed is not None:
            shape[0] = spec.batch_fixed * samples
        if spec.name in past:
            shape = past[spec.name].dims(shape[0], spec.shape, SYMBOLIC_DIM)
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_ or "mask" in spec.name.lower():
            feeds[spec.name] = np.ones(shape, spec.dtype)
        else:
            bound = _index_bound(graph, spec.name)
            feeds[spec.name] = (rng.integers(0, bound, shape) if bound else np.zeros(shape)).astype(spec.dtype)
    return feeds


def load_npz(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs from an .npz whose keys are the model's input names, samples stacked on axis 0."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise LrqError(f"{path}: no such calibration file") from None
    except (OSError, ValueError) as exc:
        raise LrqError(f"{path}: not a readable .npz file ({exc})") from None
    specs = input_specs(model)
    names = {s.name for s in specs}
    missing, extra = sorted(names - set(arrays)), sorted(set(arrays) - names)
    if missing or extra:
        raise LrqError(f"{path}: keys must be the model's input names {sorted(names)}; "
                       f"missing {missing}, unexpected {extra}")
    counts = {arrays[s.name].shape[0] if arrays[s.name].ndim else 0 for s in specs}
    if 0 in counts:
        raise LrqError(f"{path}: holds no samples (empty arrays)")
    if len(counts) > 1:
        raise LrqError(f"{path}: inputs hold different sample counts {sorted(counts)}")
    for spec in specs:
        arr = arrays[spec.name]
        if arr.dtype.kind != spec.dtype.kind and not (arr.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise LrqError(f"{path}: '{spec.name}' is {arr.dtype}, the model expects {spec.dtype}")
        if arr.ndim != len(spec.shape):
            raise LrqError(f"{path}: '{spec.name}' has shape {arr.shape}, the model expects rank {len(spec.shape)}")
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if axis > 0 and isinstance(want, int) and got != want:
                raise LrqError(f"{path}: '{spec.name}' has shape {arr.shape}, the model expects {spec.shape}")
        arrays[spec.name] = arr.astype(spec.dtype)
    return arrays


def batches(model: onnx.ModelProto, feeds: dict[str, np.ndarray], max_batch: int = 8) -> Iterator[dict[str, np.ndarray]]:
    """Split stacked samples into runs the model accepts (its fixed batch size, else up to max_batch)."""
    specs = input_specs(model)
    fixed = {s.batch_fixed for s in specs if s.batch_fixed is not None}
    step = fixed.pop() if len(fixed) == 1 else max_batch
    # scalar inputs (an If condition, a step count) have no batch axis: every run gets them whole
    batched = [v for v in feeds.values() if np.ndim(v) > 0]
    total = batched[0].shape[0] if batched else 1
    for start in range(0, total, step):
        yield {k: v[start:start + step] if np.ndim(v) > 0 else v for k, v in feeds.items()}


@dataclass(frozen=True)
class CalibData:
    """Calibration samples as runs the model accepts, with a digest of their content."""

    batches: tuple[dict[str, np.ndarray], ...]
    samples: int
    digest: str     # SHA-256 of names, dtypes, shapes and bytes: the cache key of derived statistics
    source: str


def count_samples(runs) -> int:
    return sum(len(next(iter(run.values()))) for run in runs)


def split_runs(runs, samples: int) -> tuple[list, list]:
    """(runs holding exactly the first ``samples`` samples, runs holding the rest): the run at the
    boundary is cut in two (inputs without a batch axis go whole to both)."""
    head, rest, count = [], [], 0
    for run in runs:
        size = len(next(v for v in run.values() if np.ndim(v) > 0))
        take = min(max(samples - count, 0), size)
        if take:
            head.append(run if take == size else _rows(run, 0, take))
        if take < size:
            rest.append(run if take == 0 else _rows(run, take, size))
        count += take
    return head, rest


def _rows(run: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] if np.ndim(v) > 0 else v for k, v in run.items()}


def pack_prompts(runs: list[dict[str, np.ndarray]], past: dict[str, PastShape], length: int = 512
                 ) -> list[dict[str, np.ndarray]]:
    """A cached decoder's one-prompt runs (batch 1: its attention takes no padding) joined into
    prompts of up to ``length`` tokens, each from an empty cache: one run of 512 positions costs
    a fraction of 15 runs of 35 (per-run overhead, and GEMMs of a few rows). Later lines then
    read earlier ones as context, as text does. Runs of other shapes are returned as they are."""
    def prompt(run: dict[str, np.ndarray]) -> int | None:
        """The run's token count when every input but the past is one [1, tokens] row."""
        shapes = {np.shape(v) for k, v in run.items() if k not in past}
        shape = shapes.pop() if len(shapes) == 1 else ()
        return shape[1] if len(shape) == 2 and shape[0] == 1 else None

    lengths = [prompt(run) for run in runs]
    if not past or None in lengths:
        return runs
    out, group, tokens = [], [], 0
    for run, n in zip(runs, lengths):
        if group and tokens + n > length:
            out.append(_joined(group, past))
            group, tokens = [], 0
        group.append(run)
        tokens += n
    return out + ([_joined(group, past)] if group else [])


def _joined(group: list[dict[str, np.ndarray]], past: dict[str, PastShape]) -> dict[str, np.ndarray]:
    if len(group) == 1:
        return group[0]
    joined = {k: np.concatenate([run[k] for run in group], axis=1) for k in group[0] if k not in past}
    total = next(iter(joined.values())).shape[1]
    for name in joined:
        if "position" in name.lower():  # one sequence: positions run on
            joined[name] = np.arange(total, dtype=joined[name].dtype)[None]
    for name in past:
        shape = list(group[0][name].shape)
        shape[2] = max(past[name].capacity, total) if past[name].capacity else shape[2]
        joined[name] = np.zeros(shape, group[0][name].dtype)
    return joined


def samples_for_positions(runs, positions: int = 512, mask_input: str | None = None,
                          bounds: tuple[int, int] = (4, 32), default: int = 16) -> int:
    """How many leading samples hold ``positions`` sequence positions (tokens the mask keeps, or
    the sequence length of a [batch, seq] integer input), within ``bounds``: the allocator's
    measurements then cost about the same on short sentences and long windows. Inputs with no
    sequence axis (images): ``default``."""
    counted = 0
    for count, lengths in enumerate((length for run in runs for length in _positions(run, mask_input)), 1):
        counted += lengths
        if counted >= positions:
            return int(np.clip(count, *bounds))
    if counted == 0:
        return default
    return int(np.clip(count_samples(runs), *bounds))


def _positions(run: dict[str, np.ndarray], mask_input: str | None) -> list[int]:
    if mask_input is not None and mask_input in run:
        return [int(x) for x in np.asarray(run[mask_input]).reshape(len(run[mask_input]), -1).astype(bool).sum(1)]
    ids = [v for v in run.values() if np.ndim(v) == 2 and np.asarray(v).dtype.kind in "iu"]
    return [ids[0].shape[1]] * len(ids[0]) if ids else []


def load_calibration(source: str | os.PathLike, model: onnx.ModelProto, tokenizer: str | None = None,
                     max_samples: int = 128, max_batch: int = 8, max_length: int = 128,
                     graph: gs.Graph | None = None) -> CalibData:
    """Read calibration data (see the module docstring), keeping the first ``max_samples`` samples.
    ``graph`` (the model's) lets text fill a KV cache's past inputs with an empty cache."""
    path = Path(source)
    if not path.exists():
        raise LrqError(f"{path}: no such calibration file or folder")
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise LrqError(f"{path}: the folder holds no .npz files")
        groups = [load_npz(f, model) for f in files]
    elif path.suffix == ".npz":
        groups = [load_npz(path, model)]
    else:
        if tokenizer is None:
            raise LrqError(f"{path}: text calibration data needs a tokenizer (--tokenizer tokenizer.json "
                           f"or its folder), or give an .npz of model inputs")
        groups = _tokenize(path, model, tokenizer, max_samples, max_length,
                           past_inputs(graph) if graph is not None else {})
    runs, taken = [], 0
    for group in groups:
        count = next(iter(group.values())).shape[0]
        keep = min(count, max_samples - taken)
        if keep <= 0:
            break
        runs.extend(batches(model, {k: v[:keep] for k, v in group.items()}, max_batch))
        taken += keep
    digest = hashlib.sha256()
    for run in runs:
        for name in sorted(run):
            arr = np.ascontiguousarray(run[name])
            digest.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
            digest.update(arr.tobytes())
    return CalibData(tuple(runs), taken, digest.hexdigest()[:24], str(path))


def _tokenize(path: Path, model: onnx.ModelProto, tokenizer: str, max_samples: int,
              max_length: int, past: dict[str, PastShape]) -> list[dict[str, np.ndarray]]:
    """Model inputs from the text's lines: one padded group; for a decoder with a KV cache
    (``past``) a group per line, unpadded, since its attention op takes no padding in a prompt."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise LrqError("text calibration data needs the 'tokenizers' package: pip install tokenizers") from None
    tok_path = Path(tokenizer)
    if tok_path.is_dir():
        tok_path = tok_path / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as exc:  # the Rust binding raises bare Exceptions
        raise LrqError(f"{tok_path}: not a readable tokenizer.json ({exc})") from None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise LrqError(f"{path}: not a UTF-8 text file (one calibration sample per line)") from None
    if not lines:
        raise LrqError(f"{path}: holds no text lines")
    specs = input_specs(model)
    fixed = {s.shape[1] for s in specs if len(s.shape) > 1 and isinstance(s.shape[1], int) and s.name not in past}
    length = fixed.pop() if len(fixed) == 1 else max_length
    tok.enable_truncation(length)
    pad_id = tok.token_to_id("[PAD]") or tok.token_to_id("<pad>") or 0
    if not past:
        tok.enable_padding(pad_id=pad_id, length=length if fixed else None)
    encoded = tok.encode_batch(lines[:max_samples])
    return [_model_inputs(path, specs, past, group) for group in ([[e] for e in encoded] if past else [encoded])]


def _model_inputs(path: Path, specs: list[InputSpec], past: dict[str, PastShape], enc: list) -> dict[str, np.ndarray]:
    ids = np.array([e.ids for e in enc], np.int64)
    columns = {"ids": ids, "mask": np.array([e.attention_mask for e in enc], np.int64),
               "type": np.array([e.type_ids for e in enc], np.int64),
               "position": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    feeds = {}
    for spec in specs:
        if spec.name in past:  # a prompt's first pass: nothing cached yet
            feeds[spec.name] = np.zeros(past[spec.name].dims(len(ids), spec.shape, ids.shape[1]), spec.dtype)
            continue
        name = spec.name.lower()
        key = next((k for k in ("mask", "type", "position", "ids") if k in name), None)
        if key is None or len(spec.shape) != 2:
            raise LrqError(f"{path}: cannot derive model input '{spec.name}' from text; give an .npz of "
                           f"model inputs instead")
        feeds[spec.name] = columns[key].astype(spec.dtype)
    return feeds
