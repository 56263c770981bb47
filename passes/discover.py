"""discover: find the weight-bearing layers a rewrite can compress, and say why others stay.

Rules, in the order they are applied to every MatMul / Gemm / Conv of the main graph (and
reported for the rest; nodes inside If / Loop bodies are not rewritten):
 1. Nodes already quantized (MatMulNBits, MatMulInteger, QLinearMatMul, weights fed by
    DequantizeLinear) are left alone.
 2. The weight must be a constant 2-D float32/float16 tensor: the second MatMul input, or Gemm's B
    with transA=0 (transB=1 means the stored tensor is Wᵀ). It may be an initializer or a Constant
    node, seen through Identity, 2-D Transpose and float Casts. Activation x activation products stay.
    A Conv's weight must be a constant 4-D [C_out, C_in/g, kh, kw] (any strides, pads, dilations,
    auto_pad, bias, group g); its layer is the matrix W[C_in/g·kh·kw, C_out] of the input patches
    (a grouped or depthwise one takes dense grids only, see lower.check_conv; 1-D and 3-D
    convolutions are reported and kept).
 3. Weights with NaN or Inf are refused, by name.
 4. Include / exclude patterns, layers writing a graph output (lm_head, classifiers) and tiny
    weights follow the select config.
 5. A weight shared by several nodes is compressed once; if any other node reads it or the
    tensors it is stored in (a subgraph, a table read in another layout), rewriting would add
    bytes, so it stays.
 6. Embedding tables (constant 2-D data of a Gather along axis 0) are layers too when
    ``select.embeddings`` says so (by default: in an allocation): the table is stored as Wᵀ
    (rows of the table = columns of W, blocks along the embedding dimension). When an lm_head
    reads the same stored tensor as Wᵀ (MatMul through a Transpose, or Gemm transB=1), table and
    lm_head are one tied layer: compressed once, read by both. Otherwise tables are reported and kept.
"""
from __future__ import annotations

import logging

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from lrqgraph.graph import WeightSource, constant_values, dataflow_graph, node_label, resolve_constant
from lrqgraph.passmanager import Context, Pass, PassResult, register_analysis, register_pass
from lrqgraph.plan import Layer

log = logging.getLogger(__name__)

