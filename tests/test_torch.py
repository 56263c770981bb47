"""The torch way in: compressed modules compute what the representations stand for, compress
decides as the ONNX path does, export writes the ONNX path's subgraphs, and the onnx_ir pass runs
inside torch.onnx's dynamo export."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import lrqgraph  # noqa: E402
import lrqgraph.torch as lt  # noqa: E402
from lrqgraph import OptimizeConfig  # noqa: E402
from lrqgraph.config import FactorizeConfig  # noqa: E402
from lrqgraph.io import constant_bytes  # noqa: E402
from lrqgraph.numerics.rotation import Rotation  # noqa: E402
from lrqgraph.torch.bridge import to_onnx  # noqa: E402
from lrqgraph.passes.factorize import factorize_weight  # noqa: E402
from lrqgraph.torch.modules import CompressedMatrix, HadamardRotation  # noqa: E402

FORMS = [  # (method, fields, the form it yields)
    ("rtn", {"bits": 4, "block_size": 32}, "dense"),
    ("rtn", {"bits": 3, "block_size": 16, "symmetric": False}, "dense"),
    ("gptq", {"bits": 4, "block_size": 32, "rotate": True}, "dense"),
    ("lplr", {"bits": 4, "rank": 8}, "lowrank"),
    ("qlr", {"bits": 2, "rank": 8}, "dense+lowrank"),
    ("kmeans", {"bits": 3}, "codebook"),
    ("kashin", {"bits": 3}, "codebook"),
]


class Net(torch.nn.Module):
    """A small real-shaped network: a 3x3 Conv, a depthwise Conv, a pooled MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 64, 3, stride=2, padding=1)
        self.dw = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
        self.fc1 = torch.nn.Linear(64, 256)
        self.fc2 = torch.nn.Linear(256, 128)
        self.out = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dw(torch.relu(self.conv(x)))).mean((2, 3))
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32))


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _ort(path_or_proto, x: torch.Tensor) -> np.ndarray:
    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("method, fields, form", FORMS, ids=[f"{m}-{f}" for m, _, f in FORMS])
def test_compressed_matrix_computes_x_times_the_representation(method, fields, form):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32)  # K = 96 = 32·3: a rotation with an odd block
    x = rng.standard_normal((5, 96)).astype(np.float32)
    rows = rng.standard_normal((256, 96))
    rep, why = factorize_weight(w, FactorizeConfig(method, **fields), "float16", rows.T @ rows)
    assert rep is not None, why
    assert rep.form == form and (rep.rotation is not None) == bool(fields.get("rotate"))
    m = CompressedMatrix(rep)
    want = x.astype(np.float64) @ rep.dequantize().astype(np.float64)
    with torch.no_grad():
        got = m(torch.from_numpy(x)).numpy()
        whole = m.weight().numpy()
    # float32 products in another order: a few ulps of the output scale
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(whole, rep.dequantize(), rtol=0, atol=1e-6 * np.abs(whole).max())


@pytest.mark.parametrize("k", [64, 96, 40])
def test_hadamard_rotation_matches_numpy(k):
    x = np.random.default_rng(k).standard_normal((3, 2, k)).astype(np.float32)
    rotation = Rotation(k, seed=5)
    with torch.no_grad():
        got = HadamardRotation(rotation)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, rotation.rotate_inputs(x.reshape(-1, k)).reshape(x.shape), rtol=0, atol=1e-5)


