"""The typed results that flow forward through a pipeline: layers found by ``discover``, the plan
the decide step (``factorize`` or ``allocate``) makes for each, and what ``lower`` emitted."""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .external import FileValues, is_streamed
from .graph import WeightSource
from .numerics import Representation


@dataclass
class Layer:
    """One weight tensor and the nodes that multiply by it."""

    name: str                       # the first consumer's label (unique in the report)
    op: str
    weight: str                     # the tensor the nodes read as their weight
    nodes: list[gs.Node] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)   # node_label of each node (unnamed nodes too)
    shape: tuple[int, ...] = ()     # (K, N) of the effective MatMul weight when 2-D (a table: (dim, vocab))
    transposed: bool = False        # stored as Wᵀ (Gemm transB=1)
    dtype: str = ""                 # the weight's element type as the nodes read it
    source: WeightSource | None = None
    rewrite: bool = False
    reason: str = ""
    kernel: tuple[int, ...] = ()    # a Conv's weight shape (C_out, C_in/group, kh, kw); W = its [C_out, C_in/group·kh·kw] reshape, transposed

    @property
    def matmuls(self) -> list[gs.Node]:
        """The MatMul / Gemm nodes that multiply by the weight."""
        return [n for n in self.nodes if n.op != "Gather"]

    @property
    def gathers(self) -> list[gs.Node]:
        """Gather nodes that read rows of Wᵀ: an embedding table (tied with an lm_head when
        ``matmuls`` is not empty)."""
        return [n for n in self.nodes if n.op == "Gather"]

    @property
    def groups(self) -> int:
        """A convolution's group count (1 for every other layer)."""
        return int(self.nodes[0].attrs.get("group", 1)) if self.kernel else 1

    @property
    def params(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0

    @property
    def stored_bits(self) -> int:
        """Bits the model spends on this weight today."""
        return self.source.stored_bits if self.source is not None else 0

    def weight_matrix(self) -> np.ndarray:
        """W[K, N] as float32, whatever the stored layout (a Conv's: K = C_in·kh·kw, N = C_out)."""
        return _as_matrix(self.source.values, self.kernel, self.transposed)

    def weight_task(self) -> "np.ndarray | WeightFile":
        """The weight as a per-layer task should carry it: where its bytes lie for a streamed
        weight (the worker reads them, so the driver never holds them), else :meth:`weight_matrix`."""
        if not is_streamed(self.source.stored):
            return self.weight_matrix()
        steps = tuple("T" if n.op == "Transpose" else str(n.attrs["to"]) for n in reversed(self.source.through)
                      if n.op in ("Transpose", "Cast"))
        return WeightFile(self.source.stored._values.tensor, steps, self.kernel, self.transposed)

    def stored_layout(self, w: np.ndarray) -> np.ndarray:
        """W[K, N] back in the layout the model stores the weight (the inverse of weight_matrix)."""
        if self.kernel:
            return np.ascontiguousarray(w.T).reshape(self.kernel)
        return np.ascontiguousarray(w.T) if self.transposed else w


def _as_matrix(values: np.ndarray, kernel: tuple[int, ...], transposed: bool) -> np.ndarray:
    w = np.asarray(values, dtype=np.float32)
    if kernel:
        return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
    return np.ascontiguousarray(w.T) if transposed else w


@dataclass(frozen=True)
class WeightFile:
    """A streamed layer's weight by reference: its file range and the steps to the layer's W[K, N]."""

    tensor: onnx.TensorProto        # data-less, external with an absolute location (lrqgraph.external)
    steps: tuple[str, ...]          # from the stored tensor to the reader: "T" (Transpose) or a Cast's ONNX type
    kernel: tuple[int, ...]
    transposed: bool

    def load(self) -> np.ndarray:
        values = FileValues(self.tensor).load()
        for step in self.steps:
            values = values.T if step == "T" else values.astype(onnx.helper.tensor_dtype_to_np_dtype(int(step)))
        return _as_matrix(values, self.kernel, self.transposed)


def materialize(w: "np.ndarray | WeightFile") -> np.ndarray:
    """The weight matrix a task was given (read from its file when given by reference)."""
    return w.load() if isinstance(w, WeightFile) else w


@dataclass(frozen=True)
class SpilledRepresentation:
    """A representation kept in a file until ``lower`` needs it, so that a streamed model's plans
    do not hold every layer's codes in memory at once; the report's figures are kept at hand."""

    path: Path
    method: str
    rank: int | None
    info: dict
    shape: tuple[int, int]
    bits: int

    @classmethod
    def write(cls, rep: Representation, path: Path) -> "SpilledRepresentation":
        with open(path, "wb") as f:
            pickle.dump(rep, f, protocol=pickle.HIGHEST_PROTOCOL)
        return cls(path, rep.method, rep.rank, rep.info, rep.shape, rep.storage_bits())

    def load(self) -> Representation:
        with open(self.path, "rb") as f:
            return pickle.load(f)

    def storage_bits(self) -> int:
        return self.bits

    def bits_per_weight(self) -> float:
        return self.bits / (self.shape[0] * self.shape[1])


def loaded(rep: "Representation | SpilledRepresentation") -> Representation:
    """The representation itself, read back from its file when it was spilled."""
    return rep.load() if isinstance(rep, SpilledRepresentation) else rep


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one layer: a representation to emit, or why the layer stays as it is."""

    layer: Layer
    rep: "Representation | SpilledRepresentation | None"
    reason: str = ""                                   # why it is kept ('' when rewritten)
    settings: dict[str, Any] = field(default_factory=dict)  # method, bits, block, ... as chosen
    rel_error: float | None = None
    act_error: float | None = None
    seconds: float | None = None
    allocation: dict[str, Any] | None = None           # choice, predicted, sensitivity, probe, check
    lowering: str | None = None  # this layer's own lowering (the allocation's "fold"); None: the lower pass's

    @property
    def rewrite(self) -> bool:
        return self.rep is not None


@dataclass(frozen=True)
class LoweredLayer:
    """What ``lower`` wrote for one layer."""

    target: str
    stored_bytes: int           # every initializer byte of its codes, scales, zero points, codebooks
    nodes: int                  # nodes emitted


def use_plans(ctx, reps: dict[str, Representation]) -> None:
    """Plan the given representations (weight name -> Representation) for the context's layers, as
    the decide step would: for handing plans made elsewhere (another context, a benchmark) to ``lower``."""
    layers = {layer.weight: layer for layer in ctx.analysis("layers")}
    unknown = sorted(set(reps) - set(layers))
    if unknown:
        raise KeyError(f"no layer reads weight(s) {unknown}")
    ctx.plans = {**ctx.plans, **{w: LayerPlan(layers[w], rep) for w, rep in reps.items()}}
