"""Streamed models (lrqgraph.external, lrqgraph.blocks): weights read one tensor at a time, new
constants spilled to a file as each layer is lowered, verification block by block, the output
copied range by range. The result must be the bytes of the in-memory path's."""
from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lrqgraph
from lrqgraph import external
from lrqgraph.api import run
from lrqgraph.blocks import run_blocks, split_blocks
from lrqgraph.config import OptimizeConfig
from lrqgraph.io import load_model, save_model
from lrqgraph.model import ModelState
from lrqgraph.runtime import session
from lrqgraph.testing.llama_shaped import LlamaShape, write_llama_shaped
from lrqgraph.testing.memory import run_measured

TINY = LlamaShape(layers=2, hidden=64, intermediate=172, vocab=320, heads=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_llama_shaped(tmp_path_factory.mktemp("tiny") / "model.onnx", TINY)


def _digest(path) -> str:
    """Of the model file and its data file."""
    h = hashlib.sha256()
    for f in (path, path.parent / (path.name + ".data")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _tensors(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_a_streamed_run_writes_what_the_in_memory_run_writes(tiny, tmp_path):
    before = _digest(tiny)
    streamed = run(tiny, OptimizeConfig(stream_above=0))
    in_memory = run(tiny, OptimizeConfig(stream_above=None))
    assert external.has_absolute_external(streamed.model) and not external.has_absolute_external(in_memory.model)
    save_model(streamed.model, tmp_path / "s.onnx", source=tiny)
    save_model(in_memory.model, tmp_path / "m.onnx", external_data=True, source=tiny)
    assert _digest(tiny) == before  # the input is never modified
    ours, theirs = onnx.load(str(tmp_path / "s.onnx")), onnx.load(str(tmp_path / "m.onnx"))
    assert [(n.op_type, n.name, list(n.input)) for n in ours.graph.node] == \
        [(n.op_type, n.name, list(n.input)) for n in theirs.graph.node]
    a, b = _tensors(tmp_path / "s.onnx"), _tensors(tmp_path / "m.onnx")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    timed = in_memory.report["verify"].pop("latency")  # whole sessions are timed; a streamed run has none
    assert timed["batch 1"]["ratio"] > 0 and "latency" not in streamed.report["verify"]
    assert streamed.report["verify"] == in_memory.report["verify"]
    ids = {"input_ids": np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int64)}
    assert np.array_equal(session(str(tmp_path / "s.onnx")).run(None, ids)[0],
                          session(str(tmp_path / "m.onnx")).run(None, ids)[0])


def calibrated_bytes(model, tmp_path, runs: dict) -> dict[str, dict[str, np.ndarray]]:
    """name -> the written model's tensors, for each (stream_above, ExecutorConfig) in ``runs``,
    calibrated on 16 token windows."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, TINY.vocab, (16, 12)))
    written = {}
    for name, (stream, executor) in runs.items():
        result = run(model, OptimizeConfig(stream_above=stream, calib=str(calib), executor=executor))
        assert "16 samples" in result.report["calibration"]
        save_model(result.model, tmp_path / f"{name}.onnx", external_data=True)
        written[name] = _tensors(tmp_path / f"{name}.onnx"), result.report
    return written


def test_calibrated_streaming_block_by_block_writes_the_in_memory_bytes(tiny, tmp_path, monkeypatch):
    """H summed block by block (blocks of at most 50 kB: several per decoder layer), weights read
    by the workers from the file: the same GPTQ codes as one whole-model session, on every executor."""
    monkeypatch.setattr(lrqgraph.blocks, "BLOCK_BYTES", 50_000)
    monkeypatch.setenv("LRQGRAPH_CACHE", str(tmp_path / "cache"))
    model = external.absolutize(onnx.load(str(tiny), load_external_data=False), tiny.parent)
    assert len(split_blocks(model)) >= 4
    written = calibrated_bytes(tiny, tmp_path, {
        "in_memory": (None, lrqgraph.ExecutorConfig("local")),
        "streamed_local": (0, lrqgraph.ExecutorConfig("local")),
        "streamed_process": (0, lrqgraph.ExecutorConfig("process", workers=2))})
    reference = written["in_memory"][0]
    for name in ("streamed_local", "streamed_process"):
        tensors, report = written[name]
        assert tensors.keys() == reference.keys() and all(np.array_equal(tensors[k], reference[k]) for k in tensors)
        # where the original's blocks meet, the rewritten model's tensors are compared too
        blocks = report["verify"]["blocks"]
        lookup = next(n.output[0] for n in model.graph.node if n.op_type == "Gather")
        assert len(blocks) >= 3 and blocks[lookup]["max_rel"] == 0.0  # the embedding is not rewritten
        rewritten = {name: b for name, b in blocks.items() if name != lookup}
        assert rewritten and all(b["max_rel"] > 0 for b in rewritten.values())  # the rewritten blocks moved
    # the same bytes, measured block by block in one process or in workers: the same numbers
    assert written["streamed_local"][1]["verify"]["blocks"] == written["streamed_process"][1]["verify"]["blocks"]


def test_a_streamed_model_keeps_no_weight_in_memory(tiny):
    state = ModelState(load_model(tiny, stream_above=0), external_dir=tiny.parent, source=tiny)
    ctx = lrqgraph.passmanager.Context(state, OptimizeConfig(stream_above=0))
    layers = [layer for layer in ctx.analysis("layers") if layer.rewrite]
    assert layers and all(np.isfinite(layer.weight_matrix()).all() for layer in layers)
    weights = [t for t in state.graph.tensors().values() if isinstance(t, lrqgraph.model.gs.Constant)
               and t.shape and np.prod(t.shape) >= 64]
    # every weight read so far came from its file and was not kept on the constant
    assert weights and all(isinstance(t._values, external.FileValues) for t in weights)


def test_blocks_compute_the_whole_models_outputs(tiny):
    model = external.absolutize(onnx.load(str(tiny), load_external_data=False), tiny.parent)
    blocks = split_blocks(model, max_bytes=100_000)
    assert len(blocks) >= 4
    assert max(b.weight_bytes for b in blocks if len(b.initializers) > 1) <= 100_000
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, TINY.vocab, (1, 12))} for _ in range(3)]
    got = run_blocks(model, feeds, max_bytes=100_000)
    whole = session(str(tiny))
    for feed, out in zip(feeds, got):
        # the same kernels on the same values; only onnxruntime's fusions across a cut may differ,
        # measured at 0 on this graph
        np.testing.assert_allclose(out["logits"], whole.run(None, feed)[0], rtol=1e-6, atol=1e-6)


def test_the_output_may_not_overwrite_the_inputs_data(tiny, tmp_path):
    alias = tiny.parent / "alias.onnx"  # the same graph and data file under another name
    alias.write_bytes(tiny.read_bytes())
    streamed = run(alias, OptimizeConfig(stream_above=0))
    before = _digest(tiny)
    with pytest.raises(lrqgraph.LrqError, match="would overwrite the input model's"):
        save_model(streamed.model, tiny, source=alias)  # its data file would be model.onnx.data
    alias.unlink()
    assert _digest(tiny) == before


def test_a_model_larger_than_its_memory_budget_streams_through_the_command(tmp_path):
    """About 1 GB of weights; the whole run (discover, factorize, lower, verify, write) must stay
    below 0.75x of it. Loading the model whole, as before streaming, takes more than 1x."""
    shape = LlamaShape(layers=4, hidden=2048, intermediate=5632, vocab=16000, heads=16)
    model = write_llama_shaped(tmp_path / "model.onnx", shape)
    measured = run_measured([sys.executable, "-m", "lrqgraph", "optimize", str(model), "-o",
                             str(tmp_path / "out.onnx"), "--executor", "local", "--stream-above", "0"])
    assert measured.returncode == 0, measured.output[-2000:]
    assert measured.peak_rss < 0.75 * shape.nbytes, (measured.peak_rss, shape.nbytes)
    out = session(str(tmp_path / "out.onnx")).run(None, {"input_ids": np.arange(8, dtype=np.int64)[None]})[0]
    assert out.shape == (1, 8, shape.vocab) and np.isfinite(out).all()
    assert subprocess.run([sys.executable, "-c", "import onnx,sys; onnx.checker.check_model(sys.argv[1])",
                           str(tmp_path / "out.onnx")]).returncode == 0


def test_an_allocation_on_a_streamed_model_is_refused_in_one_line(tiny, tmp_path):
    command = [sys.executable, "-m", "lrqgraph", "optimize", str(tiny), "-o", str(tmp_path / "out.onnx"),
               "--target-bpw", "4", "--stream-above", "0"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "does not run on streamed models yet" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("stream", [0, None], ids=["streamed", "in_memory"])
def test_an_interrupted_factorize_resumes_from_its_checkpoints_with_the_same_bytes(tiny, tmp_path, monkeypatch,
                                                                                  stream):
    """Interrupted at its sixth layer, the factorize pass keeps the five it planned (a streamed
    model's codes beside them); --resume solves only the others and writes the whole run's bytes."""
    import lrqgraph.passes.factorize as factorize
    monkeypatch.setenv("LRQGRAPH_CACHE", str(tmp_path / "cache"))
    cfg = OptimizeConfig(stream_above=stream, executor=lrqgraph.ExecutorConfig("local"))
    whole = run(tiny, cfg)
    for folder in ("whole", "resumed"):
        (tmp_path / folder).mkdir()
    save_model(whole.model, tmp_path / "whole" / "out.onnx", external_data=True)
    checkpoints = tmp_path / "cache" / "checkpoints"
    assert not list(checkpoints.glob("*/*"))  # a whole run leaves none
    real, calls = factorize.solve_layer, []

    def interrupted_at_the_sixth(*args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(factorize, "solve_layer", interrupted_at_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, cfg)
    assert len(list(checkpoints.glob("*/*.pkl"))) == 5
    monkeypatch.setattr(factorize, "solve_layer", real)
    resumed = run(tiny, dataclasses.replace(cfg, resume=True))
    save_model(resumed.model, tmp_path / "resumed" / "out.onnx", external_data=True)
    assert resumed.report["executor"]["tasks"] == whole.report["executor"]["tasks"] - 5
    for name in ("out.onnx", "out.onnx.data"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not list(checkpoints.glob("*/*"))
