"""cleanup: drop nodes and initializers nothing reads any more, then sort topologically.

onnx-graphsurgeon's recipe: after disconnecting and inserting, ``cleanup().toposort()``. Graph
inputs are kept even when unused, so the model's signature never changes.
"""
from __future__ import annotations

from lrqgraph.passmanager import Context, Pass, PassResult, register_pass


@register_pass
class Cleanup(Pass):
    name = "cleanup"

    def run(self, ctx: Context) -> PassResult:
        graph = ctx.model.graph
        before = (len(graph.nodes), len(graph.tensors()))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        modified = (len(graph.nodes), len(graph.tensors())) != before
        return PassResult(modified=modified)
