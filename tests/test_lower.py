"""lower: the rewritten graph computes X·Ŵ (+ Gemm's alpha, beta, bias) exactly as planned, with
names, shared weights and storage accounting preserved, for both lowerings and every method."""
import numpy as np
import onnx
import pytest

import lrqgraph
from lrqgraph import FactorizeConfig, OptimizeConfig, SelectConfig
from lrqgraph.numerics import QuantizedTensor, QuantSpec, quantize
from lrqgraph.runtime import session

import builders

# onnxruntime's kernels accumulate in a different order than numpy: measured max relative
# deviation on these shapes is ~1e-6 (fp32); 1e-4 leaves room without hiding a wrong layout.
RTOL = 1e-4
# accuracy_level=0 keeps MatMulNBits in float for every code width (8-bit defaults to int8 activations)
PIPE = "discover,factorize,lower({}),cleanup"
EXACT_PIPE = {"ort": "discover,factorize,lower(ort,accuracy_level=0),cleanup", "std": PIPE.format("std")}
METHODS = [dict(method="rtn"), dict(method="rtn", symmetric=False, block_size=64),
           dict(method="svd", rank=16), dict(method="lplr", rank=32, bits=8, symmetric=False),
           dict(method="lplr", rank=16, bits=2, block_size=16),
           dict(method="lplr", rank=16, init="svd", refits=2, symmetric=False),
           dict(method="qlr", rank=16, bits=2, lr_bits=8, iters=2), dict(method="gptq", bits=4)]


def run(model, lowering, **factorize):
    cfg = OptimizeConfig(factorize=FactorizeConfig(**factorize), select=SelectConfig(min_params=1))
    return lrqgraph.run(model, cfg, passes=EXACT_PIPE[lowering])


def planned_weight(model, **factorize):
    """Ŵ as the factorize pass plans it, from a pipeline that stops before lowering."""
    cfg = OptimizeConfig(factorize=FactorizeConfig(**factorize), select=SelectConfig(min_params=1))
    ctx = lrqgraph.Context(lrqgraph.model.ModelState(model), cfg)
    lrqgraph.PassManager("discover,factorize").run(ctx)
    (rep,) = [p.rep for p in ctx.plans.values()]
    return rep.dequantize()


