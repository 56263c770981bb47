"""ModelState: the digest that keys cached statistics, names that never collide, constant bytes."""
import numpy as np
from onnx import helper, numpy_helper

from lrqgraph.model import ModelState

import builders


def test_digest_is_stable_and_sees_weights_attributes_and_structure():
    base = ModelState(builders.matmul_model()).digest()
    assert base == ModelState(builders.matmul_model()).digest()
    changed = builders.matmul_model()
    w = numpy_helper.to_array(changed.graph.initializer[0]).copy()
    w[5, 7] += 1e-3
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    assert ModelState(changed).digest() != base
    gemm_a, gemm_b = builders.gemm_model(alpha=1.0), builders.gemm_model(alpha=0.5)
    assert ModelState(gemm_a).digest() != ModelState(gemm_b).digest()
    relu_to_tanh = builders.matmul_model()
    relu_to_tanh.graph.node[1].op_type = "Tanh"
    assert ModelState(relu_to_tanh).digest() != base


def test_digest_hashes_constant_node_values():
    def model(value):
        const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(value, "v"))
        nodes = [const, helper.make_node("MatMul", ["x", "W"], ["y"])]
        return builders.model(nodes, [builders.io("x", ["b", 4])], [builders.io("y", ["b", 3])], {})
    a = np.ones((4, 3), np.float32)
    assert ModelState(model(a)).digest() != ModelState(model(a * 2)).digest()


def test_unique_names_avoid_every_node_and_tensor_name():
    state = ModelState(builders.matmul_model())
    taken = {"mm", "relu", "x", "W", "h", "y"}
    names = [state.unique_name(n) for n in ("mm", "mm", "W", "new")]
    assert names[0] not in taken and names[1] not in taken and names[0] != names[1]
    assert names[2] != "W" and names[3] == "new"


def test_constant_bytes_count_initializers_and_constant_nodes():
    const = helper.make_node("Constant", [], ["C"], value=numpy_helper.from_array(np.ones((8, 8), np.float32), "c"))
    m = builders.matmul_model(16, 8)
    m.graph.node.insert(0, const)
    assert ModelState(m).constant_bytes() == 16 * 8 * 4 + 8 * 8 * 4
