"""lrqgraph's native custom op (lrq::QMatMul) against a numpy reference, through the lrq lowering."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import builders
import lrqgraph
from lrqgraph import FactorizeConfig, OptimizeConfig, SelectConfig
from lrqgraph.model import ModelState
from lrqgraph.passmanager import Context, PassManager
from lrqgraph.runtime import available, session

pytestmark = pytest.mark.skipif(not available(), reason="native ops not built (no C++ compiler or headers "
                                                        "at install time)")


def lowered(model, **factorize):
    cfg = OptimizeConfig(select=SelectConfig(min_params=1), factorize=FactorizeConfig(method="rtn", **factorize),
                         lowering="lrq")
    ctx = Context(ModelState(model), cfg, original=model)
    PassManager("discover,factorize").run(ctx)
    dense = {name: rep.dequantize() for name, rep in ctx.plans.items()}
    PassManager("lower(lrq),cleanup").run(ctx)
    return ctx.model.to_onnx(), dense


@settings(max_examples=40, deadline=None)
@given(k=st.integers(16, 200), n=st.integers(1, 70), bits=st.integers(2, 8), block=st.sampled_from([16, 32, 48, 64, 128]),
       symmetric=st.booleans(), scales=st.sampled_from(["float32", "float16"]), batch=st.sampled_from([1, 3, 17]),
       seed=st.integers(0, 99))
def test_qmatmul_matches_the_dequantized_product(k, n, bits, block, symmetric, scales, batch, seed):
    model, dense = lowered(builders.matmul_model(k, n, seed=seed), bits=bits, block_size=block, symmetric=symmetric,
                           scale_dtype=scales)
    assert any(node.op_type == "QMatMul" and node.domain == "lrq" for node in model.graph.node)
    x = np.random.default_rng(seed).standard_normal((batch, k)).astype(np.float32)
    (y,) = session(model.SerializeToString()).run(None, {"x": x})
    want = np.maximum(x.astype(np.float64) @ dense["W"], 0)
    # float32 sums over K of products: error bounded by K ulps of the largest partial sums
    tol = 1e-5 * (np.abs(x) @ np.abs(dense["W"])).max() + 1e-6
    np.testing.assert_allclose(y, want, rtol=0, atol=tol)


def test_gemm_bias_and_3d_inputs(tmp_path):
    model, dense = lowered(builders.gemm_model(k=96, n=80, bias="vector"), bits=3, block_size=32)
    sess = session(model.SerializeToString())
    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    ref = session(builders.gemm_model(k=96, n=80, bias="vector").SerializeToString())
    got, base = sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0]
    assert np.abs(got - base).max() < 0.25 * np.abs(base).max()  # 3-bit codes, same bias
    model3, dense3 = lowered(builders.matmul_model(64, 40, batch_dims=("b", "s")), bits=4, block_size=32)
    x3 = np.random.default_rng(1).standard_normal((2, 7, 64)).astype(np.float32)
    (y3,) = session(model3.SerializeToString()).run(None, {"x": x3})
    np.testing.assert_allclose(y3, np.maximum(x3 @ dense3["W"], 0), atol=1e-4)


def test_end_to_end_lrq_matches_std_lowering():
    model = builders.mlp_model()
    outs = {}
    for lowering in ("lrq", "std"):
        result = lrqgraph.run(model, OptimizeConfig(lowering=lowering, factorize=FactorizeConfig(method="rtn")))
        outs[lowering] = session(result.model.SerializeToString()).run(
            None, {"x": np.ones((4, 64), np.float32)})[0]
    np.testing.assert_allclose(outs["lrq"], outs["std"], atol=1e-5)
