"""The lossless goal (--labels): the smallest model whose top-1 accuracy on labelled samples is not
below the original's, searched on one half of them and checked on the other."""
import numpy as np
import pytest

import lrqgraph
from lrqgraph import AllocateConfig, OptimizeConfig, SelectConfig
from lrqgraph.evaluate import open_session

import builders


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A 48-class classifier (a 3-layer MLP: random weights, whose top-1 varies with the input, where a
    small CNN's would not), calibration inputs, and labelled inputs: the class the original predicts
    with a margin (ties broken by noise would make the task itself noise), 3 in 4 of them right."""
    tmp = tmp_path_factory.mktemp("lossless")
    model = builders.mlp_model()
    np.savez(tmp / "calib.npz", x=_images(48, 7))
    x = _images(512, 8)
    logits = open_session(model).run(None, {"x": x})[0]
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > np.median(top2[:, 1] - top2[:, 0])
    x, logits = x[clear], logits[clear]
    labels = logits.argmax(1)
    wrong = np.random.default_rng(0).random(len(labels)) < 0.25  # a task the original does not ace
    labels[wrong] = (labels[wrong] + 1) % logits.shape[1]
    np.savez(tmp / "labels.npz", x=x, labels=labels)
    return model, tmp


def _run(model, tmp, **allocate):
    cfg = OptimizeConfig(calib=str(tmp / "calib.npz"), select=SelectConfig(min_params=256, keep_output_layers=False),
                         allocate=AllocateConfig(labels=str(tmp / "labels.npz"), **allocate))
    return lrqgraph.api.run(model, cfg)


def test_the_lossless_search_finds_a_smaller_model_that_keeps_the_search_accuracy(labelled):
    model, tmp = labelled
    result = _run(model, tmp)
    a = result.report["allocation"]
    assert a["mode"] == "lossless"
    search, validation = a["labelled"]["search"], a["labelled"]["validation"]
    assert search["accuracy"] >= search["original"]["accuracy"] and 0.5 < search["original"]["accuracy"] < 1.0
    assert search["samples"] + validation["samples"] == len(np.load(tmp / "labels.npz")["labels"])
    assert a["met"] == (validation["accuracy"] >= validation["original"]["accuracy"])
    rewritten = [e for e in result.report["layers"] if e["action"] == "rewrite"]
    assert rewritten and a["bpw"] < 32  # smaller than the float model
    # the report's accuracies are the written model's: whichever samples each half holds, their
    # right answers add up to what onnxruntime gets right over all the labelled samples
    data = np.load(tmp / "labels.npz")
    right = int((open_session(result.model).run(None, {"x": data["x"]})[0].argmax(1) == data["labels"]).sum())
    reported = search["accuracy"] * search["samples"] + validation["accuracy"] * validation["samples"]
    assert reported == pytest.approx(right, abs=1e-6)


def test_when_the_cheapest_model_loses_accuracy_the_search_bisects_to_one_that_does_not(labelled, tmp_path):
    model, tmp = labelled
    x = _images(192, 9)
    np.savez(tmp_path / "labels.npz", x=x, labels=open_session(model).run(None, {"x": x})[0].argmax(1))
    cfg = OptimizeConfig(calib=str(tmp / "calib.npz"), select=SelectConfig(min_params=256, keep_output_layers=False),
                         allocate=AllocateConfig(labels=str(tmp_path / "labels.npz")))
    a = lrqgraph.api.run(model, cfg).report["allocation"]
    cheapest = min(bpw for bpw, _ in a["frontier"])
    # labels are the original's own top-1: any flipped sample loses accuracy, the cheapest flips some
    assert a["labelled"]["search"]["original"]["accuracy"] == 1.0 and a["labelled"]["search"]["accuracy"] == 1.0
    assert cheapest < a["bpw"] < 32


def test_the_split_follows_the_seed(labelled):
    model, tmp = labelled
    one, other = (_run(model, tmp, labels_seed=s).report["allocation"]["labelled"] for s in (0, 1))
    assert (one["search"]["original"], one["validation"]["original"]) != \
        (other["search"]["original"], other["validation"]["original"])


@pytest.mark.parametrize("arrays, why", [
    ({"x": _images(8, 1)}, "no array 'labels'"),
    ({"image": _images(8, 1), "labels": np.zeros(8)}, "no array 'x'"),
    ({"x": _images(8, 1), "labels": np.zeros(5)}, "5 labels for 8 samples of 'x'"),
])
def test_bad_labels_are_refused_in_one_line(labelled, arrays, why):
    model, tmp = labelled
    np.savez(tmp / "bad.npz", **arrays)
    cfg = OptimizeConfig(calib=str(tmp / "calib.npz"), select=SelectConfig(min_params=256, keep_output_layers=False),
                         allocate=AllocateConfig(labels=str(tmp / "bad.npz")))
    with pytest.raises(lrqgraph.LrqError, match=why):
        lrqgraph.api.run(model, cfg)


def test_labels_are_one_goal_among_the_others():
    with pytest.raises(lrqgraph.LrqError, match="give one goal"):
        AllocateConfig(labels="labels.npz", target_bpw=4)


def test_the_cli_takes_labels_and_reports_both_halves(labelled, tmp_path):
    import json

    import onnx

    from lrqgraph.cli import main
    model, tmp = labelled
    onnx.save(model, tmp_path / "m.onnx")
    code = main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--calib", str(tmp / "calib.npz"),
                 "--labels", str(tmp / "labels.npz"), "--min-params", "256", "--output-layers",
                 "--report", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["allocation"]["mode"] == "lossless"
    assert set(report["allocation"]["labelled"]) == {"search", "validation"}



def test_log_loss_reads_logits_and_probabilities_alike():
    from lrqgraph.labels import log_loss
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    labels = np.array([0, 1, 1])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = -np.log(p[np.arange(3), labels]).mean()
    assert log_loss([[logits]], labels) == pytest.approx(expected, rel=1e-12)
    assert log_loss([[p]], labels) == pytest.approx(expected, rel=1e-12)


def test_a_chance_gain_does_not_pay_for_a_lost_sample():
    from lrqgraph.labels import loss_against, top1_accuracy
    labels = np.array([0, 1, 1, 0])
    original = np.array([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.3]])  # right, right, wrong, wrong
    traded = np.array([[2.0, 0.0], [0.2, 0.0], [0.0, 0.5], [0.3, 0.0]])   # loses the 2nd, gains the 3rd and 4th
    assert top1_accuracy([[traded]], labels) > top1_accuracy([[original]], labels)
    assert loss_against([[original]], [[traded]], labels) == pytest.approx(0.25)
    gained_only = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.5], [0.0, 0.3]])
    assert loss_against([[original]], [[gained_only]], labels) == 0