QUANTIZED_OPS = {"MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "MatMulBnb4", "QGemm", "ConvInteger", "QLinearConv"}
SUPPORTED_DTYPES = (np.float32, np.float16)

__all__ = ["Layer", "constant_values", "discover_layers"]


def _producer_op(tensor: gs.Tensor) -> str | None:
    return tensor.inputs[0].op if len(tensor.inputs) == 1 else None


def _classify(node: gs.Node, graph_outputs: set[str], select) -> tuple[WeightSource | None, bool, str]:
    """(weight source or None, transposed, reason to skip or '') for one MatMul/Gemm/Conv node."""
    if len(node.inputs) < 2:
        return None, False, "malformed node (fewer than two inputs)"
    weight = node.inputs[1]
    producer = _producer_op(weight)
    if producer in ("DequantizeLinear", "MatMulNBits") or producer in QUANTIZED_OPS:
        return None, False, f"already quantized (weight comes from {producer})"
    source = resolve_constant(weight)
    if source is None:
        return None, False, "weight is not a constant (activation x activation product)"
    transposed = False
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None, False, "Gemm with transA=1 is not rewritten"
        transposed = bool(node.attrs.get("transB", 0))
    shape = source.shape
    if node.op == "Conv":
        if len(shape) != 4:
            return source, transposed, (f"Conv weight is {len(shape)}-D; only 2-D convolutions (4-D weights) "
                                        f"are rewritten")
        group = int(node.attrs.get("group", 1))
        if group < 1 or shape[0] % group:
            return source, transposed, f"Conv group={group} does not divide its {shape[0]} output channels"
    elif len(shape) != 2:
        return source, transposed, f"weight is {len(shape)}-D; only 2-D weights are rewritten"
    if source.dtype not in SUPPORTED_DTYPES or source.stored_dtype not in SUPPORTED_DTYPES:
        return source, transposed, (f"weight dtype {source.stored_dtype} is not supported "
                                    f"(float32/float16 only)")
    if any(o.name in graph_outputs for o in node.outputs) and select.keep_output_layers:
        return source, transposed, "writes a graph output (lm_head/classifier kept by default)"
    if source.size < select.min_params:
        return source, transposed, f"tiny ({source.size} < {select.min_params} parameters)"
    if not np.isfinite(source.values).all():
        return source, transposed, "weight contains NaN or Inf: layer refused"
    return source, transposed, ""


@register_analysis("layers", config=("select", "allocate"))
def discover_layers(ctx: Context, config) -> list[Layer]:
    graph = ctx.model.graph
    select = config.select.resolved(config.allocate.active)
    order = list(nx.topological_sort(dataflow_graph(graph)))
    graph_outputs = {o.name for o in graph.outputs}
    layers: dict[str, Layer] = {}
    tables: dict[str, Layer] = {}
    result: list[Layer] = []
    for idx in order:
        node = graph.nodes[idx]
        label = node_label(node, idx)
        if node.op in QUANTIZED_OPS:
            result.append(Layer(label, node.op, "", [node], [label], reason="already quantized"))
            continue
        if node.op == "Gather":
            table = _embedding_table(node, label, select)
            if table is None:
                continue
            if table.rewrite and table.weight in tables:  # one table, several lookups
                tables[table.weight].nodes.append(node)
                tables[table.weight].labels.append(label)
                continue
            if table.rewrite:
                tables[table.weight] = table
            result.append(table)
            continue
        if node.op not in select.op_types or node.domain not in ("", "ai.onnx", None):
            continue
        source, transposed, reason = _classify(node, graph_outputs, select)
        weight = node.inputs[1].name if source is not None else ""
        stored_shape = source.shape if source is not None else None
        kernel = stored_shape if stored_shape is not None and node.op == "Conv" and len(stored_shape) == 4 else ()
        if kernel:  # the matrix of a convolution: input patches (C_in·kh·kw) x output channels
            shape = (int(np.prod(kernel[1:])), kernel[0])
        else:
            shape = tuple(stored_shape[::-1] if transposed else stored_shape) if stored_shape is not None else ()
        if not reason and select.include and not select.matches(select.include, label, weight):
            reason = "not matched by --include"
        if not reason and select.exclude and select.matches(select.exclude, label, weight):
            reason = "matched by --exclude"
        if weight and not reason and weight in layers:
            shared = layers[weight]
            if shared.transposed != transposed or shared.op != node.op:
                shared.rewrite, shared.reason = False, "weight shared by nodes with different layouts"
            shared.nodes.append(node)
            shared.labels.append(label)
            continue
        layer = Layer(label, node.op, weight, [node], [label], shape, transposed,
                      str(source.dtype) if source is not None else "", source, rewrite=not reason, reason=reason,
                      kernel=kernel)
        if weight and not reason:
            layers[weight] = layer
        result.append(layer)
    result = _tie_tables(result)
    for layer in result:
        if layer.rewrite:
            _refuse_tied_weight(layer)
    return result


def _embedding_table(node: gs.Node, label: str, select) -> Layer | None:
    """Rule 6 for one Gather: its table as a layer (maybe kept, with the reason); None when the
    Gather reads no constant 2-D table worth reporting."""
    source = resolve_constant(node.inputs[0]) if node.inputs else None
    if source is None or len(source.shape) != 2 or source.size < select.min_params:
        return None
    reason = ""
    if not select.embeddings:
        reason = "embedding table (Gather) kept: tables join an allocation (--target-*) or --embeddings"
    elif node.attrs.get("axis", 0) != 0:
        reason = "Gather along axis 1 is not a row lookup"
    elif source.dtype not in SUPPORTED_DTYPES or source.stored_dtype not in SUPPORTED_DTYPES:
        reason = f"table dtype {source.stored_dtype} is not supported (float32/float16 only)"
    elif not np.isfinite(source.values).all():
        reason = "table contains NaN or Inf: layer refused"
    elif select.include and not select.matches(select.include, label, node.inputs[0].name):
        reason = "not matched by --include"
    elif select.exclude and select.matches(select.exclude, label, node.inputs[0].name):
        reason = "matched by --exclude"
    vocab, dim = source.shape
    return Layer(label, "Gather", node.inputs[0].name, [node], [label], (dim, vocab), True, str(source.dtype),
                 source, rewrite=not reason, reason=reason)


def _tie_tables(result: list[Layer]) -> list[Layer]:
    """An lm_head whose weight is Wᵀ = the stored table of an embedding layer joins that layer
    (the tied layer keeps the table's name, its place, and both chains to the stored tensor)."""
    tables = {id(layer.source.root): layer for layer in result if layer.op == "Gather" and layer.rewrite}
    tied = []
    for layer in result:
        table = tables.get(id(layer.source.root)) if layer.source is not None and layer.op != "Gather" else None
        # the lm_head must read the table as Wᵀ: the Transposes on either chain (the table stored as
        # [vocab, hidden] under a transposed lm_head, or as the lm_head's [hidden, vocab] weight
        # read by the Gather through a Transpose, as onnxruntime-genai's builder writes it)
        flips = sum(n.op == "Transpose" for n in (*table.source.chain, *layer.source.chain)) + layer.transposed \
            if table else 0
        if table is None or not layer.rewrite or flips % 2 == 0:
            continue
        table.nodes[:0], table.labels[:0] = layer.nodes, layer.labels  # the MatMuls first: H is theirs
        table.op = f"{layer.op}+Gather"
        table.source = WeightSource(table.source.root, table.source.stored, table.source.chain + layer.source.chain,
                                    path=table.source.chain)
        tied.append(id(layer))
    return [layer for layer in result if id(layer) not in tied]


def _refuse_tied_weight(layer: Layer) -> None:
    """Rule 5: the stored tensor and every step to the layer must be read by nothing else."""
    mine = {id(n) for n in layer.nodes} | {id(n) for n in layer.source.chain}
    for tensor in layer.source.tensors():
        others = [n for n in tensor.outputs if id(n) not in mine]
        if others and layer.rewrite:
            layer.rewrite = False
            layer.reason = (f"weight '{tensor.name}' also read by {others[0].op} node "
                            f"'{others[0].name or '(unnamed)'}'; a rewrite would keep the original and add bytes")
            return


@register_pass
class Discover(Pass):
    """Compute the ``layers`` analysis and log the verdicts (the report reads the analysis)."""

    name = "discover"

    def run(self, ctx: Context) -> PassResult:
        layers = ctx.analysis("layers")
        ctx.discovered = list(layers)
        for layer in layers:
            if "NaN" in layer.reason:
                log.warning("layer '%s' refused: its weight '%s' contains NaN or Inf", layer.name, layer.weight)
        count = sum(layer.rewrite for layer in layers)
        log.info("discover: %d of %d layers selected for rewriting", count, len(layers))
        return PassResult(modified=False)