def test_compress_matches_the_onnx_path_and_leaves_the_input_alone(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _images(3, 7)
    small = lt.compress(net, (x,), method="rtn")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(net.fc1, torch.nn.Linear)
    # the same rules as the ONNX path: the output layer kept, the depthwise conv too small (576 < 4096)
    kinds = {name: type(m).__name__ for name, m in small.named_children()}
    assert kinds == {"conv": "Conv2d", "dw": "Conv2d", "fc1": "CompressedLinear", "fc2": "CompressedLinear",
                     "out": "Linear"}
    onnx_path = lrqgraph.run(to_onnx(net, (x,)), OptimizeConfig(factorize=FactorizeConfig("rtn")))
    assert onnx_path.rewritten == 2
    with torch.no_grad():
        got = small(x).numpy()
    # ort's MatMulNBits against torch's matmul of the same dequantized weights: float32 rounding
    assert _max_rel(got, _ort(onnx_path.model, x)) < 1e-5


def test_compress_rewrites_convolutions_and_export_writes_the_onnx_paths_graph(net, tmp_path):
    x = _images(2, 3)
    cfg = OptimizeConfig(factorize=FactorizeConfig("rtn"), select=lrqgraph.SelectConfig(min_params=512))
    small = lt.compress(net, (x,), config=cfg)
    assert isinstance(small.conv, lt.CompressedConv2d) and isinstance(small.dw, lt.CompressedConv2d)
    path = lt.export(small, (x,), tmp_path / "small.onnx")
    exported = onnx.load(path)
    reference = lrqgraph.run(to_onnx(net, (x,)), cfg).model
    assert sorted(n.op_type for n in exported.graph.node) == sorted(n.op_type for n in reference.graph.node)
    batch5 = _images(5, 4)  # another batch size than the export's: the batch axis is dynamic
    with torch.no_grad():
        want = small(batch5).numpy()
    assert _max_rel(_ort(path, batch5), want) <= 1e-3
    assert _max_rel(_ort(path, batch5), _ort(reference, batch5)) < 1e-5


class ConvBN(torch.nn.Module):
    """Convolutions followed by BatchNorm: exported with γ/σ folded into each conv's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64)
        self.conv2, self.bn2 = torch.nn.Conv2d(64, 64, 1, bias=False), torch.nn.BatchNorm2d(64)
        self.fc = torch.nn.Linear(64, 10)
        for bn in (self.bn1, self.bn2):  # statistics of a trained network, not the identity
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(h.mean((2, 3)))


def test_convolutions_with_a_folded_batchnorm(tmp_path):
    torch.manual_seed(3)
    net = ConvBN().eval()
    x = _images(3, 11)
    cfg = OptimizeConfig(factorize=FactorizeConfig("rtn"), select=lrqgraph.SelectConfig(min_params=512))
    small = lt.compress(net, (x,), config=cfg)
    assert isinstance(small.conv1, lt.CompressedConv2d) and isinstance(small.conv2, lt.CompressedConv2d)
    assert type(small.bn1) is torch.nn.BatchNorm2d  # kept: the compressed weight stands for conv·(1/scale)
    reference = lrqgraph.run(to_onnx(net, (x,)), cfg)
    assert reference.rewritten == 2
    with torch.no_grad():
        got = small(x).numpy()
    assert _max_rel(got, _ort(reference.model, x)) < 1e-5
    path = lt.export(small, (x,), tmp_path / "m.onnx")
    kinds = sorted(n.op_type for n in onnx.load(path).graph.node)
    assert kinds == sorted(n.op_type for n in reference.model.graph.node)
    assert _max_rel(_ort(path, x), got) <= 1e-3


class PaddedConv(torch.nn.Conv2d):
    """A Conv2d subclass with its own forward (EfficientNet's static SAME padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), self.weight, self.bias,
                                          self.stride, 0, self.dilation, self.groups)


def test_subclasses_keep_their_own_forward(tmp_path):
    torch.manual_seed(4)
    net = torch.nn.Sequential(PaddedConv(3, 64, 3, stride=2), torch.nn.ReLU(), PaddedConv(64, 64, 3)).eval()
    x = _images(2, 12)
    cfg = OptimizeConfig(factorize=FactorizeConfig("rtn"), select=lrqgraph.SelectConfig(min_params=512))
    small = lt.compress(net, (x,), config=cfg)
    assert type(small[0]) is PaddedConv and "weight" not in dict(small[0].named_parameters())
    reference = lrqgraph.run(to_onnx(net, (x,)), cfg)
    assert reference.rewritten == 1  # the last conv writes the output: kept, as the ONNX path keeps it
    with torch.no_grad():
        got = small(x).numpy()
    assert _max_rel(got, _ort(reference.model, x)) < 1e-5
    path = lt.export(small, (x,), tmp_path / "m.onnx")
    assert _max_rel(_ort(path, x), got) <= 1e-3
    assert type(small[0]) is PaddedConv and not hasattr(small[0], "weight")  # export left the module alone


class TinyDecoder(torch.nn.Module):
    """An embedding table, one MLP and an lm_head tied to the table (as small decoders do)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(512, 64)
        self.up, self.down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)
        self.lm_head = torch.nn.Linear(64, 512, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.lm_head(h + self.down(torch.relu(self.up(h))))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_embedding_tables_compress_and_export(tmp_path, tied):
    torch.manual_seed(5)
    net = TinyDecoder(tied).eval()
    ids = torch.from_numpy(np.random.default_rng(6).integers(0, 512, (2, 9)))
    cfg = OptimizeConfig(factorize=FactorizeConfig("rtn"),
                         select=lrqgraph.SelectConfig(embeddings=True, keep_output_layers=False))
    small = lt.compress(net, (ids,), config=cfg)
    assert isinstance(small.embed, lt.CompressedEmbedding) and isinstance(small.lm_head, lt.CompressedLinear)
    reference = lrqgraph.run(to_onnx(net, (ids,)), cfg)
    with torch.no_grad():
        got = small(ids).numpy()
    sess = ort.InferenceSession(reference.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert _max_rel(got, sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]) < 1e-5
    path = lt.export(small, (ids,), tmp_path / "m.onnx")
    kinds = sorted(n.op_type for n in onnx.load(path).graph.node)
    assert kinds == sorted(n.op_type for n in reference.model.graph.node)
    assert "GatherBlockQuantized" in kinds
    if tied:  # one matrix in torch and one table in the file, as the ONNX path stores it
        assert small.embed.matrix is small.lm_head.matrix
    assert constant_bytes(onnx.load(path)) == constant_bytes(reference.model)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert _max_rel(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0], got) <= 1e-3


@pytest.mark.parametrize("lowering", ["ort", "std", "lrq"])
def test_export_runs_each_lowering(net, tmp_path, lowering):
    if lowering == "lrq":
        from lrqgraph.runtime import available
        if not available():
            pytest.skip("native ops not built")
    x = _images(2, 5)
    calib = [(_images(8, s),) for s in range(4)]
    small = lt.compress(net, (x,), method="qlr" if lowering == "lrq" else "gptq", calib=calib)
    path = lt.export(small, (x,), tmp_path / "m.onnx", lowering=lowering)
    if lowering == "lrq":
        from lrqgraph.runtime import session
        sess = session(str(path))
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    else:
        got = _ort(path, x)
    with torch.no_grad():
        want = small(x).numpy()
    # lrq's int8 activations (accuracy_level 4 by default) add their own rounding
    assert _max_rel(got, want) <= (2e-2 if lowering == "lrq" else 1e-3)


def test_fx_graph_modules_and_filter_fn(net):
    x = _images(2, 1)
    traced = torch.fx.symbolic_trace(net)
    small = lt.compress(traced, (x,), method="rtn", filter_fn=lambda m, fqn: fqn != "fc2")
    assert isinstance(small, torch.fx.GraphModule)
    assert isinstance(small.fc1, lt.CompressedLinear) and type(small.fc2) is torch.nn.Linear
    plain = lt.compress(net, (x,), method="rtn", filter_fn=lambda m, fqn: fqn != "fc2")
    with torch.no_grad():
        np.testing.assert_array_equal(small(x).numpy(), plain(x).numpy())


def test_allocation_from_a_dataloader_fits_its_budget(net):
    x = _images(2, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_images(32, 9)), batch_size=8)
    small = lt.compress(net, (x,), target_bpw=4.5, calib=loader)
    selected = ("fc1", "fc2")  # past min_params (4096): the allocation's layers
    assert any(isinstance(small.get_submodule(n), lt.CompressedLinear) for n in selected)
    bits = sum(m.matrix.storage_bits if isinstance(m, lt.CompressedLinear) else 32 * m.weight.numel()
               for m in map(small.get_submodule, selected))
    assert bits <= 4.5 * sum(net.get_submodule(n).weight.numel() for n in selected)


def test_bad_calibration_batches_are_refused(net):
    with pytest.raises(lrqgraph.LrqError, match="the model takes 1 inputs"):
        lt.compress(net, (_images(1, 0),), target_bpw=4, calib=[(_images(2, 0), _images(2, 1))])


def test_the_onnx_ir_pass_runs_inside_a_dynamo_export(net, tmp_path):
    import onnx_ir as ir
    from lrqgraph.ir import OptimizePass
    x = _images(2, 6)
    with torch.no_grad():
        program = torch.onnx.export(net, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    before = program.model
    step = OptimizePass(OptimizeConfig(factorize=FactorizeConfig("rtn")))
    result = ir.passes.PassManager([step])(program.model)
    assert result.modified and result.model is not before
    assert step.report["model"]["layers_rewritten"] == 2
    assert "MatMulNBits" in {n.op_type for n in result.model.graph}
    program.model = result.model
    program.save(str(tmp_path / "m.onnx"))
    with torch.no_grad():
        want = net(x).numpy()
    # the pass inside the export computes what lrqgraph.run writes for the same exported graph
    got = _ort(tmp_path / "m.onnx", x)
    direct = lrqgraph.run(ir.serde.serialize_model(before), OptimizeConfig(factorize=FactorizeConfig("rtn")))
    assert direct.report["model"]["layers_rewritten"] == 2  # (the pass left its input as it was)
    np.testing.assert_allclose(got, _ort(direct.model, x), rtol=0, atol=1e-6 * np.abs(got).max())
    assert _max_rel(got, want) > 1e-4  # 4-bit weights: the outputs did move
    untouched = OptimizePass(OptimizeConfig(select=lrqgraph.SelectConfig(min_params=10**9)))(before)
    assert not untouched.modified and len(untouched.model.graph) == len(before.graph)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_compressed_modules_run_on_cuda(net):
    x = _images(2, 8)
    small = lt.compress(net, (x,), method="gptq", calib=[(_images(8, 1),)])
    with torch.no_grad():
        want = small(x).numpy()
        got = small.cuda()(x.cuda()).cpu().numpy()
    assert _max_rel(got, want) < 1e-4


def _example(name: str):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.real
def test_example_torch_compress_on_efficientnet(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the examples extra")
    result = _example("torch_compress").main(["--out", str(tmp_path), "--crops", "2"])
    # the 26 group-1 and 11 depthwise convolutions past min_params (the classifier writes the output: kept)
    assert result["compressed_layers"] == 37
    # the deployed file computes what the torch module computes (float32 rounding of other kernels)
    assert result["torch_vs_onnx_max_rel"] <= 1e-3
    assert result["top1_agreement_torch"] == result["top1_agreement_onnx"]


@pytest.mark.real
def test_example_onnx_ir_pass_in_a_dynamo_export(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the examples extra")
    result = _example("onnx_ir_pass").main(["--out", str(tmp_path), "--crops", "2"])
    assert result["layers_rewritten"] >= 37
    onnx.checker.check_model(str(tmp_path / "efficientnet-lite0.onnx"))
    # the saved file is the compressed network: top-1 agreement with the float module on 24 crops
    # of other photos measured 0.50 (4-bit GPTQ: EfficientNet's convolutions lose there, issue [13]);
    # a broken rewrite (weights scrambled, the pass not applied to the saved model) lands near 0 of
    # 1000 classes or at 1.0
    assert 0.35 <= result["top1_agreement"] < 1.0, result
