"""Reading onnx-graphsurgeon graphs as exporters write them: constant weights behind Constant,
Identity, Transpose and Cast nodes, dataflow order, unique names."""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .external import is_streamed, stored_values

# Casts a weight may go through on its way to a layer (mixed-precision exports store fp16 and cast up)
_FLOAT_CASTS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def node_label(node: gs.Node, index: int) -> str:
    """The node's name, or ``<op>_<index in the graph>`` for unnamed nodes (unique either way
    within one graph as long as names are)."""
    return node.name or f"{node.op}_{index}"


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """Values of an initializer or of a Constant node's output; None for activations."""
    if isinstance(tensor, gs.Constant):
        return stored_values(tensor)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return stored_values(value)
    return None


@dataclass(frozen=True)
class WeightSource:
    """A constant as one node input sees it, traced back to where it is stored."""

    root: gs.Tensor               # the initializer, or the output of the Constant node, that stores it
    stored: gs.Constant           # the constant holding the bytes (``root`` itself, or the Constant node's value)
    chain: tuple[gs.Node, ...]    # Constant / Identity / Transpose / Cast nodes between root and reader
    # the nodes of ``chain`` the values pass through (all when None; a tied table's own chain, not its lm_head's)
    path: tuple[gs.Node, ...] | None = None

    @property
    def values(self) -> np.ndarray:
        """What the reading node gets. Kept after the first read, except for a streamed
        constant (lrqgraph.external), which is read from its file on every access."""
        cached = self.__dict__.get("_values")
        if cached is not None:
            return cached
        out = stored_values(self.stored)
        for node in reversed(self.through):  # from the root towards the reader
            if node.op == "Transpose":
                out = out.T
            elif node.op == "Cast":
                out = out.astype(_FLOAT_CASTS[node.attrs["to"]])
        out = np.ascontiguousarray(out)
        if not is_streamed(self.stored):
            object.__setattr__(self, "_values", out)
        return out

    @property
    def through(self) -> tuple[gs.Node, ...]:
        """The nodes of ``chain`` the values pass through, reader first."""
        return self.chain if self.path is None else self.path

    @property
    def stored_dtype(self) -> np.dtype:
        """The root's element type (a Cast may change it on the way)."""
        try:
            return np.dtype(self.stored.dtype)
        except TypeError:  # an ONNX type numpy lacks (bfloat16): what loading it gives
            return np.dtype(stored_values(self.stored).dtype)

    @property
    def dtype(self) -> np.dtype:
        casts = [n for n in self.through if n.op == "Cast"]
        return np.dtype(_FLOAT_CASTS[casts[0].attrs["to"]]) if casts else self.stored_dtype

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self.stored.shape)
        flips = sum(n.op == "Transpose" for n in self.through)
        return shape[::-1] if flips % 2 else shape

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def stored_bits(self) -> int:
        return self.size * self.stored_dtype.itemsize * 8

    def tensors(self) -> list[gs.Tensor]:
        """Every tensor from the root to the reader's input (a chain of one for a plain initializer)."""
        return [self.root] + [n.outputs[0] for n in reversed(self.chain) if n.op != "Constant"]


def resolve_constant(tensor: gs.Tensor, max_steps: int = 8) -> WeightSource | None:
    """The constant ``tensor`` carries, through Constant, Identity, 2-D Transpose and float Casts;
    None when it is (or depends on) an activation or any other op. Reads no values."""
    steps: list[gs.Node] = []
    t = tensor
    for _ in range(max_steps):
        if isinstance(t, gs.Constant):
            return _traced(t, t, steps)
        if len(t.inputs) != 1:
            return None
        node = t.inputs[0]
        if node.op == "Constant":
            value = node.attrs.get("value")
            return _traced(t, value, steps + [node]) if isinstance(value, gs.Constant) else None
        if node.op == "Identity" or (node.op == "Cast" and node.attrs.get("to") in _FLOAT_CASTS) or \
                (node.op == "Transpose" and list(node.attrs.get("perm", [1, 0])) == [1, 0]):
            steps.append(node)
            t = node.inputs[0]
            continue
        return None
    return None


def _traced(root: gs.Tensor, stored: gs.Constant, steps: list[gs.Node]) -> WeightSource | None:
    if any(n.op == "Transpose" for n in steps) and len(stored.shape) != 2:
        return None
    return WeightSource(root, stored, tuple(steps))


def dataflow_graph(graph: gs.Graph) -> nx.DiGraph:
    """Node-to-node dataflow as a networkx DiGraph (nodes are indices into graph.nodes)."""
    g = nx.DiGraph()
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    g.add_nodes_from(range(len(graph.nodes)))
    for i, node in enumerate(graph.nodes):
        for out in node.outputs:
            for consumer in out.outputs:
                if id(consumer) in index:
                    g.add_edge(i, index[id(consumer)])
    return g


class Namer:
    """Names not yet used by any node or tensor of a graph (ONNX requires unique node names for
    onnxruntime, and unique tensor names everywhere)."""

    def __init__(self, graph: gs.Graph):
        self.used = {n.name for n in graph.nodes if n.name} | set(graph.tensors())

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name
