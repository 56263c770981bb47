"""The method registry: one registration adds a method everywhere (config, CLI, inspect, lower's
checks); a method's options are its own; declared lowerings match lower's rules."""
import dataclasses
import json

import numpy as np
import onnx
import pytest

import lrqgraph
from lrqgraph import FactorizeConfig, LrqError, Method, MethodConfig, register_method
from lrqgraph.cli import main
from lrqgraph.methods import METHODS, configure, method_config
from lrqgraph.numerics import QuantSpec, Representation, quantize
from lrqgraph.numerics.quant import spec_storage_bits
from lrqgraph.passes.lower import RULES

import builders
from conftest import restored_registries


@dataclasses.dataclass(frozen=True)
class ToyConfig(MethodConfig):
    """Round to nearest on 64-row per-channel-scaled blocks, with a toy-only option."""

    method = "toy"
    block_rows: int = 64


def _toy_spec(cfg: ToyConfig, scale_dtype: str) -> QuantSpec:
    return QuantSpec(bits=cfg.bits, block_size=cfg.block_rows, scale_dtype=scale_dtype)


TOY = Method(
    "toy", ToyConfig,
    factorize=lambda w, cfg, scale_dtype, h: (Representation(((quantize(w, _toy_spec(cfg, scale_dtype)),),), "toy"),
                                              ""),
    storage=lambda cfg, k, n, scale_dtype: (spec_storage_bits(k, n, _toy_spec(cfg, scale_dtype)), "toy"),
    forms=("dense",), summary="a test method")


@pytest.fixture(autouse=True, scope="module")
def toy_method():
    with restored_registries():
        register_method(TOY)
        yield


def test_a_registered_method_runs_from_the_command_line(tmp_path):
    src, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(builders.matmul_model(), src)
    assert main(["optimize", str(src), "-o", str(out), "--method", "toy", "--bits", "3", "--lowering", "std",
                 "--report", str(report), "-q"]) == 0
    (entry,) = [e for e in json.loads(report.read_text())["layers"] if e["action"] == "rewrite"]
    assert entry["method"] == "toy" and entry["bits"] == 3
    # 3-bit codes, one float32 scale per 64 rows: 3 + 32/64 bits per weight
    assert entry["bpw"] == pytest.approx(3.5)
    assert main(["inspect", str(src), "--method", "toy"]) == 0


def test_a_method_refuses_options_of_other_methods():
    with pytest.raises(LrqError, match="method gptq has no option rank"):
        FactorizeConfig(method="gptq", rank=16)
    with pytest.raises(LrqError, match="method toy has no option block_size"):
        method_config("toy", block_size=32)
    with pytest.raises(LrqError, match="unknown method 'nope'"):
        FactorizeConfig(method="nope")


def test_switching_method_keeps_the_shared_fields_only():
    lplr = FactorizeConfig(method="lplr", bits=3, rank=16, scale_dtype="float16", seed=7)
    gptq = configure(lplr, method="gptq")
    assert (gptq.method, gptq.bits, gptq.scale_dtype, gptq.seed) == ("gptq", 3, "float16", 7)
    assert not hasattr(gptq, "rank")
    with pytest.raises(LrqError, match="has no option rank"):
        configure(lplr, method="gptq", rank=8)


def test_pipeline_options_are_checked_when_the_pipeline_is_parsed():
    with pytest.raises(LrqError, match="method svd has no option sweeps"):
        lrqgraph.PassManager("discover,factorize(method=svd,sweeps=3)")
    with pytest.raises(LrqError, match="unknown option"):
        lrqgraph.PassManager("discover,lower(ort,level=2)")


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"toy"}))
def test_declared_lowerings_are_exactly_those_with_rules(name):
    method = METHODS[name]
    for target in ("ort", "std", "lrq"):
        runs = all((form, target) in RULES for form in method.forms)
        assert runs == (target in method.lowerings), (name, target)


def test_every_method_config_is_frozen_and_named():
    for name, method in METHODS.items():
        cfg = method.config()
        assert cfg.method == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.bits = 3


@pytest.mark.parametrize("name", ["rtn", "svd", "lplr", "qlr", "kmeans", "kashin"])
def test_storage_formula_matches_the_representation(name):
    """inspect's bits (from shapes) equal the bits the factorization really stores."""
    w = builders.weight(128, 96)
    cfg = FactorizeConfig(method=name, **({"rank": 16} if name in ("svd", "lplr", "qlr") else {}))
    bits, _ = METHODS[name].storage(cfg, 128, 96, "float32")
    rep, _ = METHODS[name].factorize(w, cfg, "float32", None)
    assert not rep.info.get("fallback")  # Kashin's split converges on this seeded weight
    assert bits == rep.storage_bits()
    assert np.isfinite(rep.dequantize()).all()
