"""Input statistics H = XᵀX collected through onnxruntime match numpy on the same activations."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lrqgraph.hessian import HessianPart, collect_hessian_parts, collect_hessians

import builders


def test_hessian_of_a_matmul_input_is_xtx(tmp_path):
    m = builders.matmul_model(32, 16, batch_dims=("b", "s"))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((2, 5, 32)).astype(np.float32)} for _ in range(3)]
    h = collect_hessians(path, {"W": "x"}, batches)["W"]
    rows = np.concatenate([b["x"].reshape(-1, 32) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(h, rows.T @ rows, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left behind


def test_parts_are_the_hessians_of_their_batches_from_one_session(tmp_path, monkeypatch):
    """The allocator's held-out statistics come from the calibration pass itself: one session,
    each part H of its own batches."""
    import lrqgraph.hessian as hessian
    m = builders.matmul_model(16, 8, batch_dims=("b", "s"))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    rng = np.random.default_rng(4)
    batches = [{"x": rng.standard_normal((2, 3, 16)).astype(np.float32)} for _ in range(5)]
    opened = []
    real = hessian.open_session
    monkeypatch.setattr(hessian, "open_session", lambda model: opened.append(1) or real(model))
    head, rest = collect_hessian_parts(path, {"W": "x"}, [batches[:2], batches[2:]])
    assert len(opened) == 1
    for part, got in ((batches[:2], head), (batches[2:], rest)):
        rows = np.concatenate([b["x"].reshape(-1, 16) for b in part]).astype(np.float64)
        np.testing.assert_allclose(got.h["W"], rows.T @ rows, rtol=1e-6)
        assert got.rows["W"] == len(rows)


def test_masked_rows_are_left_out(tmp_path):
    m = builders.matmul_model(8, 8, batch_dims=("b", "s"))
    m.graph.input.append(builders.io("mask", ["b", "s"], TensorProto.INT64))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    x = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.int64)
    h = collect_hessians(path, {"W": "x"}, [{"x": x, "mask": mask}], mask_input="mask")["W"]
    kept = x.reshape(-1, 8)[mask.reshape(-1).astype(bool)].astype(np.float64)
    np.testing.assert_allclose(h, kept.T @ kept, rtol=1e-6)


def test_conv_inputs_use_channels_as_features(tmp_path):
    w = np.random.default_rng(2).standard_normal((6, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="pw")]
    graph = helper.make_graph(nodes, "g", [builders.io("x", ["n", 4, 5, 5])], [builders.io("y", ["n", 6, 5, 5])],
                              [numpy_helper.from_array(w, "W")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = builders.IR_VERSION
    path = tmp_path / "c.onnx"
    onnx.save(m, path)
    x = np.random.default_rng(3).standard_normal((2, 4, 5, 5)).astype(np.float32)
    h = collect_hessians(path, {"W": "x"}, [{"x": x}])["W"]
    pixels = x.transpose(0, 2, 3, 1).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(h, pixels.T @ pixels, rtol=1e-6)


def test_nothing_is_written_beside_the_users_model(tmp_path, monkeypatch):
    """Collecting H builds its session from memory: the model's folder may be read-only."""
    m = builders.matmul_model(32, 16)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    writes = []
    for name in ("save", "save_model"):
        real = getattr(onnx, name)

        def spy(proto, target, *args, _real=real, **kwargs):
            writes.append(str(target))
            return _real(proto, target, *args, **kwargs)
        monkeypatch.setattr(onnx, name, spy)
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    collect_hessians(path, {"W": "x"}, [{"x": x}])
    assert not [w for w in writes if str(tmp_path) in w]


def test_shrinkage_pulls_h_of_few_rows_towards_its_diagonal_by_k_over_k_plus_n(tmp_path):
    m = builders.matmul_model(32, 16, batch_dims=("b", "s"))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((2, 4, 32)).astype(np.float32)}]  # 8 rows of 32 features
    part = collect_hessian_parts(path, {"W": "x"}, [batches])[0]
    raw, got = part.h["W"], part.shrunk()["W"]
    a = 32 / (32 + 8)
    np.testing.assert_allclose(got, (1 - a) * raw + a * np.diag(np.diag(raw)), rtol=1e-12)
    assert np.linalg.matrix_rank(raw) == 8 and np.linalg.matrix_rank(got) == 32  # full rank: GPTQ sees every direction


def test_parts_are_summed_before_they_are_shrunk(tmp_path):
    """The statistics of all samples shrink by the count of all of them: a part of 4 rows shrunk by
    its own count would be nearly diagonal, and adding it would drop most of its correlations."""
    m = builders.matmul_model(32, 16, batch_dims=("b", "s"))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    rng = np.random.default_rng(2)
    batches = [{"x": rng.standard_normal((1, 4, 32)).astype(np.float32)},
               {"x": rng.standard_normal((4, 16, 32)).astype(np.float32)}]
    parts = collect_hessian_parts(path, {"W": "x"}, [batches[:1], batches[1:]])
    whole = collect_hessian_parts(path, {"W": "x"}, [batches])[0]
    total = HessianPart.total(parts)
    assert total.rows["W"] == 68
    np.testing.assert_allclose(total.shrunk()["W"], whole.shrunk()["W"], rtol=1e-10)
