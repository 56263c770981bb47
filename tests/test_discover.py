"""discover: which layers are selected, and the reason given for every layer left alone."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

import lrqgraph
from lrqgraph import OptimizeConfig, SelectConfig
from lrqgraph.model import ModelState
from lrqgraph.passmanager import Context

import builders


def layers(model, **select):
    ctx = Context(ModelState(model), OptimizeConfig(select=SelectConfig(**select)))
    return {layer.name: layer for layer in ctx.analysis("layers")}


def test_matmul_with_constant_weight_is_selected():
    found = layers(builders.matmul_model(128, 48))
    assert found["mm"].rewrite and found["mm"].shape == (128, 48) and found["mm"].weight == "W"


def test_gemm_transb_weight_is_seen_in_matmul_layout():
    found = layers(builders.gemm_model(128, 48, trans_b=1))
    assert found["gemm"].rewrite and found["gemm"].transposed and found["gemm"].shape == (128, 48)
    np.testing.assert_array_equal(found["gemm"].weight_matrix(), builders.weight(128, 48))


def test_gemm_transa_is_left_alone():
    m = builders.gemm_model()
    m.graph.node[0].attribute.append(helper.make_attribute("transA", 1))
    assert "transA=1" in layers(m)["gemm"].reason


def test_activation_products_are_reported_not_rewritten():
    found = layers(builders.activation_matmul_model())
    assert not found["act_mm"].rewrite and "not a constant" in found["act_mm"].reason


def test_shared_weight_is_one_layer_with_two_nodes():
    found = layers(builders.shared_weight_model())
    assert list(found) == ["mm1"] and [n.name for n in found["mm1"].nodes] == ["mm1", "mm2"]


def test_tied_embedding_weight_is_kept_with_reason():
    found = layers(builders.tied_weight_model(), min_params=16)
    assert not found["tied_mm"].rewrite and "also read by Gather" in found["tied_mm"].reason
    assert "embedding" in found["embed"].reason


def test_nan_weight_is_refused_by_name():
    m = builders.matmul_model()
    w = builders.weight(128, 64)
    w[3, 4] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    found = layers(m)
    assert not found["mm"].rewrite and "NaN or Inf" in found["mm"].reason


def test_tiny_and_output_layers_follow_the_select_config():
    assert "tiny" in layers(builders.matmul_model(8, 8))["mm"].reason
    m = builders.matmul_model()
    m.graph.node[1].op_type = "Identity"
    m.graph.node.pop()
    m.graph.node[0].output[0] = "y"
    assert "graph output" in layers(m)["mm"].reason
    assert layers(m, keep_output_layers=False)["mm"].rewrite


def test_include_and_exclude_patterns():
    assert "--exclude" in layers(builders.matmul_model(), exclude=("^mm$",))["mm"].reason
    assert "--include" in layers(builders.matmul_model(), include=("other",))["mm"].reason
    assert layers(builders.matmul_model(), include=("W",))["mm"].rewrite


def test_already_quantized_weights_are_skipped():
    k, n = 128, 64
    q = numpy_helper.from_array(np.zeros((k, n), np.uint8), "Wq")
    s = numpy_helper.from_array(np.ones(n, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"], axis=1),
             helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [builders.io("x", ["b", k])], [builders.io("y", ["b", n])], [q, s])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert "already quantized" in layers(m)["mm"].reason


def test_constant_node_weights_are_found():
    m = builders.matmul_model()
    w = m.graph.initializer.pop()
    m.graph.node.insert(0, helper.make_node("Constant", [], ["W"], value=w))
    assert layers(m)["mm"].rewrite


def test_fp16_weights_are_rewritten_with_fp16_scales():
    m = builders.matmul_model(dtype=np.float16)
    result = lrqgraph.run(m, passes="discover,factorize,lower,cleanup,verify")
    scales = [t for t in result.model.graph.initializer if t.name.endswith(".scales")]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
    assert result.report["verify"]["outputs"]["y"]["cosine_min"] > 0.99
