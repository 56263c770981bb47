"""Operators that onnxruntime runs but onnx does not know: its contrib ops, some of which its
exporters (onnxruntime-genai's model builder among them) write in the default domain, where
``onnx.checker`` rejects them. A model is valid input when onnx accepts it with those nodes
counted as onnxruntime's."""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import onnx


@functools.lru_cache(maxsize=1)
def _runtime_default_domain_ops() -> frozenset[str]:
    """Default-domain op types that onnxruntime registers beyond the onnx standard."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C
    except ImportError:  # pragma: no cover  (onnxruntime is a dependency)
        return frozenset()
    return frozenset(s.name for s in C.get_all_operator_schema() if s.domain in ("", "ai.onnx"))


def runtime_only(node: onnx.NodeProto, opset: int) -> bool:
    """Whether ``node`` is a default-domain op that onnx lacks at ``opset`` and onnxruntime runs."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _runtime_default_domain_ops():
        return False
    try:
        onnx.defs.get_schema(node.op_type, opset, "")
        return False
    except onnx.defs.SchemaError:
        return True


@contextlib.contextmanager
def as_contrib(model: onnx.ModelProto, opset: int) -> Iterator[int]:
    """Within the block, the graph's runtime-only default-domain nodes (top level and in
    subgraphs) sit in a private domain, which onnx's checker and shape inference leave alone;
    yields how many were moved. The model is restored on exit."""
    domain = "lrqgraph.ortdefault"
    moved = [n for n in _nodes(model.graph) if runtime_only(n, opset)]
    for node in moved:
        node.domain = domain
    if moved:
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    try:
        yield len(moved)
    finally:
        for node in moved:
            node.domain = ""
        if moved:
            del model.opset_import[len(model.opset_import) - 1]


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _nodes(g)
