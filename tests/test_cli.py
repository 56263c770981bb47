"""The command line: every bad input gets one line and a non-zero exit, or a report entry; the
input is never modified and no partial output is left behind."""
import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lrqgraph.cli import main

import builders


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(builders.matmul_model(), path)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(capsys, rc, expected_rc=2):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == expected_rc
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    return err[-1]


def test_optimize_writes_model_and_report(model_path, tmp_path, capsys):
    before = digest(model_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["optimize", str(model_path), "-o", str(out), "--report", str(report), "-q"]) == 0
    assert digest(model_path) == before
    onnx.checker.check_model(onnx.load(out))
    data = json.loads(report.read_text())
    (layer,) = [e for e in data["layers"] if e["action"] == "rewrite"]
    for key in ("name", "op", "shape", "method", "rank", "bits", "block", "bpw", "stored_bpw", "rel_error", "seconds"):
        assert key in layer
    assert data["model"]["file_bytes_after"] < data["model"]["file_bytes_before"]
    assert data["verify"]["outputs"]["y"]["cosine_min"] > 0.98


def test_same_input_gives_byte_identical_output(model_path, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["optimize", str(model_path), "-o", str(a), "-q", "--method", "lplr", "--rank", "16"]) == 0
    assert main(["optimize", str(model_path), "-o", str(b), "-q", "--method", "lplr", "--rank", "16"]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_missing_input(tmp_path, capsys):
    rc = main(["optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")])
    assert "nope.onnx: no such file" in one_line_error(capsys, rc)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("content", [b"hello, not a model\n", b""], ids=["text", "empty"])
def test_not_an_onnx_file(tmp_path, capsys, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    rc = main(["optimize", str(bad), "-o", str(tmp_path / "o.onnx")])
    assert "bad.onnx: not" in one_line_error(capsys, rc)


def test_truncated_file(model_path, tmp_path, capsys):
    cut = tmp_path / "cut.onnx"
    data = model_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    rc = main(["optimize", str(cut), "-o", str(tmp_path / "o.onnx")])
    assert "cut.onnx" in one_line_error(capsys, rc)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("opset", [5, 99])
def test_unsupported_opset(tmp_path, capsys, opset):
    m = builders.matmul_model()
    m.opset_import[0].version = opset
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    rc = main(["optimize", str(path), "-o", str(tmp_path / "o.onnx")])
    assert f"opset {opset} is not supported" in one_line_error(capsys, rc)


def test_output_equal_to_input_is_refused(model_path, capsys):
    before = digest(model_path)
    rc = main(["optimize", str(model_path), "-o", str(model_path)])
    assert "output path is the input model" in one_line_error(capsys, rc)
    assert digest(model_path) == before


def test_missing_output_folder(model_path, tmp_path, capsys):
    rc = main(["optimize", str(model_path), "-o", str(tmp_path / "no" / "o.onnx")])
    assert "output folder does not exist" in one_line_error(capsys, rc)


def _report_for(tmp_path, model, *extra):
    path, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    assert main(["optimize", str(path), "-o", str(out), "--report", str(report), "-q", *extra]) == 0
    return {e["name"]: e for e in json.loads(report.read_text())["layers"]}


def test_non_constant_weight_is_skipped_with_reason(tmp_path):
    layers = _report_for(tmp_path, builders.activation_matmul_model())
    assert layers["act_mm"]["action"] == "keep" and "not a constant" in layers["act_mm"]["reason"]


def test_fp16_weights_are_rewritten(tmp_path):
    layers = _report_for(tmp_path, builders.matmul_model(dtype=np.float16))
    assert layers["mm"]["action"] == "rewrite"


def test_already_quantized_nodes_are_skipped(tmp_path, model_path):
    quantized = tmp_path / "q.onnx"
    assert main(["optimize", str(model_path), "-o", str(quantized), "-q"]) == 0
    layers = _report_for(tmp_path, onnx.load(quantized))
    assert all(e["action"] == "keep" for e in layers.values())
    assert any("already quantized" in e["reason"] for e in layers.values())


def test_nan_weight_refuses_that_layer_by_name(tmp_path, caplog):
    m = builders.matmul_model()
    w = builders.weight(128, 64)
    w[0, 0] = np.inf
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    layers = _report_for(tmp_path, m)
    assert layers["mm"]["action"] == "keep" and "NaN or Inf" in layers["mm"]["reason"]
    assert "layer 'mm' refused" in caplog.text


def test_max_error_failure_leaves_no_output(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    rc = main(["optimize", str(model_path), "-o", str(out), "--bits", "2", "--max-error", "1e-6"])
    assert "exceeds --max-error" in one_line_error(capsys, rc, expected_rc=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_external_data_round_trip(tmp_path, capsys):
    src = tmp_path / "ext.onnx"
    onnx.save(builders.matmul_model(), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--external-data", "-q"]) == 0
    assert (tmp_path / "o.onnx.data").exists()
    assert main(["verify", str(src), str(out), "-q"]) == 0
    (tmp_path / "ext.onnx.data").unlink()
    rc = main(["optimize", str(src), "-o", str(tmp_path / "o2.onnx")])
    assert "external data" in one_line_error(capsys, rc)


def test_calibration_inputs_are_checked(model_path, tmp_path, capsys):
    bad = tmp_path / "calib.npz"
    np.savez(bad, wrong_name=np.zeros((2, 128), np.float32))
    rc = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(bad)])
    assert "keys must be the model's input names" in one_line_error(capsys, rc)
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32))
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(good), "-q"]) == 0


def test_inspect_lists_every_layer_with_its_verdict(model_path, capsys):
    assert main(["inspect", str(model_path), "--method", "lplr", "--rank", "16"]) == 0
    out = capsys.readouterr().out
    assert "mm" in out and "lplr rank 16" in out and "bits per weight" in out


def test_pipeline_option(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "-q",
                 "--passes", "discover,factorize(method=svd,rank=16),lower(std),cleanup,verify"]) == 0
    assert {n.op_type for n in onnx.load(out).graph.node} >= {"DequantizeLinear", "MatMul"}
