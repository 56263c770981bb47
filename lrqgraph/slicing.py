"""The part of a graph that some inputs can reach: what changes when only they change.

Replacing one weight of a decoder changes nothing upstream of its MatMul. ``downstream_slice``
cuts out the nodes reachable from chosen graph inputs as a model of its own, whose inputs are the
tensors those nodes read from the rest of the graph (the *boundary*: e.g. the residual stream
where the cut falls, position embeddings, masks) besides graph inputs and initializers. Fed the
boundary's values from one run of the whole model, it computes the same outputs for any values of
the chosen inputs, running only the nodes after the cut. ``with_outputs`` taps intermediate
tensors (the boundary's values, a layer's inputs for calibration).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx


@dataclass
class Slice:
    model: onnx.ModelProto  # boundary inputs untyped until ``typed``
    boundary: list[str]     # intermediate tensors of the whole graph the slice takes as inputs
    nodes: int              # nodes in the slice

    def typed(self, values: dict[str, np.ndarray]) -> onnx.ModelProto:
        """The slice with each boundary input typed as its value (element type and rank)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for value in model.graph.input:
            if value.name in values:
                array = values[value.name]
                value.CopyFrom(onnx.helper.make_tensor_value_info(
                    value.name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), [None] * array.ndim))
        return model


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """Whether a node carries a graph attribute (If, Loop, Scan): their bodies read outer values
    by name, which a slice built from node inputs alone would miss."""
    graphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in graphs for n in graph.node for a in n.attribute)


def downstream_slice(model: onnx.ModelProto, changed: set[str], output: str) -> Slice | None:
    """The nodes of ``model`` that read ``changed`` (graph inputs) directly or through other such
    nodes, as a model computing ``output`` from the boundary, the graph inputs those nodes read and
    their initializers; None where ``output`` does not depend on ``changed`` or the graph has
    subgraphs. Nodes keep their order (the graph's is topological)."""
    graph = model.graph
    if has_subgraphs(graph):
        return None
    tainted, nodes = set(changed), []
    for node in graph.node:
        if tainted.intersection(node.input):
            nodes.append(node)
            tainted.update(o for o in node.output if o)
    if output not in tainted:
        return None
    graph_inputs = {i.name: i for i in graph.input}
    initializers = {t.name: t for t in graph.initializer}
    read = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in tainted))
    boundary = [name for name in read if name not in graph_inputs and name not in initializers]
    wanted_inputs = [graph_inputs[name] for name in dict.fromkeys([*changed, *read]) if name in graph_inputs]
    out_info = next(o for o in graph.output if o.name == output)
    sliced = onnx.helper.make_graph(
        nodes, f"{graph.name}_slice",
        [*wanted_inputs, *(onnx.helper.make_value_info(name, onnx.TypeProto()) for name in boundary)],
        [out_info], [initializers[name] for name in read if name in initializers])
    made = onnx.helper.make_model(sliced, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    made.functions.extend(model.functions)
    return Slice(made, boundary, len(nodes))


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``tensors`` only (the input is not modified), so that
    onnxruntime drops what they do not need (a decoder's lm_head and its logits)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(onnx.helper.make_value_info(t, onnx.TypeProto()) for t in sorted(set(tensors)))
    return out
