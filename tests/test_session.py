"""lrqgraph.runtime.session takes onnxruntime.InferenceSession's arguments, in its order, and
adds lrqgraph's settings without overwriting the caller's."""
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lrqgraph.runtime import register, session
from lrqgraph.runtime.session import QDQ_ACCURACY_KEY

import builders


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(builders.matmul_model(32, 16), path)
    return path


def _x():
    return {"x": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)}


@pytest.mark.parametrize("source", ["path", "bytes"])
@pytest.mark.parametrize("style", ["positional", "keyword"])
def test_called_exactly_as_inference_session(model_path, source, style):
    model = str(model_path) if source == "path" else model_path.read_bytes()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if style == "positional":
        ours, theirs = session(model, so, providers), ort.InferenceSession(model, ort.SessionOptions(), providers)
    else:
        ours = session(model, sess_options=so, providers=providers, provider_options=[{}])
        theirs = ort.InferenceSession(model, sess_options=ort.SessionOptions(), providers=providers)
    assert ours.get_session_options().intra_op_num_threads == 1  # the caller's setting is kept
    assert ours.get_providers() == providers
    np.testing.assert_array_equal(ours.run(None, _x())[0], theirs.run(None, _x())[0])


def test_register_adds_entries_without_overwriting_the_callers(model_path):
    so = ort.SessionOptions()
    so.add_session_config_entry(QDQ_ACCURACY_KEY, "4")
    register(so, library=False)
    assert so.get_session_config_entry(QDQ_ACCURACY_KEY) == "4"
    fresh = register(ort.SessionOptions(), library=False)
    assert fresh.get_session_config_entry(QDQ_ACCURACY_KEY) == "0"


def test_import_lrqgraph_alone_exposes_runtime():
    code = "import lrqgraph; print(lrqgraph.runtime.session.__name__, lrqgraph.runtime.register.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["session", "register"]


@pytest.fixture
def lrq_model_path(tmp_path):
    from lrqgraph.runtime import available
    if not available():
        pytest.skip("native ops not built (no C++ compiler or headers at install time)")
    import lrqgraph
    path = tmp_path / "lrq.onnx"
    onnx.save(lrqgraph.optimize(builders.matmul_model(128, 64), lrqgraph.OptimizeConfig(lowering="lrq")), path)
    assert any(o.domain == "lrq" for o in onnx.load(path).opset_import)
    return path


def _x128():
    return {"x": np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32)}


def test_one_session_options_serves_many_sessions(lrq_model_path):
    """onnxruntime refuses a second registration of the lrq domain on one SessionOptions
    ("Domain already set in registry"); hosts reuse one SessionOptions for every session."""
    so = ort.SessionOptions()
    first, second = session(lrq_model_path, so), session(lrq_model_path, so)
    np.testing.assert_array_equal(first.run(None, _x128())[0], second.run(None, _x128())[0])


def test_register_then_session_with_the_same_options(lrq_model_path):
    so = register(ort.SessionOptions())
    ours = session(lrq_model_path, so)
    theirs = ort.InferenceSession(str(lrq_model_path), so)  # a host's own session from the same options
    np.testing.assert_array_equal(ours.run(None, _x128())[0], theirs.run(None, _x128())[0])
    register(so)  # a second register is harmless too
    assert session(lrq_model_path, so).run(None, _x128())[0].shape == (2, 64)
