"""Embedding tables as layers: discover's rule 6, lower's rule 6 (GatherBlockQuantized, std
DequantizeLinear + Gather), a tied lm_head sharing the table's codes, and tables in an allocation."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lrqgraph
from lrqgraph import AllocateConfig, FactorizeConfig, OptimizeConfig, SelectConfig
from lrqgraph.model import ModelState
from lrqgraph.passmanager import Context
from lrqgraph.runtime import session

import builders

TABLES = SelectConfig(embeddings=True, keep_output_layers=False, min_params=16)


def layers(model, select=TABLES, **config):
    ctx = Context(ModelState(model), OptimizeConfig(select=select, **config))
    return {layer.name: layer for layer in ctx.analysis("layers")}


@pytest.mark.parametrize("gemm", [False, True])
def test_lm_head_reading_the_table_transposed_is_one_tied_layer(gemm):
    model = builders.tied_lm_head_model(vocab=96, dim=64, gemm=gemm)
    found = layers(model)
    assert list(found) == ["embed"]
    tied = found["embed"]
    assert tied.rewrite and tied.op == ("Gemm" if gemm else "MatMul") + "+Gather"
    assert [n.op for n in tied.matmuls] == ["Gemm" if gemm else "MatMul"] and len(tied.gathers) == 1
    assert tied.weight == "E" and tied.shape == (64, 96) and tied.transposed  # W = Eᵀ: blocks along dim
    np.testing.assert_array_equal(tied.weight_matrix(), numpy_helper.to_array(model.graph.initializer[0]).T)


def test_tables_are_kept_outside_an_allocation_by_default():
    found = layers(builders.tied_lm_head_model(), select=SelectConfig(min_params=16))
    assert not found["embed"].rewrite and "tables join an allocation" in found["embed"].reason
    assert not found["lm_head"].rewrite  # writes the logits, and its weight is the table's
    goal = layers(builders.tied_lm_head_model(), select=SelectConfig(min_params=16),
                  allocate=AllocateConfig(target_bpw=4))
    assert list(goal) == ["embed"] and goal["embed"].rewrite and goal["embed"].op == "MatMul+Gather"


def test_table_read_in_another_layout_stays_float():
    # MatMul(e, E) multiplies by E itself, not Eᵀ: no shared layout, so neither reader is rewritten
    found = layers(builders.tied_weight_model(64))
    assert not found["embed"].rewrite and "also read by MatMul" in found["embed"].reason
    assert not found["tied_mm"].rewrite and "also read by Gather" in found["tied_mm"].reason


def _dequantized_table(ctx) -> np.ndarray:
    """The table [vocab, dim] as planned (the representation the lowering stored)."""
    return ctx.plans["E"].rep.dequantize().T.astype(np.float64)


def _lower(model, lowering, bits):
    from lrqgraph.api import default_pipeline
    from lrqgraph.passmanager import PassManager
    cfg = OptimizeConfig(lowering=lowering, factorize=FactorizeConfig(bits=bits), select=TABLES)
    ctx = Context(ModelState(model), cfg, original=model)
    PassManager(default_pipeline(cfg)).run(ctx)
    return ctx


@pytest.mark.parametrize("lowering, bits", [("ort", 4), ("std", 4), ("std", 8), ("lrq", 4)])
@pytest.mark.parametrize("gemm", [False, True])
def test_tied_table_lowers_to_one_copy_of_codes_read_by_both(lowering, bits, gemm):
    model = builders.tied_lm_head_model(vocab=96, dim=64, gemm=gemm)
    ctx = _lower(model, lowering, bits)
    out = ctx.model.to_onnx()
    ops = {n.op_type for n in out.graph.node}
    product = {"std": "MatMul", "ort": "MatMulNBits", "lrq": "QMatMul"}[lowering]
    assert ops == ({"DequantizeLinear", "Transpose", "Gather", product, "Tanh"} if lowering == "std" else
                   {"GatherBlockQuantized", "Reshape", product, "Tanh"})
    ids = np.array([0, 5, 95, 3]) if gemm else np.array([[0, 5, 95], [3, 3, 7]])
    got = session(out.SerializeToString()).run(None, {"ids": ids})[0]
    table = _dequantized_table(ctx)
    expected = np.tanh(table[ids]) @ table.T
    levels = {a.i for n in out.graph.node if n.op_type == product for a in n.attribute if a.name == "accuracy_level"}
    if lowering == "lrq":
        # lrq's int8 activations reach the lm_head reading the table's codes too: the difference is
        # their rounding per block of 32 (measured 2.4e-3 of the largest output)
        assert levels == {4}
        assert np.abs(got - expected).max() <= 1e-2 * np.abs(expected).max()
    else:
        # float32 kernels over the same dequantized values: the difference is summation order (measured < 2e-6)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # stored once: codes (dim·vocab·bits/8 bytes) and float16 or float32 scales, plus shape constants
    codes = 64 * 96 * bits // 8
    stored = sum(len(t.raw_data) for t in out.graph.initializer if t.dims and np.prod(t.dims) > 8)
    assert codes <= stored <= codes + 96 * 2 * 4, stored
    assert ctx.lowered["E"].stored_bytes < 64 * 96 * 4 / 3


def test_untied_table_is_read_by_gather_block_quantized():
    model = builders.token_model(vocab=256, dim=64)
    ctx = _lower(model, "ort", 4)
    out = ctx.model.to_onnx()
    assert {"GatherBlockQuantized", "MatMulNBits"} <= {n.op_type for n in out.graph.node}
    ids = np.array([[1, 255, 7]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = session(out.SerializeToString()).run(None, feeds)[0]
    # the rows the Gather reads and the product are the planned representations, dequantized
    expected = np.maximum(_dequantized_table(ctx)[ids] @ ctx.plans["W"].rep.dequantize().astype(np.float64), 0)
    # float32 kernels over the same dequantized values: summation order only (measured < 1e-6)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    original = session(model.SerializeToString()).run(None, feeds)[0]
    assert np.abs(got - original).max() > 1e-3 * np.abs(original).max()  # and the weights did change


def test_table_methods_without_a_dense_grid_are_kept_with_the_reason():
    cfg = OptimizeConfig(factorize=FactorizeConfig(method="lplr", rank=8), select=TABLES, lowering="lrq")
    result = lrqgraph.api.run(builders.tied_lm_head_model(vocab=96, dim=64), cfg)
    entry = next(e for e in result.report["layers"] if e["name"] == "embed")
    assert entry["action"] == "keep" and "dense grid" in entry["reason"]
    assert result.rewritten == 0


def test_target_size_reaches_budgets_that_need_the_table_compressed():
    model = builders.tied_lm_head_model(vocab=512, dim=64)
    table_bytes = 512 * 64 * 4
    cfg = OptimizeConfig(select=SelectConfig(min_params=16), allocate=AllocateConfig(target_size=table_bytes // 4))
    result = lrqgraph.api.run(model, cfg)
    out = result.model
    total = sum(len(t.raw_data) for t in out.graph.initializer)
    assert result.rewritten == 1 and total <= table_bytes // 4
    assert {"GatherBlockQuantized", "MatMulNBits"} <= {n.op_type for n in out.graph.node}


def _allocated(model, **goal):
    result = lrqgraph.api.run(model, OptimizeConfig(select=SelectConfig(min_params=16), allocate=AllocateConfig(**goal)))
    return result, {e["name"]: e for e in result.report["layers"]}


@pytest.mark.parametrize("bpw, timed, table_bits", [(4, False, 8), (3, False, 4), (4, True, 4)])
def test_target_bpw_keeps_the_tied_table_outside_its_budget_at_a_fixed_grid(bpw, timed, table_bits):
    model = builders.tied_lm_head_model(vocab=512, dim=64, hidden=2)
    result, entries = _allocated(model, target_bpw=bpw, latency_budget=timed)
    # 8 bits from 4 bits per weight up; below, the 4-bit grid (an 8-bit table would outweigh the
    # savings), and under the latency budget (an 8-bit lm_head reads twice the bytes a token)
    assert entries["embed"]["bits"] == table_bits
    hidden = [entries[f"mm{i}"] for i in range(2)]
    assert all(e["action"] == "rewrite" for e in hidden)
    # the bits per weight are the hidden layers' (the 512 x 64 table alone holds 4x their weights)
    assert sum(e["stored_bytes"] for e in hidden) * 8 <= bpw * 2 * 64 * 64
    assert result.report["allocation"]["bpw"] <= bpw


def test_a_table_in_the_budget_competes_for_its_bits():
    # competing for the same 4.5 bits per weight, the table cannot stay at 8 bits
    model = builders.tied_lm_head_model(vocab=512, dim=64, hidden=2)
    result, entries = _allocated(model, target_bpw=4.5, tables_in_budget=True)
    assert entries["embed"]["bits"] == 4
    total = sum(entries[n]["stored_bytes"] for n in ("embed", "mm0", "mm1")) * 8
    assert total <= 4.5 * (512 * 64 + 2 * 64 * 64)


def test_target_bpw_on_a_table_alone_says_how_to_reach_it():
    with pytest.raises(lrqgraph.LrqError, match="--target-size, or --tables-in-budget"):
        _allocated(builders.tied_lm_head_model(vocab=512, dim=64), target_bpw=4)


def test_lrq_lm_head_reading_the_table_converts_back(tmp_path):
    """On lrq a tied lm_head is a QMatMul over the table's codes; `lrqgraph lower --to ort` makes it
    MatMulNBits again with the same outputs (float activations: summation order only)."""
    from lrqgraph.cli import main
    model = builders.tied_lm_head_model(vocab=96, dim=64)
    cfg = OptimizeConfig(lowering="lrq", accuracy_level=0, factorize=FactorizeConfig(bits=4), select=TABLES)
    src, dst = tmp_path / "lrq.onnx", tmp_path / "ort.onnx"
    onnx.save(lrqgraph.api.run(model, cfg).model, src)
    assert main(["lower", str(src), "-o", str(dst), "--to", "ort", "-q"]) == 0
    assert {n.op_type for n in onnx.load(str(dst)).graph.node} == {"GatherBlockQuantized", "Reshape", "MatMulNBits",
                                                                    "Tanh"}
    ids = np.array([[0, 5, 95], [3, 3, 7]])
    want, got = (session(str(p)).run(None, {"ids": ids})[0] for p in (src, dst))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())  # measured 4.6e-7
