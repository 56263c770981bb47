"""Decoders as LLM users deploy them: an onnxruntime-genai folder written by onnxruntime-genai's
own builder in the test run (a tiny random Llama: structure, not quality), through lrqgraph and
back into onnxruntime-genai."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from lrqgraph import calib
from lrqgraph.errors import LrqError
from lrqgraph.io import load_model
from lrqgraph.model import ModelState

genai_decoder = pytest.importorskip("lrqgraph.testing.genai_decoder", reason="needs the examples extra")
pytest.importorskip("onnxruntime_genai", reason="needs the examples extra (onnxruntime-genai)")
pytestmark = pytest.mark.real

IDS = [0] + list(range(3, 60))  # a teacher-forced window of token ids
# Lowest per-position cosine of the logits against the fp32 folder's, through onnxruntime-genai,
# measured on this random model with every layer rewritten (the tied embedding / lm_head too) and
# the folder defaults (min/max scales, int8 activations): defaults 0.9594, --calib 0.9637,
# --target-bpw 3 --lowering lrq --latency-budget off 0.8823 (0.8985 under the budget; its table
# at 4 bits, the grid below 4 bits per weight: 0.9259 when it took 8). Broken caches or wrong
# weights give cosines near 0; the margins allow for other CPUs' BLAS in the calibrated fits.
MIN_COSINE = {"defaults": 0.95, "calib": 0.955, "bpw3-lrq": 0.87}


@pytest.fixture(scope="module")
def folder():
    return genai_decoder.folder()


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "lines.txt"
    path.write_text("\n".join(genai_decoder.TEXT) + "\n", encoding="utf-8")
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lrqgraph", *map(str, args)], capture_output=True, text=True)


def _bytes(folder):
    return sum(p.stat().st_size for p in folder.iterdir())


def _cosines(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_builder_writes_contrib_ops_in_the_default_domain_and_lrqgraph_reads_them(folder):
    model = load_model(folder / "model.onnx")  # onnx.checker alone refuses it
    default_domain = {n.op_type for n in model.graph.node if n.domain == ""}
    assert "SimplifiedLayerNormalization" in default_domain
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(model)
    assert {n.op_type for n in model.graph.node if n.domain == "com.microsoft"} >= {"GroupQueryAttention"}


def test_an_op_neither_onnx_nor_onnxruntime_knows_is_still_refused(tmp_path):
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(LrqError, match="invalid ONNX model.*NoSuchOp"):
        load_model(path)


def test_synthetic_inputs_are_an_empty_cache_of_the_attention_ops_shape(folder):
    import onnxruntime as ort
    model = load_model(folder / "model.onnx")
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    feeds = calib.synthesize(model, ModelState(model).graph, samples=3)
    past = [name for name in feeds if name.startswith("past_key_values.")]
    assert len(past) == 2 * config["num_hidden_layers"]
    for name in past:  # the declared dims are all symbolic but the KV heads
        assert feeds[name].shape == (3, config["num_key_value_heads"], 0, config["head_size"])
    assert feeds["attention_mask"].shape == feeds["input_ids"].shape
    outs = ort.InferenceSession(str(folder / "model.onnx")).run(["present.0.key"], feeds)
    assert outs[0].shape == (3, config["num_key_value_heads"], feeds["input_ids"].shape[1], config["head_size"])


def test_text_calibration_feeds_a_cached_decoder(folder, lines):
    model = load_model(folder / "model.onnx")
    data = calib.load_calibration(lines, model, tokenizer=str(folder), graph=ModelState(model).graph)
    assert data.samples == len(genai_decoder.TEXT)
    # one line per run, unpadded: GroupQueryAttention takes no padding in a prompt (onnxruntime
    # refuses a batch of lines of unequal length: "seqlens_k[0] = 10 is too small")
    assert len(data.batches) == data.samples
    assert len({run["input_ids"].shape[1] for run in data.batches}) > 1
    for run in data.batches:
        assert run["past_key_values.1.value"].shape == (1, 2, 0, 64)
        assert run["attention_mask"].all() and run["attention_mask"].shape == run["input_ids"].shape


def test_measurement_prompts_join_lines_into_one_sequence(folder, lines):
    """The allocator's measurement runs: lines joined into prompts of up to 64 tokens, each from an
    empty cache; the first line of a joined prompt reads only itself, so its logits are its own."""
    import onnxruntime as ort
    from lrqgraph.kvcache import past_inputs
    model = load_model(folder / "model.onnx")
    graph = ModelState(model).graph
    runs = calib.load_calibration(lines, model, tokenizer=str(folder), graph=graph).batches
    packed = calib.pack_prompts(runs, past_inputs(graph), length=64)
    lengths = [run["input_ids"].shape[1] for run in runs]
    assert len(packed) < len(runs) and sum(p["input_ids"].shape[1] for p in packed) == sum(lengths)
    assert all(p["input_ids"].shape[1] <= 64 for p in packed if len(p) > 1)
    session = ort.InferenceSession(str(folder / "model.onnx"))
    first = session.run(["logits"], runs[0])[0][0]
    joined = session.run(["logits"], packed[0])[0][0]
    assert joined.shape[0] > lengths[0]
    np.testing.assert_allclose(joined[:lengths[0]], first, rtol=1e-4, atol=1e-4 * np.abs(first).max())
    assert calib.pack_prompts(runs, {}) is runs  # a model without a cache: runs as they are


@pytest.mark.parametrize("name,options", [("defaults", []), ("calib", ["--calib", "LINES"]),
                                          # (the folder handling, not the latency budget: timings of
                                          # this toy decoder's tiny layers are noise on a busy machine,
                                          # where the budget once dropped every candidate below 14 bpw)
                                          ("bpw3-lrq", ["--calib", "LINES", "--target-bpw", 3, "--lowering", "lrq",
                                                        "--latency-budget", "off"])])
def test_a_genai_folder_in_a_genai_folder_out(folder, lines, tmp_path, name, options):
    out = tmp_path / name
    done = _cli("optimize", folder, "-o", out, "-q", *[lines if o == "LINES" else o for o in options])
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in folder.iterdir()] + (["liblrq_ops.so"] if name == "bpw3-lrq" else []))
    config = json.loads((out / "genai_config.json").read_text())
    library = config["model"]["decoder"]["session_options"].get("custom_ops_library")
    assert library == ("liblrq_ops.so" if name == "bpw3-lrq" else None)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    rewritten = {"defaults": "MatMulNBits", "calib": "MatMulNBits", "bpw3-lrq": None}[name]
    ops = {n.op_type for n in model.graph.node}
    assert rewritten in ops if rewritten else any(n.domain == "lrq" for n in model.graph.node)
    assert "MatMul" not in ops or name == "bpw3-lrq"  # every projection rewritten (the lm_head too, under budget)
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels <= {4}  # int8 activations by default, as the builder's int4 (decode 3.4x faster)
    if name == "defaults":  # the builder's int4 quantizes the same layers at the same 5 bits per weight
        builder_int4 = genai_decoder.folder("int4")
        assert _bytes(out) <= _bytes(builder_int4), (_bytes(out), _bytes(builder_int4))
    assert _bytes(out) < 0.5 * _bytes(folder)
    cos = _cosines(genai_decoder.teacher_forced_logits(folder, IDS), genai_decoder.teacher_forced_logits(out, IDS))
    assert cos.min() >= MIN_COSINE[name], f"{name}: logits cosine min {cos.min():.4f}"
    generated = genai_decoder.generate(out, "And God said", new_tokens=6)
    assert len(generated) == len(genai_decoder.generate(folder, "And God said", new_tokens=6))


def test_output_folder_rules(folder, tmp_path):
    same = _cli("optimize", folder, "-o", folder)
    assert same.returncode == 2 and "is the input folder" in same.stderr
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    refused = _cli("optimize", folder, "-o", foreign)
    assert refused.returncode == 2 and "not a genai model folder" in refused.stderr
    assert [p.name for p in foreign.iterdir()] == ["a.jpg"]
    failed = _cli("optimize", folder, "-o", tmp_path / "out", "--max-error", "1e-9")
    assert failed.returncode == 1 and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]  # no staging folder left behind
    first = _cli("optimize", folder, "-o", tmp_path / "out", "-q")
    assert first.returncode == 0, first.stderr
    (tmp_path / "out" / "stale.txt").write_text("from an earlier run")
    again = _cli("optimize", folder, "-o", tmp_path / "out", "-q", "--bits", 8)
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "out" / "stale.txt").exists()  # the folder is replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "photos"]


def test_the_python_api_writes_the_folder_the_cli_writes(folder, tmp_path):
    import lrqgraph
    result = lrqgraph.optimize_folder(folder, tmp_path / "api")
    assert result.rewritten == 11  # 2 blocks x (qkv, o, gate, up, down) and the tied table / lm_head
    chosen = lrqgraph.optimize_folder(folder, tmp_path / "float", lrqgraph.OptimizeConfig(accuracy_level=0))
    model = onnx.load(str(tmp_path / "float" / "model.onnx"), load_external_data=False)
    assert chosen.rewritten == 11 and {a.i for n in model.graph.node for a in n.attribute
                                       if a.name == "accuracy_level"} == {0}  # what the caller set is kept
    assert _cli("optimize", folder, "-o", tmp_path / "cli", "-q").returncode == 0
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def _gqa_model(window: int):
    """x [batch, seq, 16] → packed QKV projection → GroupQueryAttention (2 heads, 1 KV head, head size 8)
    with a cache (outputs y, present_key, present_value), and sliding-window attention when ``window`` > 0."""
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32), "w")
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    axis = numpy_helper.from_array(np.array([1], np.int64), "axis")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"]),
             helper.make_node("ReduceSum", ["attention_mask", "axis"], ["len"], keepdims=0),
             helper.make_node("Sub", ["len", "one"], ["len1"]),
             helper.make_node("Cast", ["len1"], ["seqlens"], to=TensorProto.INT32),
             helper.make_node("Shape", ["attention_mask"], ["shape"], start=1, end=2),
             helper.make_node("Squeeze", ["shape"], ["total64"]),
             helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
             helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens", "total"],
                              ["y", "present_key", "present_value"], domain="com.microsoft", num_heads=2,
                              kv_num_heads=1, local_window_size=window)]
    past = ["batch", 1, "past", "head"]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, past),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, past)]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
               for name in ("y", "present_key", "present_value")]
    return helper.make_model(helper.make_graph(nodes, "gqa", inputs, outputs, [w, one, axis]),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("window", [-1, 8, 32])
def test_an_empty_cache_for_full_and_sliding_window_attention(window):
    """Full attention takes a past of length 0; sliding-window attention a buffer of at least the
    window and the prompt (onnxruntime refuses less), which the mask leaves unused."""
    import onnxruntime as ort
    model = _gqa_model(window)
    feeds = calib.synthesize(model, ModelState(model).graph, samples=2)
    assert feeds["x"].shape[1] == 16  # a prompt longer than a window of 8
    assert feeds["past_key"].shape == (2, 1, max(window, 16) if window > 0 else 0, 8)  # head size 32 / (2 + 2 x 1)
    session = ort.InferenceSession(model.SerializeToString())
    y = session.run(None, feeds)[0]
    if window > 0:  # the unused buffer changes nothing: the same as a full-attention cache of 0 as far
        # as the window reaches (beyond it a position no longer sees the first tokens)
        full = _gqa_model(-1)
        empty = calib.synthesize(full, ModelState(full).graph, samples=2)
        want = ort.InferenceSession(full.SerializeToString()).run(None, empty)[0]
        np.testing.assert_allclose(y[:, :window], want[:, :window], rtol=1e-5)


def test_verify_compares_the_cache_positions_a_run_wrote(monkeypatch):
    """A sliding-window layer's present buffer is longer than the run's tokens, and onnxruntime
    leaves the rest as the memory held (Gemma 3's showed 1e38 and NaN): verify compares only the
    positions the attention mask covers."""
    from lrqgraph.config import VerifyConfig
    from lrqgraph.passes import verify

    class Unwritten:  # a session whose present buffers hold NaN beyond the run's tokens
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, names, feed):
            outputs = self.session.run(names, feed)
            for value in outputs[1:]:
                value[:, :, feed["attention_mask"].shape[1]:] = np.nan
            return outputs

    real = verify.open_session
    monkeypatch.setattr(verify, "open_session", lambda model: Unwritten(real(model)))
    model = _gqa_model(32)
    report = verify.compare_outputs(model, model, model, ModelState(model).graph, VerifyConfig(samples=2)).as_report()
    presents = [report["outputs"][name] for name in ("present_key", "present_value")]
    assert all(p["non_finite"] == 0 and p["max_rel"] == 0 and p["cosine_min"] > 0.99999 for p in presents)


def test_check_each_pass_reports_only_what_the_passes_break(folder, tmp_path):
    """The builder's graph already fails strict shape inference (a Constant whose declared rank
    differs from its value's): --check-each-pass says so once and checks the passes against it."""
    done = _cli("optimize", folder, "-o", tmp_path / "out", "--check-each-pass", "-q")
    assert done.returncode == 0, done.stderr
    assert "the input already fails the check" in done.stderr


def test_the_builders_int4_folder_passes_through(tmp_path):
    """MatMulNBits already in the graph (a quantized model) and the contrib ops around it are left
    as they are; the output folder still loads and gives the input's logits."""
    int4 = genai_decoder.folder("int4")
    done = _cli("optimize", int4, "-o", tmp_path / "out", "--report", tmp_path / "r.json", "-q")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["layers_rewritten"] == 0
    assert {layer["reason"] for layer in report["layers"] if layer["op"] == "MatMulNBits"} == {"already quantized"}
    np.testing.assert_array_equal(genai_decoder.teacher_forced_logits(int4, IDS),
                                  genai_decoder.teacher_forced_logits(tmp_path / "out", IDS))


def test_the_builders_tied_table_is_measured_as_one_weight(folder):
    """The builder stores the tied table as the lm_head's [hidden, vocab] weight W and the Gather
    reads Wᵀ: a replaced table must reach the lm_head too. Halving it halves the logits (the
    embedding's scale is undone by the first RMSNorm), as a session over a model whose W is halved
    computes; measuring only the Gather's copy would leave the logits almost as they were."""
    import onnxruntime as ort
    from onnx import numpy_helper
    from lrqgraph.evaluate import Degradation
    model = load_model(folder / "model.onnx")
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and "embed" in n.name)
    table = gather.input[0]  # the Transpose's output
    w = next(t for t in model.graph.initializer if t.name == "lm_head.MatMul.weight")
    feeds = calib.synthesize(model, ModelState(model).graph, samples=2)
    meter = Degradation(model, [table], [feeds])
    got = meter.outputs({table: 0.5 * numpy_helper.to_array(w).T})[0][0]
    halved = onnx.ModelProto()
    halved.CopyFrom(model)
    next(t for t in halved.graph.initializer if t.name == w.name).CopyFrom(
        numpy_helper.from_array(0.5 * numpy_helper.to_array(w), w.name))
    want = ort.InferenceSession(halved.SerializeToString()).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    original = ort.InferenceSession(model.SerializeToString()).run(["logits"], feeds)[0]
    assert np.abs(got - original).max() > 0.1 * np.abs(original).max()


def test_the_summary_gives_a_kv_cache_one_line():
    """A decoder has an output per cached key and value (36 for Gemma 3 270M): the summary shows the
    first outputs one by one and the rest in one line with their worst figures."""
    from lrqgraph.report import summary
    outputs = {"logits": {"max_abs": 1.0, "max_rel": 0.1, "cosine_mean": 0.99, "cosine_min": 0.95, "non_finite": 0}}
    for i in range(18):
        for kind in ("key", "value"):
            outputs[f"present.{i}.{kind}"] = {"max_abs": 0.5, "max_rel": 0.01 * (i + 1), "cosine_mean": 0.999,
                                              "cosine_min": 0.99 - 0.001 * i, "non_finite": 0}
    lines = summary({"verify": {"outputs": outputs, "samples": 16, "inputs": "16 lines"}}).splitlines()
    assert len(lines) == 4 and lines[0].startswith("verify 'logits'")
    assert "34 more outputs ('present.1.key' ... 'present.17.value')" in lines[-1]
    assert "worst max rel 0.18" in lines[-1] and "worst cosine min 0.97300" in lines[-1]
