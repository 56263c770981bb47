"""Decoders with a KV cache (onnxruntime-genai's builder, optimum's exports): which inputs hold
the past keys and values, and the shape each takes for an empty cache (a prompt's first pass).

Synthetic and text-derived inputs feed such a model a past of length 0, with the head count and
head size the attention ops expect. Those come from the graph: the attention op's attributes
(GroupQueryAttention's ``kv_num_heads`` and ``local_window_size``, MultiHeadAttention's
``num_heads``) and the width of its query (the weight of the projection that produces it). Rank-4
inputs named like a past key or value that no attention op reads (attention in standard ops)
keep their declared dims, with symbolic ones other than the batch set to 0 (the past length) or 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

# The input slots of onnxruntime's attention ops that take the past key and value, and the output
# slots that give the present ones.
_PAST_SLOTS = {"GroupQueryAttention": (3, 4), "MultiHeadAttention": (6, 7)}
_PRESENT_SLOTS = {"GroupQueryAttention": (1, 2), "MultiHeadAttention": (1, 2)}


@dataclass(frozen=True)
class PastShape:
    """An empty cache's shape for one past input: [batch, heads, capacity, head_size] (BNSH). The
    capacity is 0 but for sliding-window attention, whose op then keeps a static cache: a buffer
    of at least the window and of the prompt's tokens (zeros; the attention mask says that none
    of it is filled)."""

    heads: int | None
    head_size: int | None
    capacity: int = 0

    def dims(self, batch: int, declared: tuple, tokens: int = 0) -> list[int]:
        """``declared`` (the input's own dims, ints fixed) filled in for an empty past before a
        prompt of ``tokens``."""
        capacity = max(self.capacity, tokens) if self.capacity else 0
        filled = [batch, self.heads, capacity, self.head_size]
        if len(declared) != 4:
            return [batch] + [d if isinstance(d, int) else 0 for d in declared[1:]]
        return [d if isinstance(d, int) and i != 0 else filled[i] if filled[i] is not None else 1
                for i, d in enumerate(declared)]


def past_inputs(graph: gs.Graph) -> dict[str, PastShape]:
    """The graph inputs that hold past keys/values, each with its empty-cache shape."""
    names = {t.name for t in graph.inputs}
    found: dict[str, PastShape] = {}
    for node in graph.nodes:
        slots = _PAST_SLOTS.get(node.op)
        if slots is None or node.domain not in ("com.microsoft", ""):
            continue
        for slot in slots:
            if slot < len(node.inputs) and node.inputs[slot].name in names:
                found[node.inputs[slot].name] = _attention_shape(node)
    for tensor in graph.inputs:  # past_key_values.N.key / .value read by attention in standard ops
        name = tensor.name.lower()
        if tensor.name not in found and "past" in name and ("key" in name or "value" in name) \
                and tensor.shape is not None and len(tensor.shape) == 4:
            found[tensor.name] = PastShape(None, None)
    return found


def _attention_shape(node: gs.Node) -> PastShape:
    heads = int(node.attrs.get("num_heads", 0)) or None
    kv_heads = int(node.attrs.get("kv_num_heads", 0)) or heads if node.op == "GroupQueryAttention" else heads
    width = _width(node.inputs[0]) if node.inputs else None
    head_size = None
    if width and heads:
        packed = node.op == "GroupQueryAttention" and (len(node.inputs) < 2 or not node.inputs[1].name)
        total_heads = heads + 2 * (kv_heads or 0) if packed else heads
        if width % total_heads == 0:
            head_size = width // total_heads
    window = int(node.attrs.get("local_window_size", -1)) if node.op == "GroupQueryAttention" else -1
    return PastShape(kv_heads, head_size, max(window, 0))


def _width(tensor: gs.Tensor, depth: int = 4) -> int | None:
    """The last dimension of ``tensor`` where a projection with a constant weight fixes it."""
    if tensor.shape and isinstance(tensor.shape[-1], int):
        return int(tensor.shape[-1])
    if depth == 0 or not tensor.inputs:
        return None
    node = tensor.inputs[0]
    if node.op == "MatMul" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return int(node.inputs[1].shape[-1])
    if node.op == "Gemm" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return int(node.inputs[1].shape[0 if node.attrs.get("transB", 0) else -1])
    if "N" in node.attrs:  # MatMulNBits and lrqgraph's ops
        return int(node.attrs["N"])
    if node.op in ("Add", "Cast", "Mul") or node.domain == "lrq":
        for inp in node.inputs:
            if not isinstance(inp, gs.Constant):
                width = _width(inp, depth - 1)
                if width:
                    return width
    return None


def present_outputs(graph: gs.Graph) -> set[str]:
    """The graph outputs that are an attention op's present key or value."""
    names = {t.name for t in graph.outputs}
    return {node.outputs[slot].name for node in graph.nodes if node.op in _PRESENT_SLOTS
            for slot in _PRESENT_SLOTS[node.op] if slot < len(node.outputs) and node.outputs[slot].name in names}


def filled(present: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The positions of a present key/value [batch, heads, capacity, head_size] the run wrote: the
    first ``attention_mask``-length ones. A sliding-window layer's buffer is longer, and
    onnxruntime leaves the rest of it unwritten (whatever memory held)."""
    mask = feed.get("attention_mask")
    if mask is None or present.ndim != 4 or np.ndim(mask) < 1:
        return present
    return present[:, :, :np.shape(mask)[-1]]
