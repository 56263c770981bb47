"""discover: find the weight-bearing layers a rewrite can compress, and say why others stay.

Rules, in the order they are applied to every MatMul / Gemm (and reported for the rest):
 1. Nodes already quantized (MatMulNBits, MatMulInteger, QLinearMatMul, weights fed by
    DequantizeLinear) are left alone.
 2. The weight must be a constant 2-D float32/float16 tensor: the second MatMul input, or Gemm's B
    with transA=0 (transB=1 means the stored tensor is Wᵀ). Activation x activation products stay.
 3. Weights with NaN or Inf are refused, by name.
 4. Include / exclude patterns, layers writing a graph output (lm_head, classifiers) and tiny
    weights follow the select config.
 5. A weight shared by several nodes is compressed once; if another kind of node also reads it
    (a tied embedding), rewriting would add bytes, so it stays.
 6. Embedding tables (constant data of a Gather) are reported and left alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from lrqgraph.passmanager import Context, Pass, PassResult, register_analysis, register_pass

log = logging.getLogger(__name__)

QUANTIZED_OPS = {"MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "MatMulBnb4", "QGemm", "ConvInteger", "QLinearConv"}
SUPPORTED_DTYPES = (np.float32, np.float16)


@dataclass
class Layer:
    """One weight tensor and the nodes that multiply by it."""

    name: str                       # the first consumer's node name (unique in the report)
    op: str
    weight: str                     # tensor name of the weight
    nodes: list[gs.Node] = field(default_factory=list)
    shape: tuple[int, ...] = ()     # (K, N) of the effective MatMul weight when 2-D
    transposed: bool = False        # stored as Wᵀ (Gemm transB=1)
    dtype: str = ""
    rewrite: bool = False
    reason: str = ""

    @property
    def params(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0

    def weight_matrix(self) -> np.ndarray:
        """W[K, N] as float32, whatever the stored layout."""
        values = constant_values(self.nodes[0].inputs[1])
        w = np.asarray(values, dtype=np.float32)
        return np.ascontiguousarray(w.T) if self.transposed else w


def node_label(node: gs.Node, index: int) -> str:
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


def _producer_op(tensor: gs.Tensor) -> str | None:
    return tensor.inputs[0].op if len(tensor.inputs) == 1 else None


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


def _classify(node: gs.Node, graph_outputs: set[str], select) -> tuple[str | None, bool, str]:
    """(weight name or None, transposed, reason to skip or '') for one MatMul/Gemm node."""
    if len(node.inputs) < 2:
        return None, False, "malformed node (fewer than two inputs)"
    weight = node.inputs[1]
    producer = _producer_op(weight)
    if producer in ("DequantizeLinear", "MatMulNBits") or producer in QUANTIZED_OPS:
        return None, False, f"already quantized (weight comes from {producer})"
    values = constant_values(weight)
    if values is None:
        return None, False, "weight is not a constant (activation x activation product)"
    transposed = False
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None, False, "Gemm with transA=1 is not rewritten"
        transposed = bool(node.attrs.get("transB", 0))
    if values.ndim != 2:
        return weight.name, transposed, f"weight is {values.ndim}-D; only 2-D weights are rewritten"
    if values.dtype not in SUPPORTED_DTYPES:
        return weight.name, transposed, f"weight dtype {values.dtype} is not supported (float32/float16 only)"
    if not np.isfinite(values).all():
        return weight.name, transposed, "weight contains NaN or Inf: layer refused"
    if any(o.name in graph_outputs for o in node.outputs) and select.keep_output_layers:
        return weight.name, transposed, "writes a graph output (lm_head/classifier kept by default)"
    if values.size < select.min_params:
        return weight.name, transposed, f"tiny ({values.size} < {select.min_params} parameters)"
    return weight.name, transposed, ""


@register_analysis("layers")
def discover_layers(ctx: Context) -> list[Layer]:
    graph = ctx.model.graph
    select = ctx.config.select
    order = list(nx.topological_sort(dataflow_graph(graph)))
    graph_outputs = {o.name for o in graph.outputs}
    layers: dict[str, Layer] = {}
    result: list[Layer] = []
    for idx in order:
        node = graph.nodes[idx]
        label = node_label(node, idx)
        if node.op in QUANTIZED_OPS:
            result.append(Layer(label, node.op, "", [node], reason="already quantized"))
            continue
        if node.op == "Gather" and node.inputs and constant_values(node.inputs[0]) is not None:
            table = constant_values(node.inputs[0])
            if table.ndim == 2 and table.size >= select.min_params:
                result.append(Layer(label, "Gather", node.inputs[0].name, [node], tuple(table.shape),
                                    dtype=str(table.dtype), reason="embedding table (Gather) left alone"))
            continue
        if node.op not in select.op_types or node.domain not in ("", "ai.onnx", None):
            continue
        weight, transposed, reason = _classify(node, graph_outputs, select)
        values = constant_values(node.inputs[1]) if weight else None
        shape = tuple(values.shape[::-1] if transposed else values.shape) if values is not None else ()
        if not reason and select.include and not select.matches(select.include, label, weight):
            reason = "not matched by --include"
        if not reason and select.exclude and select.matches(select.exclude, label, weight):
            reason = "matched by --exclude"
        if weight and not reason and weight in layers:
            shared = layers[weight]
            if shared.transposed != transposed or shared.op != node.op:
                shared.rewrite, shared.reason = False, "weight shared by nodes with different layouts"
            shared.nodes.append(node)
            continue
        layer = Layer(label, node.op, weight or "", [node], shape, transposed,
                      str(values.dtype) if values is not None else "", rewrite=not reason, reason=reason)
        if weight and not reason:
            layers[weight] = layer
        result.append(layer)
    _refuse_tied_weights(graph, layers)
    return result


def _refuse_tied_weights(graph: gs.Graph, layers: dict[str, Layer]) -> None:
    tensors = graph.tensors()
    for name, layer in layers.items():
        readers = tensors[name].outputs if name in tensors else []
        others = [n for n in readers if all(n is not m for m in layer.nodes)]
        if others and layer.rewrite:
            layer.rewrite = False
            layer.reason = (f"weight also read by {others[0].op} node '{others[0].name}'; "
                            "a rewrite would keep the original and add bytes")


@register_pass
class Discover(Pass):
    """Compute the ``layers`` analysis and record every layer's verdict in the report."""

    name = "discover"

    def run(self, ctx: Context) -> PassResult:
        layers = ctx.analysis("layers")
        for layer in layers:
            entry = ctx.report["layers"].setdefault(layer.name, {})
            entry.update(name=layer.name, op=layer.op, weight=layer.weight, shape=list(layer.shape),
                         params=layer.params, nodes=len(layer.nodes),
                         action="rewrite" if layer.rewrite else "keep", reason=layer.reason)
            if "NaN" in layer.reason:
                log.warning("layer '%s' refused: its weight '%s' contains NaN or Inf", layer.name, layer.weight)
        count = sum(layer.rewrite for layer in layers)
        log.info("discover: %d of %d layers selected for rewriting", count, len(layers))
        return PassResult(modified=False)
