"""Randomized Hadamard rotations: the numpy transform, its stored factors (the layout every
lowering emits), rotated representations through onnxruntime, and what a rotation buys."""
import numpy as np
import pytest

import builders
import lrqgraph
from lrqgraph import FactorizeConfig, OptimizeConfig
from lrqgraph.numerics import QuantSpec, rtn_factorize
from lrqgraph.numerics.rotation import Rotation
from lrqgraph.passes.factorize import factorize_weight

SIZES = (7, 64, 96, 384, 640, 2048)  # odd only, powers of two, 2^a·3, 2^a·5, 2^11


def explicit(rotation: Rotation) -> np.ndarray:
    """R built from the stored factors alone, in the order the ONNX lowering applies them."""
    f = rotation.factors()
    p1, p2 = len(f["h1"]), len(f["h2"])
    odd = rotation.k // (p1 * p2)
    assert {f[name].dtype for name in ("signs", "h1", "h2")} == {np.dtype(np.int8)}  # ±1 bytes
    y = np.diag(f["signs"] * f["norm"]).astype(np.float64).reshape(-1, p1 * p2, odd)
    if "small" in f:
        y = y @ f["small"]
    y = f["h1"] @ y.reshape(-1, p1, p2 * odd)
    y = f["h2"] @ y.reshape(-1, p1, p2, odd)
    return y.reshape(rotation.k, rotation.k)


@pytest.mark.parametrize("k", SIZES)
def test_rotation_is_orthogonal_and_matches_its_factors(k):
    rng = np.random.default_rng(k)
    r = Rotation(k, seed=3)
    m = r.rotate_inputs(np.eye(k, dtype=np.float32)).astype(np.float64)
    np.testing.assert_allclose(m @ m.T, np.eye(k), atol=2e-6)
    np.testing.assert_allclose(explicit(r), m, atol=2e-6)
    x, w = rng.standard_normal((5, k)).astype(np.float32), rng.standard_normal((k, 9)).astype(np.float32)
    # (X·R)·(RᵀW) = X·W, R·(RᵀW) = W, Rᵀ·H·R as a product
    np.testing.assert_allclose(r.rotate_inputs(x) @ r.rotate_weight(w), x @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.unrotate_weight(r.rotate_weight(w)), w, atol=1e-5)
    h = (x.T @ x).astype(np.float32)
    np.testing.assert_allclose(r.rotate_hessian(h), m.T @ h @ m, rtol=1e-4, atol=1e-4)
    assert Rotation(k, seed=4).rotate_inputs(x).tobytes() != r.rotate_inputs(x).tobytes()  # seeded


def test_rotation_spreads_outlier_rows_so_a_grid_fits_better():
    """A weight with a few large input rows (activation outliers folded in): per-column blocks of
    the rotated weight share the outliers' range with every row, and RTN's error falls."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((384, 256)).astype(np.float32) * 0.02
    w[[5, 77, 300]] *= 10
    spec = QuantSpec(bits=3, block_size=64)
    plain = np.linalg.norm(w - rtn_factorize(w, spec).dequantize())
    rep, _ = factorize_weight(w, FactorizeConfig(method="rtn", bits=3, block_size=64, rotate=True))
    assert rep.rotation is not None and rep.rotation.k == 384
    # measured 0.52x (0.87x when the outliers are 40x: then they dominate the rotated grid too)
    assert np.linalg.norm(w - rep.dequantize()) < 0.65 * plain
    assert rep.storage_bits() == rtn_factorize(w, spec).storage_bits() + rep.rotation.storage_bits()


@pytest.mark.parametrize("lowering", ["ort", "std", "lrq"])
@pytest.mark.parametrize("k, batch_dims", [(96, ("b",)), (384, ("b", "s")), (640, ("b",))])
def test_rotated_layers_run_in_onnxruntime_as_numpy_computes_them(tmp_path, lowering, k, batch_dims):
    if lowering == "lrq":
        from lrqgraph.runtime import available
        if not available():
            pytest.skip("native ops not built")
    from lrqgraph.runtime import session
    model = builders.matmul_model(k, 48, batch_dims=batch_dims)
    cfg = OptimizeConfig(lowering=lowering, accuracy_level=0,
                         factorize=FactorizeConfig(method="rtn", bits=4, block_size=32, rotate=True))
    result = lrqgraph.run(model, cfg)
    path = tmp_path / "rot.onnx"
    lrqgraph.save_model(result.model, path)
    ops = [n.op_type for n in result.model.graph.node]
    if lowering == "lrq":  # the rotation inside the op (one node), its signs and seed on it
        assert ops == ["QMatMul", "Relu"]
        from lrqgraph.runtime.op_schema import OPS
        node, schema = result.model.graph.node[0], OPS["QMatMul"]
        given = {i.name for i, name in zip(schema.inputs, node.input) if name}
        assert {"rotation_signs"} | ({"rotation_small"} if k % 5 == 0 else set()) <= given  # 640 = 128·5
        assert "rotation_seed" in {a.name for a in node.attribute}
    else:
        assert "Mul" in ops and "Reshape" in ops  # the rotation, in plain ops
    w = builders.weight(k, 48)
    rep, _ = factorize_weight(w, cfg.factorize)
    x = np.random.default_rng(1).standard_normal((3, 2, k)[-len(batch_dims) - 1:]).astype(np.float32)
    got = session(str(path)).run(None, {"x": x})[0]
    want = np.maximum(x @ rep.dequantize(), 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_layers_reading_one_input_share_its_rotation(tmp_path):
    """q, k and v of one attention read the same normalized input: one rotation, three layers."""
    from onnx import helper
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"h{i}"], name=f"mm{i}") for i in range(3)]
    nodes.append(helper.make_node("Sum", ["h0", "h1", "h2"], ["y"], name="sum"))
    model = builders.model(nodes, [builders.io("x", ["b", 128])], [builders.io("y", ["b", 64])],
                           {f"W{i}": builders.weight(128, 64, i) for i in range(3)})
    result = lrqgraph.run(model, OptimizeConfig(factorize=FactorizeConfig(method="rtn", rotate=True)))
    ops = [n.op_type for n in result.model.graph.node]
    # one Mul by the signs on x, one that folds the normalization into the signs at load
    assert ops.count("MatMulNBits") == 3 and ops.count("Mul") == 2
    assert sum(n.op_type == "Mul" and "x" in n.input for n in result.model.graph.node) == 1


def test_a_rotated_float16_layer_runs_as_numpy_computes_it(tmp_path):
    """The ±1 factors cast to float16 and the normalization folded into the signs in float32."""
    from lrqgraph.runtime import session
    model = builders.matmul_model(384, 32, dtype=np.float16)
    cfg = OptimizeConfig(factorize=FactorizeConfig(method="rtn", bits=4, block_size=32, rotate=True))
    result = lrqgraph.run(model, cfg)
    path = tmp_path / "rot16.onnx"
    lrqgraph.save_model(result.model, path)
    rep, _ = factorize_weight(builders.weight(384, 32, 0, np.float16).astype(np.float32), cfg.factorize)
    x = np.random.default_rng(2).standard_normal((4, 384)).astype(np.float16)
    got = session(str(path)).run(None, {"x": x})[0].astype(np.float32)
    want = np.maximum(x.astype(np.float32) @ rep.dequantize(), 0)
    # onnxruntime's float16 MatMulNBits on CPU differs from numpy by 2.7% of the largest output on
    # this layer without the rotation, 1.6% with it (measured): the rotation adds no error of its own
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-2 * np.abs(want).max())
