"""A Llama-shaped decoder graph with seeded random weights written straight to external data,
tensor by tensor (never the whole model in memory): for memory and scale tests, never for judging
quality.

The graph is built with onnx.helper: token embedding (Gather), per layer RMSNorm, q/k/v/o
projections with multi-head softmax attention (no rotary embedding and no causal mask: they add no
weights), RMSNorm and a SwiGLU MLP, then a final RMSNorm and an untied lm_head. Input
``input_ids`` [batch, sequence] (int64); output ``logits`` [batch, sequence, vocab]. Weights are
N(0, 0.02²) float32 (norm gains 1), each tensor drawn from its own seeded generator, and stored in
``<name>.data`` at 4 KiB-aligned offsets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
_ALIGN = 4096
_CHUNK_ROWS = 256  # rows drawn and written at a time: memory stays at a few MB per tensor


@dataclass(frozen=True)
class LlamaShape:
    layers: int = 8
    hidden: int = 4096
    intermediate: int = 11008
    vocab: int = 32000
    heads: int = 32

    @property
    def params(self) -> int:
        per_layer = 4 * self.hidden ** 2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    @property
    def nbytes(self) -> int:
        return 4 * self.params


def write_llama_shaped(path: str | os.PathLike, shape: LlamaShape = LlamaShape(), seed: int = 0) -> Path:
    """Write the model to ``path`` and its weights to ``<path>.data``; returns ``path``."""
    path = Path(path)
    data_name = path.name + ".data"
    builder = _Builder(path.parent / data_name, data_name, seed)
    d, f, v = shape.hidden, shape.intermediate, shape.vocab
    head_dim = d // shape.heads
    with builder:
        h = builder.node("Gather", [builder.weight("embed_tokens", (v, d)), "input_ids"], axis=0)
        for i in range(shape.layers):
            p = f"layers.{i}"
            x = builder.rms_norm(h, f"{p}.input_layernorm", d)
            q, k, val = (builder.matmul(x, f"{p}.self_attn.{n}_proj", (d, d)) for n in "qkv")
            split = builder.shape_const((0, 0, shape.heads, head_dim))
            heads = [builder.node("Transpose", [builder.node("Reshape", [t, split])], perm=(0, 2, 1, 3))
                     for t in (q, k, val)]
            kt = builder.node("Transpose", [heads[1]], perm=(0, 1, 3, 2))
            scores = builder.node("Mul", [builder.node("MatMul", [heads[0], kt]), builder.scalar(head_dim ** -0.5)])
            mixed = builder.node("MatMul", [builder.node("Softmax", [scores], axis=-1), heads[2]])
            merged = builder.node("Reshape", [builder.node("Transpose", [mixed], perm=(0, 2, 1, 3)),
                                              builder.shape_const((0, 0, d))])
            h = builder.node("Add", [h, builder.matmul(merged, f"{p}.self_attn.o_proj", (d, d))])
            x = builder.rms_norm(h, f"{p}.post_attention_layernorm", d)
            gate = builder.matmul(x, f"{p}.mlp.gate_proj", (d, f))
            up = builder.matmul(x, f"{p}.mlp.up_proj", (d, f))
            act = builder.node("Mul", [builder.node("Mul", [gate, builder.node("Sigmoid", [gate])]), up])
            h = builder.node("Add", [h, builder.matmul(act, f"{p}.mlp.down_proj", (f, d))])
        x = builder.rms_norm(h, "norm", d)
        logits = builder.matmul(x, "lm_head", (d, v), output="logits")
    graph = helper.make_graph(builder.nodes, "llama_shaped",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", "sequence", v])],
                              builder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lrqgraph.testing")
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


class _Builder:
    def __init__(self, data_path: Path, data_name: str, seed: int):
        self.data_path, self.data_name, self.seed = data_path, data_name, seed
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def __enter__(self) -> "_Builder":
        self._file = open(self.data_path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def _name(self, op: str) -> str:
        self._count += 1
        return f"/{op.lower()}_{self._count}"

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        name = self._name(op)
        out = output or name + "_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def weight(self, name: str, shape: tuple[int, ...], fill: float | None = None) -> str:
        """An external float32 initializer, drawn (or filled) and written in row chunks."""
        offset = -self._file.tell() % _ALIGN
        self._file.write(b"\0" * offset)
        start = self._file.tell()
        rng = np.random.default_rng([self.seed, len(self.initializers)])
        rows, cols = (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, shape[0])
        for r in range(0, rows, _CHUNK_ROWS):
            n = min(_CHUNK_ROWS, rows - r)
            if fill is None:
                chunk = rng.standard_normal((n, cols), dtype=np.float32)
                chunk *= np.float32(0.02)
            else:
                chunk = np.full((n, cols), fill, np.float32)
            self._file.write(chunk.tobytes())
        tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                                  data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data_name), ("offset", str(start)),
                           ("length", str(4 * rows * cols))):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def matmul(self, x: str, name: str, shape: tuple[int, int], output: str | None = None) -> str:
        return self.node("MatMul", [x, self.weight(name + ".weight", shape)], output=output)

    def rms_norm(self, x: str, name: str, dim: int) -> str:
        mean = self.node("ReduceMean", [self.node("Mul", [x, x])], axes=[-1], keepdims=1)
        root = self.node("Sqrt", [self.node("Add", [mean, self.scalar(1e-6)])])
        return self.node("Mul", [self.node("Div", [x, root]), self.weight(name + ".weight", (dim,), fill=1.0)])

    def scalar(self, value: float) -> str:
        name = self._name("const")
        self.initializers.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
        return name

    def shape_const(self, dims: tuple[int, ...]) -> str:
        name = self._name("shape")
        self.initializers.append(helper.make_tensor(name, TensorProto.INT64, [len(dims)], list(dims)))
        return name
