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
    rep = ctx.plans["W"].rep
    assert rep.method == "svd" and rep.rank == 16
    entry = builders.entry(ctx, "mm")
    assert entry["rel_error"] == pytest.approx(relative_error(builders.weight(128, 64), rep.dequantize()), rel=1e-5)
    assert entry["bpw"] == pytest.approx(rep.bits_per_weight(), rel=1e-4)


def test_factorize_keeps_layers_where_factors_save_no_bytes():
    # Full-rank 8-bit factors of a square weight take 2 x 8 bits per weight plus scales: more
    # than the float16 weight itself.
    ctx = context(builders.matmul_model(128, 128, dtype=np.float16), method="lplr", bits=8, rank=128)
    PassManager("discover,factorize").run(ctx)
    entry = builders.entry(ctx, "mm")
    assert entry["action"] == "keep" and "no fewer than the float16 weight" in entry["reason"]
    assert ctx.plans["W"].rep is None


def test_factorize_options_override_the_config_and_per_layer_overrides_apply():
    overrides = (("^mm$", (("bits", 8),)),)
    ctx = context(builders.matmul_model(), overrides=overrides)
    PassManager("discover,factorize(block_size=64)").run(ctx)
    q = ctx.plans["W"].rep.chains[0][0]
    assert q.bits == 8 and q.block_size == 64


def test_target_bpw_picks_the_rank():
    ctx = context(builders.matmul_model(256, 256), method="lplr", target_bpw=2.0)
    PassManager("discover,factorize").run(ctx)
    rep = ctx.plans["W"].rep
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
    out = ctx.verification.outputs["y"]
    assert 0 < out["max_abs"] and 0 < out["max_rel"] < 0.5 and 0.98 < out["cosine_min"] <= out["cosine_mean"] <= 1
    strict = Context(ModelState(builders.matmul_model()),
                     OptimizeConfig(verify=VerifyConfig(max_error=1e-9)), original=builders.matmul_model())
    with pytest.raises(VerificationError, match="exceeds --max-error"):
        PassManager("discover,factorize,lower,cleanup,verify").run(strict)


def test_verify_of_an_unchanged_model_is_exact():
    ctx = context(builders.gemm_model())
    PassManager("verify").run(ctx)
    assert ctx.verification.max_rel == 0.0


def _calib_file(tmp_path, model, samples=64, seed=0):
    rng = np.random.default_rng(seed)
    k = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    mix = np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k)  # correlated inputs: GPTQ has work to do
    path = tmp_path / "calib.npz"
    np.savez(path, x=(rng.standard_normal((samples, k)) @ mix).astype(np.float32))
    return str(path)


def test_calibrate_caches_hessians_by_model_and_data(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LRQGRAPH_CACHE", str(tmp_path / "cache"))
    model = builders.matmul_model()
    cfg = OptimizeConfig(calib=_calib_file(tmp_path, model))
    first = lrqgraph.run(model, cfg, passes="discover,calibrate")
    assert "H = XᵀX for 1 layers" in first.report["calibration"]
    caplog.set_level("INFO", logger="lrqgraph")
    lrqgraph.run(model, cfg, passes="discover,calibrate")
    assert "read from cache" in caplog.text
    other = builders.matmul_model(seed=1)  # different weights: a different key, computed anew
    caplog.clear()
    lrqgraph.run(other, cfg, passes="discover,calibrate")
    assert "read from cache" not in caplog.text


def test_without_calibration_data_the_report_says_data_free():
    result = lrqgraph.run(builders.matmul_model(), passes="discover,calibrate,factorize")
    assert result.report["calibration"].startswith("none")
    (entry,) = [e for e in result.report["layers"] if e.get("action") == "rewrite"]
    assert entry["method"] == "rtn" and entry["info"]["data_free"]


def test_gptq_with_calibration_lowers_the_output_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LRQGRAPH_CACHE", str(tmp_path / "cache"))
    model = builders.matmul_model()
    data = _calib_file(tmp_path, model)
    errors = {}
    for method in ("rtn", "gptq"):
        cfg = OptimizeConfig(calib=data, factorize=FactorizeConfig(method=method, bits=3, block_size=32),
                             verify=VerifyConfig(calib=data), lowering="std")
        report = lrqgraph.run(model, cfg).report
        errors[method] = next(e for e in report["layers"] if e.get("action") == "rewrite")["act_error"]
    assert errors["gptq"] < errors["rtn"]


def test_bad_calibration_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((0, 128), np.float32))
    with pytest.raises(lrqgraph.LrqError, match="holds no samples"):
        lrqgraph.run(builders.matmul_model(), OptimizeConfig(calib=str(bad)), passes="discover,calibrate")
    np.savez(bad, x=np.zeros((4, 7), np.float32))
    with pytest.raises(lrqgraph.LrqError, match="expects"):
        lrqgraph.run(builders.matmul_model(), OptimizeConfig(calib=str(bad)), passes="discover,calibrate")


def test_verify_streams_one_sample_at_a_time(tmp_path, monkeypatch):
    """Memory stays at one sample's outputs: a decoder's logits over the calibration set would not
    fit (Gemma 3 270M's verification once peaked at 22 GB)."""
    import lrqgraph.passes.verify as verify

    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def get_outputs(self):
            return self.inner.get_outputs()

        def run(self, names, feed):
            seen.append(len(feed["x"]))
            return self.inner.run(names, feed)

    real = verify.open_session
    monkeypatch.setattr(verify, "open_session", lambda model: Spy(real(model)))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((12, 128)).astype(np.float32))
    result = lrqgraph.run(builders.matmul_model(), OptimizeConfig(calib=str(calib)))
    assert seen and set(seen) == {1} and len(seen) == 2 * 12
    assert result.report["verify"]["samples"] == 12
    seen.clear()
    config = OptimizeConfig(calib=str(calib), verify=VerifyConfig(calib_verify_samples=5))
    result = lrqgraph.run(builders.matmul_model(), config)
    assert len(seen) == 2 * 5 and result.report["verify"]["samples"] == 5
    assert result.report["verify"]["inputs"].startswith("5 of 12 samples")


def test_calibration_sessions_compute_only_the_layer_inputs():
    from lrqgraph.slicing import with_outputs
    model = builders.matmul_model()
    assert [o.name for o in with_outputs(model, ["x", "h"]).graph.output] == ["h", "x"]
    assert [o.name for o in model.graph.output] == ["y"]  # the input model is untouched
