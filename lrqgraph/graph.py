"""Reading onnx-graphsurgeon graphs as exporters write them: constant weights behind Constant,
Identity, Transpose and Cast nodes, dataflow order, unique names."""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

# Casts a weight may go through on its way to a layer (mixed-precision exports store fp16 and cast up)
_FLOAT_CASTS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def node_label(node: gs.Node, index: int) -> str:
    """The node's name, or ``<op>_<index in the graph>`` for unnamed nodes (unique either way
    within one graph as long as names are)."""
    return node.name or f"{node.op}_{index}"


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """Values of an initializer or of a Constant node's output; None for activations."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.values
    return None


@dataclass(frozen=True)
class WeightSource:
    """A constant as one node input sees it, traced back to where it is stored."""

    values: np.ndarray            # what the reading node gets
    root: gs.Tensor               # the initializer, or the output of the Constant node, that stores it
    stored_dtype: np.dtype        # the root's element type (a Cast may change it on the way)
    chain: tuple[gs.Node, ...]    # Constant / Identity / Transpose / Cast nodes between root and reader

    @property
    def stored_bits(self) -> int:
        return int(self.values.size) * self.stored_dtype.itemsize * 8

    def tensors(self) -> list[gs.Tensor]:
        """Every tensor from the root to the reader's input (a chain of one for a plain initializer)."""
        return [self.root] + [n.outputs[0] for n in reversed(self.chain) if n.op != "Constant"]


def resolve_constant(tensor: gs.Tensor, max_steps: int = 8) -> WeightSource | None:
    """The constant ``tensor`` carries, through Constant, Identity, 2-D Transpose and float Casts;
    None when it is (or depends on) an activation or any other op."""
    steps: list[gs.Node] = []
    t = tensor
    for _ in range(max_steps):
        if isinstance(t, gs.Constant):
            return _apply(t.values, t, steps)
        if len(t.inputs) != 1:
            return None
        node = t.inputs[0]
        if node.op == "Constant":
            value = node.attrs.get("value")
            return _apply(value.values, t, steps + [node]) if isinstance(value, gs.Constant) else None
        if node.op == "Identity" or (node.op == "Cast" and node.attrs.get("to") in _FLOAT_CASTS) or \
                (node.op == "Transpose" and list(node.attrs.get("perm", [1, 0])) == [1, 0]):
            steps.append(node)
            t = node.inputs[0]
            continue
        return None
    return None


def _apply(values: np.ndarray, root: gs.Tensor, steps: list[gs.Node]) -> WeightSource | None:
    out = values
    for node in reversed(steps):  # from the root towards the reader
        if node.op == "Transpose":
            if out.ndim != 2:
                return None
            out = out.T
        elif node.op == "Cast":
            out = out.astype(_FLOAT_CASTS[node.attrs["to"]])
    return WeightSource(np.ascontiguousarray(out), root, np.dtype(values.dtype), tuple(steps))


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
