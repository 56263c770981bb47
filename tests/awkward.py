"""A corpus of small graphs written the way exporters really write them (random weights: structure
only). Each builder returns (model, the number of layers `lrqgraph optimize` rewrites by default,
the number with --output-layers; WITH_TABLES: with --embeddings too); None means the command must
refuse the model."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION, io
from builders import weight as _gaussian

K, N = 96, 80


def weight(k: int, n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Seeded Gaussian weights scaled by 1/sqrt(k), so activations keep their size layer to layer."""
    return (_gaussian(k, n, seed) / np.sqrt(k)).astype(dtype)


def _model(nodes, inputs, outputs, inits, opset=17, dtype_inits=None) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()] + list(dtype_inits or [])
    graph = helper.make_graph(nodes, "g", inputs, outputs, tensors)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = IR_VERSION
    return m


def unnamed_shared_weight():
    """Two unnamed MatMul nodes read one weight (their labels must not collide)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h1"]), helper.make_node("Relu", ["h1"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["h2"]), helper.make_node("Relu", ["h2"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", K])], {"W": weight(K, K)}), 1, 1


def unnamed_distinct_weights():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Tanh", ["h1"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["h2"]), helper.make_node("Relu", ["h2"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", N])], {"W1": weight(K, K), "W2": weight(K, N, 1)}), 2, 2


def constant_node_weight():
    """The weight is the value of a Constant node, not an initializer."""
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight(K, N), "Wv"))
    nodes = [const, helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", N])], {}), 1, 1


def transposed_weight():
    """MatMul(x, Transpose(Wᵀ)): the stored tensor is the transpose (older torch exports)."""
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", N])], {"Wt": np.ascontiguousarray(weight(K, N).T)}), 1, 1


def cast_weight():
    """A float16 weight cast up to float32 (mixed-precision export)."""
    nodes = [helper.make_node("Cast", ["W16"], ["W"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", N])], {"W16": weight(K, N, dtype=np.float16)}), 1, 1


def identity_weight():
    nodes = [helper.make_node("Identity", ["W0"], ["W"]), helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", N])], {"W0": weight(K, N)}), 1, 1


def nothing_to_rewrite():
    """Only an activation x activation product."""
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "xt"], ["h"], name="act"), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", "b"])], {}), 0, 0


def only_tiny_weights():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", ["b", 16])], [io("y", ["b", 8])], {"W": weight(16, 8)}), 0, 0


def gemm_variants():
    """Gemm transB=1 with a vector bias, Gemm with alpha/beta and a matrix bias input, Gemm without bias."""
    nodes = [helper.make_node("Gemm", ["x", "B1", "C1"], ["h1"], name="g1", transB=1),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "B2", "c"], ["h2"], name="g2", alpha=0.5, beta=2.0),
             helper.make_node("Tanh", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "B3"], ["h3"], transB=1),
             helper.make_node("Relu", ["h3"], ["y"])]
    inits = {"B1": np.ascontiguousarray(weight(K, N).T), "C1": weight(1, N, 5).reshape(N),
             "B2": weight(N, N, 1), "B3": np.ascontiguousarray(weight(N, K, 2).T)}
    return _model(nodes, [io("x", ["m", K]), io("c", ["m", N])], [io("y", ["m", K])], inits), 3, 3


def opset13():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", N])], {"W": weight(K, N)}, opset=13), 1, 1


def opset21():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", N])], {"W": weight(K, N)}, opset=21), 1, 1


def fp16_model():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", ["b", K], TensorProto.FLOAT16)], [io("y", ["b", N], TensorProto.FLOAT16)],
                  {"W": weight(K, N, dtype=np.float16)}), 1, 1


def nan_weight():
    w = weight(K, N)
    w[3, 4] = np.nan
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"]),
             helper.make_node("MatMul", ["y", "V"], ["z0"], name="ok"), helper.make_node("Relu", ["z0"], ["z"])]
    return _model(nodes, [io("x", ["b", K])], [io("z", ["b", K])], {"W": w, "V": weight(N, K, 1)}), 1, 1


def two_outputs():
    """Two graph outputs, one written straight by a MatMul (an output layer)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"]),
             helper.make_node("MatMul", ["y", "V"], ["logits"], name="head")]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", N]), io("logits", ["b", K])],
                  {"W": weight(K, N), "V": weight(N, K, 1)}), 1, 2


