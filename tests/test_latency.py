"""Run time as a cost: the measured table of layer forms (lrqgraph.latency), the allocation's budget
(passes/latency_budget.py) and the verification's timing line."""
import json

import numpy as np
import pytest

import lrqgraph
from lrqgraph import AllocateConfig, OptimizeConfig
from lrqgraph.latency import CostTable, float_form, form_of, machine_key
from lrqgraph.numerics import QuantizedTensor, Representation
from lrqgraph.passes.latency_budget import reference_rep
from lrqgraph.passes.lower import layer_model
from lrqgraph.report import summary

import builders


def dense(k: int, n: int, bits: int, block: int) -> Representation:
    rng = np.random.default_rng(bits)
    q = QuantizedTensor(codes=rng.integers(0, 1 << bits, (k, n), dtype=np.uint8),
                        scales=rng.random((-(-k // block), n)).astype(np.float16), zero_points=None,
                        bits=bits, block_size=block)
    return Representation(((q,),), "rtn")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRQGRAPH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_forms_are_keyed_by_what_their_run_time_depends_on():
    four, two = form_of(dense(64, 32, 4, 32), "ort", None), form_of(dense(64, 32, 2, 32), "ort", None)
    assert four != two and four.shape == (64, 32)
    assert form_of(dense(64, 32, 4, 32), "ort", None) == four  # values do not matter
    assert form_of(dense(64, 32, 4, 32), "ort", 4) != four and form_of(dense(64, 32, 4, 32), "lrq", None) != four
    assert float_form(64, 32).key != four.key and len(machine_key()) == 16


def test_the_table_measures_each_form_once_and_reads_it_back(tmp_path):
    path = tmp_path / "table.json"
    reps = [dense(128, 64, 4, 32), dense(128, 64, 8, 128)]
    builders_ = {form_of(r, "ort", None): (lambda r=r: layer_model(r, "ort", None)) for r in reps}
    table = CostTable(path)
    assert len(table.missing(builders_, (1, 8))) == 6  # two forms and the float MatMul, at two row counts
    table.measure(builders_, (1, 8))
    assert table.measured == 4 and not table.missing(builders_, (1, 8))
    for form in builders_:
        for rows in (1, 8):
            assert 0 < table.ratio(form, rows) < 100 and table.ms(form, rows) > 0
    assert table.ratio(float_form(128, 64), 8) == 1.0
    again = CostTable(path)  # a later run reads the cache and times nothing
    again.measure(builders_, (1, 8))
    assert again.measured == 0 and again.ratios == table.ratios
    assert again.missing(builders_, (16,))  # another row count is another measurement


def test_the_reference_is_what_onnxruntimes_quantizer_writes():
    model = layer_model(reference_rep(96, 40), "ort", None)
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in node.attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 0)


def optimize(tmp_path, target_bpw=5.0, **allocate):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    cfg = OptimizeConfig(calib=str(calib), allocate=AllocateConfig(target_bpw=target_bpw, **allocate))
    return lrqgraph.run(builders.mlp_model((64, 256, 256, 64)), cfg)


def grid_of(key: str) -> tuple[int, int]:
    """(bits, block) of a table entry's first factor: "ort|a0|float32|KxN|KxN:bits/block/s|rot0|M8"."""
    bits, block, _ = key.split("|")[4].split(",")[0].split(";")[0].split(":")[1].split("/")
    return int(bits), int(block)


def test_a_layer_whose_chosen_candidate_is_slow_gets_another(tmp_path, cache):
    def choices(result):
        return {e["name"]: e["choice"] for e in result.report["layers"] if "choice" in e}
    first = optimize(tmp_path, 3.5)  # below 4 bits: a mix of grids
    off = choices(optimize(tmp_path, 3.5, latency_budget=False))
    chosen = {(e["bits"], e["block"]) for e in first.report["layers"] if e.get("action") == "rewrite"}
    slow = chosen - {(4, 32)}  # the reference's own grid sets the limit: it stays as measured
    assert slow, chosen
    # every form of those grids now measures 50x the float layer: the budget must drop them
    (path,) = (cache / "latency").glob("*.json")
    ratios = json.loads(path.read_text())
    path.write_text(json.dumps({k: 50.0 if not k.startswith("float|") and grid_of(k) in slow else v
                                for k, v in ratios.items()}))
    second = optimize(tmp_path, 3.5)
    after = {(e["bits"], e["block"], e.get("lowering")) for e in second.report["layers"] if e.get("action") == "rewrite"}
    # each such layer took another grid, or the same codes rebuilt in float when the session loads
    assert after and not {(bits, block) for bits, block, lowering in after if lowering != "fold"} & slow, (after, slow)
    # without the budget, bytes and error alone choose, whatever the timings
    again = optimize(tmp_path, 3.5, latency_budget=False)
    assert choices(again) == off and again.report["allocation"]["latency"] is None


def test_max_latency_tightens_the_budget_and_an_unreachable_goal_says_how_to_relax_it(tmp_path, cache):
    with pytest.raises(lrqgraph.LrqError, match="within the latency budget.*--latency-budget off"):
        optimize(tmp_path, max_latency=0.01)


def test_the_summary_says_what_the_rewrite_costs_in_time(tmp_path, cache):
    result = optimize(tmp_path)
    timed = result.report["verify"]["latency"]
    assert set(timed) == {"batch 1", "batch 8"}
    for t in timed.values():
        assert t["original_ms"] > 0 and t["rewritten_ms"] > 0
        assert t["ratio"] == pytest.approx(t["rewritten_ms"] / t["original_ms"], rel=2e-3)  # both times kept to 4 digits
    budget = result.report["allocation"]["latency"]
    assert budget["rows"] == [1, 8] and set(budget["estimate_ms"]) == {"1", "8"}
    text = summary(result.report)
    assert "x the original at batch 1" in text and "x the original at batch 8" in text
    assert "latency budget (no slower than onnxruntime's 4-bit RTN" in text