def outputs(model, feeds, name="h"):
    """Run and also expose the pre-Relu tensor, so negative values are compared too."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    return session(model.SerializeToString()).run([name], feeds)[0]


def assert_close(actual, expected):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= RTOL * scale


@pytest.mark.parametrize("lowering", ["ort", "std"])
@pytest.mark.parametrize("factorize", METHODS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_matmul_computes_the_planned_weight(lowering, factorize):
    model = builders.matmul_model(200, 96, batch_dims=("b", "s"))  # K not a multiple of the block
    if lowering == "ort" and factorize.get("bits") not in (None, 2, 3, 4, 8):
        pytest.skip("no MatMulNBits kernel for these bits")
    result = run(model, lowering, **factorize)
    onnx.checker.check_model(result.model)
    x = np.random.default_rng(0).standard_normal((2, 5, 200)).astype(np.float32)  # 3-D activations
    assert_close(outputs(result.model, {"x": x}), x @ planned_weight(model, **factorize))
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert [o.name for o in result.model.graph.output] == ["y"]


@pytest.mark.parametrize("lowering", ["ort", "std"])
@pytest.mark.parametrize("trans_b,alpha,beta,bias", [(1, 1.0, 1.0, "vector"), (0, 0.5, 2.0, "vector"),
                                                     (1, 1.5, 0.25, "input"), (0, 1.0, 1.0, None)])
def test_gemm_keeps_alpha_beta_and_bias(lowering, trans_b, alpha, beta, bias):
    model = builders.gemm_model(96, 64, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias)
    result = run(model, lowering)
    assert not any(n.op_type == "Gemm" for n in result.model.graph.node)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((7, 96)).astype(np.float32)}
    expected = alpha * feeds["x"] @ planned_weight(model)
    if bias == "vector":
        expected += beta * onnx.numpy_helper.to_array(model.graph.initializer[1])
    elif bias == "input":
        feeds["c"] = rng.standard_normal((7, 64)).astype(np.float32)
        expected += beta * feeds["c"]
    assert_close(outputs(result.model, feeds), expected)


@pytest.mark.parametrize("lowering", ["ort", "std"])
def test_shared_weight_is_stored_once(lowering):
    result = run(builders.shared_weight_model(), lowering)
    codes = [t for t in result.model.graph.initializer if t.name.endswith(".q")]
    assert len(codes) == 1
    consumers = [n for n in result.model.graph.node if codes[0].name in n.input]
    assert len(consumers) == 2
    assert "W" not in {t.name for t in result.model.graph.initializer}


@pytest.mark.parametrize("lowering", ["ort", "std"])
def test_stored_bytes_match_the_bits_accounting(lowering):
    # K a multiple of the block: MatMulNBits stores exactly the accounted bits; the std lowering
    # stores 4-bit codes in int4 with the same scales.
    result = run(builders.matmul_model(256, 64), lowering)
    (entry,) = [e for e in result.report["layers"] if e.get("action") == "rewrite"]
    expected = quantize(np.zeros((256, 64), np.float32), QuantSpec(4, 32, True)).storage_bits() / 8
    assert entry["stored_bytes"] == expected
    assert result.report["model"]["rewritten_bpw"] == 5.0


def test_std_lowering_converts_old_opsets_and_uses_only_standard_ops():
    result = run(builders.matmul_model(opset=17), "std")
    assert lrqgraph.io.default_opset(result.model) == 21
    assert all(n.domain in ("", "ai.onnx") for n in result.model.graph.node)
    assert result.model.ir_version >= 10


def test_8bit_codes_default_to_int8_activations_on_ort():
    cfg = OptimizeConfig(factorize=FactorizeConfig(bits=8))
    model = lrqgraph.optimize(builders.matmul_model(), cfg, passes="discover,factorize,lower(ort),cleanup")
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4


@pytest.mark.parametrize("method", ["kashin", "kmeans"])
def test_codebook_methods_need_the_native_ops(method):
    for lowering in ("ort", "std"):  # refused with the config, before any work
        with pytest.raises(lrqgraph.LrqError, match=f"method {method} runs only with --lowering lrq"):
            OptimizeConfig(factorize=FactorizeConfig(method=method), lowering=lowering)
    cfg = OptimizeConfig(factorize=FactorizeConfig(method=method), lowering="lrq")
    ctx = lrqgraph.Context(lrqgraph.model.ModelState(builders.matmul_model()), cfg)
    lrqgraph.PassManager("discover,factorize").run(ctx)
    entry = builders.entry(ctx, "mm")
    assert entry["method"] == method and entry["bpw"] < 4.1 and entry["rel_error"] < 0.2
    for target in ("ort", "std"):  # a pipeline that lowers them elsewhere is refused by lower's rules
        with pytest.raises(lrqgraph.LrqError, match="gives a codebook weight, which only --lowering lrq runs"):
            lrqgraph.PassManager(f"lower({target})").run(ctx)


def test_ort_lowering_rejects_bits_without_a_kernel():
    with pytest.raises(lrqgraph.LrqError, match="5-bit codes have no MatMulNBits kernel"):
        run(builders.matmul_model(), "ort", bits=5)
    with pytest.raises(lrqgraph.LrqError, match="3-bit codes have no MatMulNBits kernel"):  # asymmetric: not widened
        run(builders.matmul_model(), "ort", bits=3, symmetric=False)


@pytest.mark.parametrize("bits", [2, 3])
def test_ort_stores_narrow_codes_and_runs_them_on_the_4bit_kernel(bits):
    model = builders.matmul_model(200, 96, batch_dims=("b", "s"))  # K not a multiple of the block
    result = run(model, "ort", bits=bits, block_size=32)
    (node,) = [n for n in result.model.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in node.attribute}["bits"] == 4
    codes = [t for t in result.model.graph.initializer if ".q" in t.name]  # (3 bits: a 2-bit and a 1-bit stream)
    assert {t.data_type for t in codes} == {onnx.TensorProto.UINT8}
    assert sum(len(t.raw_data) for t in codes) == 96 * 7 * 32 * bits // 8
    (entry,) = [e for e in result.report["layers"] if e.get("action") == "rewrite"]
    expected = quantize(np.zeros((200, 96), np.float32), QuantSpec(bits, 32, True)).storage_bits() / 8
    assert entry["stored_bytes"] == expected  # what the allocation counts is what the file holds
    x = np.random.default_rng(0).standard_normal((2, 5, 200)).astype(np.float32)
    assert_close(outputs(result.model, {"x": x}), x @ planned_weight(model, bits=bits, block_size=32))


def test_output_is_deterministic():
    a = lrqgraph.optimize(builders.matmul_model(), passes="discover,factorize(method=lplr,rank=16),lower,cleanup")
    b = lrqgraph.optimize(builders.matmul_model(), passes="discover,factorize(method=lplr,rank=16),lower,cleanup")
    assert a.SerializeToString() == b.SerializeToString()


def test_provenance_is_recorded_in_metadata():
    meta = {p.key: p.value for p in lrqgraph.optimize(builders.matmul_model()).metadata_props}
    assert meta["lrqgraph.lowering"] == "ort" and "factorize" in meta["lrqgraph.pipeline"]
    assert meta["lrqgraph.version"] == lrqgraph.__version__


def _grid(k, n, bits, block, rng, symmetric=True):
    return QuantizedTensor(codes=rng.integers(0, 1 << bits, (k, n), dtype=np.uint8),
                           scales=(rng.random((-(-k // block), n)) * 0.1).astype(np.float16),
                           zero_points=None if symmetric else rng.integers(0, 1 << bits, (-(-k // block), n),
                                                                           dtype=np.uint8),
                           bits=bits, block_size=block)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("form", ["dense", "asymmetric", "rotated", "q+lr"])
def test_folded_weight_is_the_planned_weight(bits, form):
    """lower.FOLD: the codes stored as they are, the float weight rebuilt by ops onnxruntime folds
    at load; K = 200 leaves a part block. The file holds no more than the codes' accounted bytes
    (and the few shapes and tables the rebuilding needs)."""
    from lrqgraph.numerics import Representation
    from lrqgraph.numerics.rotation import Rotation
    from lrqgraph.passes.lower import FOLD, layer_model
    rng = np.random.default_rng(bits)
    q = _grid(200, 48, bits, 32, rng, symmetric=form != "asymmetric")
    chains = ((q,), (_grid(200, 8, 4, 16, rng), _grid(8, 48, 8, 8, rng))) if form == "q+lr" else ((q,),)
    rep = Representation(chains, "rtn", rotation=Rotation(200, 3) if form == "rotated" else None)
    model = layer_model(rep, FOLD, None)
    assert not any(n.op_type == "MatMulNBits" for n in model.graph.node)
    x = rng.standard_normal((5, 200)).astype(np.float32)
    assert_close(session(model.SerializeToString()).run(None, {"x": x})[0], x @ rep.dequantize())
    stored = sum(len(t.raw_data) for t in model.graph.initializer if ".q" in t.name or ".zp" in t.name)
    codes = sum(q.storage_bits() for chain in chains for q in chain) / 8  # with scales: an upper bound
    assert 0 < stored <= codes
