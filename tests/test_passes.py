"""factorize, cleanup and verify, each on a tiny graph."""
import numpy as np
import onnx
import pytest

import lrqgraph
from lrqgraph import Context, FactorizeConfig, OptimizeConfig, PassManager, VerifyConfig
from lrqgraph.errors import VerificationError
from lrqgraph.model import ModelState
from lrqgraph.numerics import relative_error

import builders


def context(model, **factorize):
    return Context(ModelState(model), OptimizeConfig(factorize=FactorizeConfig(**factorize)), original=model)


def test_factorize_plans_without_touching_the_graph():
    ctx = context(builders.matmul_model(), method="svd", rank=16)
    before = ctx.model.to_onnx().SerializeToString()
    PassManager("discover,factorize").run(ctx)
    assert ctx.model.to_onnx().SerializeToString() == before
    rep = ctx.plans["W"]
    assert rep.method == "svd" and rep.rank == 16
    entry = ctx.report["layers"]["mm"]
    assert entry["rel_error"] == pytest.approx(relative_error(builders.weight(128, 64), rep.dequantize()), rel=1e-5)
    assert entry["bpw"] == pytest.approx(rep.bits_per_weight(), rel=1e-4)


def test_factorize_keeps_layers_where_factors_save_no_bytes():
    # Full-rank 8-bit factors of a square weight take 2 x 8 bits per weight plus scales: more
    # than the float16 weight itself.
    ctx = context(builders.matmul_model(128, 128, dtype=np.float16), method="lplr", bits=8, rank=128)
    PassManager("discover,factorize").run(ctx)
    entry = ctx.report["layers"]["mm"]
    assert entry["action"] == "keep" and "no fewer than the float16 weight" in entry["reason"]
    assert "W" not in ctx.plans


def test_factorize_options_override_the_config_and_per_layer_overrides_apply():
    overrides = (("^mm$", (("bits", 8),)),)
    ctx = context(builders.matmul_model(), overrides=overrides)
    PassManager("discover,factorize(block_size=64)").run(ctx)
    q = ctx.plans["W"].chains[0][0]
    assert q.bits == 8 and q.block_size == 64


def test_target_bpw_picks_the_rank():
    ctx = context(builders.matmul_model(256, 256), method="lplr", target_bpw=2.0)
    PassManager("discover,factorize").run(ctx)
    rep = ctx.plans["W"]
    assert rep.bits_per_weight() <= 2.0 and rep.rank % 16 == 0


def test_cleanup_drops_dead_nodes_and_initializers_but_keeps_inputs():
    m = builders.matmul_model()
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    m.graph.input.append(builders.io("extra", [2]))
    m.graph.node.append(onnx.helper.make_node("Relu", ["x"], ["dead"], name="dead"))
    ctx = context(m)
    assert PassManager("cleanup").run(ctx).modified
    out = ctx.model.to_onnx()
    assert [i.name for i in out.graph.input] == ["x", "extra"]
    assert "unused" not in {t.name for t in out.graph.initializer}
    assert "dead" not in {n.name for n in out.graph.node}


def test_verify_reports_every_output_and_enforces_max_error():
    ctx = context(builders.matmul_model())
    PassManager("discover,factorize,lower,cleanup,verify").run(ctx)
    out = ctx.report["verify"]["outputs"]["y"]
    assert 0 < out["max_abs"] and 0 < out["max_rel"] < 0.5 and 0.98 < out["cosine_min"] <= out["cosine_mean"] <= 1
    strict = Context(ModelState(builders.matmul_model()),
                     OptimizeConfig(verify=VerifyConfig(max_error=1e-9)), original=builders.matmul_model())
    with pytest.raises(VerificationError, match="exceeds --max-error"):
        PassManager("discover,factorize,lower,cleanup,verify").run(strict)


def test_verify_of_an_unchanged_model_is_exact():
    ctx = context(builders.gemm_model())
    PassManager("verify").run(ctx)
    assert ctx.report["verify"]["max_rel"] == 0.0
