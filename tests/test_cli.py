"""The command line: every bad input gets one line and a non-zero exit, or a report entry; the
input is never modified and no partial output is left behind."""
import hashlib
import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lrqgraph import Pass, register_pass
from lrqgraph.cli import main

import builders
from conftest import restored_registries


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(builders.matmul_model(), path)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


LOG_LINE = re.compile(r"^[DIWEC] lrqgraph[\w.]*: ")


def one_line_error(capsys, rc, expected_rc=2):
    """The error: exactly one line on stderr besides log records, and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == expected_rc
    errors = [line for line in err if not LOG_LINE.match(line)]
    assert len(errors) == 1, err
    assert errors[0].startswith("lrqgraph: ") and "Traceback" not in "\n".join(err)
    return errors[0]


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


def test_report_in_a_missing_folder_is_refused_before_any_work(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    rc = main(["optimize", str(model_path), "-o", str(out), "--report", str(tmp_path / "missing" / "r.json")])
    assert "report folder does not exist" in one_line_error(capsys, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_html_report_path_that_is_a_folder_is_refused(model_path, tmp_path, capsys):
    rc = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--report-html", str(tmp_path)])
    assert "is a directory" in one_line_error(capsys, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


class _Buggy(Pass):
    name = "test_buggy"

    def run(self, ctx):
        return {}["missing"]  # a bug: KeyError


@pytest.fixture
def buggy_pass():
    with restored_registries():
        register_pass(_Buggy)
        yield


def test_a_bug_in_a_pass_exits_3_naming_the_pass(model_path, tmp_path, capsys, buggy_pass):
    out = tmp_path / "o.onnx"
    rc = main(["optimize", str(model_path), "-o", str(out), "--passes", "discover,test_buggy"])
    line = one_line_error(capsys, rc, expected_rc=3)
    assert "internal error" in line and "pass 'test_buggy'" in line and "--debug" in line
    assert not out.exists()
    rc = main(["optimize", str(model_path), "-o", str(out), "--passes", "discover,test_buggy", "--debug"])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" in err and "KeyError" in err


def test_a_verification_failure_exits_1(model_path, tmp_path, capsys):
    rc = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--max-error", "1e-9"])
    assert "verification failed" in one_line_error(capsys, rc, expected_rc=1)


def test_options_of_another_method_are_refused(model_path, tmp_path, capsys):
    rc = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--method", "gptq", "--rank", "16"])
    assert "method gptq has no option rank (rank belongs to" in one_line_error(capsys, rc)
    rc = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--method", "kashin",
               "--block-size", "64", "--lowering", "lrq"])
    assert "method kashin has no option block_size" in one_line_error(capsys, rc)


def test_codebook_method_with_a_lowering_that_cannot_run_it_is_refused_before_work(model_path, tmp_path, capsys):
    rc = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--method", "kmeans"])
    assert "method kmeans runs only with --lowering lrq" in one_line_error(capsys, rc)


def test_kashin_transform_error_names_a_real_option(model_path, tmp_path, capsys):
    rc = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"),
               "--passes", "discover,factorize(method=kashin,transform=dct),lower(lrq),cleanup"])
    line = one_line_error(capsys, rc)
    assert "transform=hadamard" in line and "--transform" not in line


def test_inspect_takes_the_lowering_a_method_needs(model_path, capsys):
    assert main(["inspect", str(model_path), "--method", "kmeans", "--lowering", "lrq"]) == 0
    assert "kmeans, 4-bit codebook" in capsys.readouterr().out


def test_inspect_counts_float16_scales(model_path, capsys):
    assert main(["inspect", str(model_path), "--scale-dtype", "float16", "--method", "rtn"]) == 0
    assert "4.500 bits per weight" in capsys.readouterr().out  # 4-bit codes + a float16 scale per 32
    assert main(["inspect", str(model_path), "--method", "rtn"]) == 0
    assert "5.000 bits per weight" in capsys.readouterr().out


def test_lower_refuses_codebook_nodes_with_one_line_and_no_output(model_path, tmp_path, capsys):
    from lrqgraph.runtime import available
    if not available():
        pytest.fail("the native library is needed to write a KashinMatMul model")
    lrq = tmp_path / "k.onnx"
    assert main(["optimize", str(model_path), "-o", str(lrq), "--method", "kmeans", "--lowering", "lrq", "-q"]) == 0
    out = tmp_path / "k.ort.onnx"
    rc = main(["lower", str(lrq), "-o", str(out), "--to", "ort"])
    assert "KashinMatMul" in one_line_error(capsys, rc) and not out.exists()


def test_missing_calibration_data_is_refused_before_any_work(model_path, tmp_path, capsys):
    rc = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "no.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"lrqgraph: error: {tmp_path / 'no.npz'}: no such file or folder (given as --calib)"
    # (no pass ran: the discover pass would have logged a line first)
