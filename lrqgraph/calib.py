"""Model inputs for verification and calibration: loaded from .npz, or synthesised from the signature."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import LrqError

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
    standard-normal floats; ``samples`` along the batch axis, symbolic dims set to 16."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_specs(model):
        shape = [samples if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) else SYMBOLIC_DIM)
                 for i, d in enumerate(spec.shape)]
        if spec.batch_fixed is not None:
            shape[0] = spec.batch_fixed * samples
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
    total = next(iter(feeds.values())).shape[0] if feeds else 0
    for start in range(0, total, step):
        yield {k: v[start:start + step] for k, v in feeds.items()}