def weight_read_by_other_node():
    """The weight also feeds an Add (a non-layer reader): rewriting would add bytes."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Add", ["W", "W"], ["w2"], name="reuse"),
             helper.make_node("MatMul", ["r", "V"], ["y0"], name="mm2"), helper.make_node("Relu", ["y0"], ["y"])]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", K]), io("w2", [K, N])],
                  {"W": weight(K, N), "V": weight(N, K, 1)}), 1, 1


def tied_embedding():
    """A Gather and an lm_head MatMul read the same table through a Transpose (tied embeddings)."""
    vocab, dim = 200, 64
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "P"], ["h0"], name="proj"), helper.make_node("Tanh", ["h0"], ["h"]),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "Et"], ["logits"], name="lm_head")]
    return _model(nodes, [io("ids", ["b", "s"], TensorProto.INT64)], [io("logits", ["b", "s", vocab])],
                  {"E": weight(vocab, dim), "P": weight(dim, dim, 3)}), 1, 1


def if_subgraph():
    """An If whose branches multiply by an outer weight, beside a plain layer."""
    def branch(name, scale):
        return helper.make_graph([helper.make_node("MatMul", ["r", "S"], [f"{name}_h"]),
                                  helper.make_node("Mul", [f"{name}_h", f"{name}_k"], [f"{name}_o"])],
                                 name, [], [io(f"{name}_o", ["b", N])],
                                 [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_k")])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", 1.0),
                              else_branch=branch("else", -1.0))]
    return _model(nodes, [io("x", ["b", K]), io("cond", [], TensorProto.BOOL)], [io("y", ["b", N])],
                  {"W": weight(K, N), "S": weight(N, N, 1)}), 1, 1


def weight_shared_with_different_layouts():
    """One tensor is read by a MatMul as W and by a Gemm with transB=1 as Wᵀ."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W"], ["y0"], name="gemm", transB=1), helper.make_node("Relu", ["y0"], ["y"])]
    return _model(nodes, [io("x", ["m", K])], [io("y", ["m", K])], {"W": weight(K, K)}), 0, 0


def matmul_3d_weight():
    """A batched 3-D constant operand is not a layer weight."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="bmm"), helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [io("x", [2, "s", K])], [io("y", [2, "s", N])], {"W": weight(2 * K, N).reshape(2, K, N)}), 0, 0


def loop_body_layer():
    """A Loop whose body holds its own MatMul; the main-graph layer is rewritten, the body left alone."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["acc_in", "L"], ["mm_out"]), helper.make_node("Tanh", ["mm_out"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [io("i", [], TensorProto.INT64), io("cond_in", [], TensorProto.BOOL), io("acc_in", ["b", N])],
        [io("cond_out", [], TensorProto.BOOL), io("acc_out", ["b", N])],
        [numpy_helper.from_array((weight(N, N, 4) / np.sqrt(N)).astype(np.float32), "L")])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Loop", ["trips", "", "r"], ["y"], name="loop", body=body)]
    return _model(nodes, [io("x", ["b", K])], [io("y", ["b", N])],
                  {"W": weight(K, N), "trips": np.array(2, np.int64)}), 1, 1


# layers rewritten with --output-layers --embeddings where it differs from --output-layers alone
# (the tied table and its lm_head become one layer beside proj)
WITH_TABLES = {"tied_embedding": 2}

CORPUS = [unnamed_shared_weight, unnamed_distinct_weights, constant_node_weight, transposed_weight, cast_weight,
          identity_weight, nothing_to_rewrite, only_tiny_weights, gemm_variants, opset13, opset21, fp16_model,
          nan_weight, two_outputs, weight_read_by_other_node, tied_embedding, if_subgraph,
          weight_shared_with_different_layouts, matmul_3d_weight, loop_body_layer]
