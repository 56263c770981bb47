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
