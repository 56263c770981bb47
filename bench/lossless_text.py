"""The lossless goal on a real text task: MiniLM with a logistic-regression sentiment head.

    python bench/lossless_text.py [--seeds 5] [--out lossless_text.md]

Data: the 200 labelled movie-review sentences of Pang & Lee's polarity set (in gensim's wheel).
For each seed: a seeded half (100 sentences) trains a logistic-regression head (scikit-learn) on
fp32 MiniLM embeddings, appended to the MiniLM ONNX graph as MatMul + Add ("logits"); the other
100 are the labelled set of ``--labels``, which lrqgraph splits by the same seed into the search
half (the smallest model whose accuracy there is not below the original's) and the validation
half it never sees. Calibration: 128 KJV verses (another domain). Columns as bench/cnn.py's
lossless table: file bits per weight (over MiniLM's parameters) and MB (the head included), accuracy of the original and
of the result on both halves, build seconds; then mean and spread over the seeds.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lrqgraph import AllocateConfig, OptimizeConfig  # noqa: E402
from lrqgraph.testing import data, minilm  # noqa: E402

from common import lossless_rows, publish  # noqa: E402


def polarity() -> tuple[list[str], np.ndarray]:
    """The 200 sentences and their labels (1: positive)."""
    spec = importlib.util.find_spec("gensim")
    corpus = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / "pang_lee_polarity.cor"
    pairs = [line.split(" ", 1) for line in corpus.read_text(encoding="latin1").splitlines() if " " in line]
    return [text.strip() for _, text in pairs], np.array([label == "__label__pos" for label, _ in pairs], np.int64)


def with_head(encoder: onnx.ModelProto, coef: np.ndarray, intercept: np.ndarray) -> onnx.ModelProto:
    """MiniLM's graph with logits = embedding · coefᵀ + intercept as its output (a binary head's
    one score z becomes the two logits (-z/2, z/2), whose argmax is the predicted class)."""
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    model = onnx.ModelProto()
    model.CopyFrom(encoder)
    g = model.graph
    embedding = g.output[0].name
    g.initializer.extend([numpy_helper.from_array(coef.T.astype(np.float32), "head.weight"),
                          numpy_helper.from_array(intercept.astype(np.float32), "head.bias")])
    g.node.extend([helper.make_node("MatMul", [embedding, "head.weight"], ["head.matmul"], name="head/MatMul"),
                   helper.make_node("Add", ["head.matmul", "head.bias"], ["logits"], name="head/Add")])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", coef.shape[0]]))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    sentences, labels = polarity()
    fp32 = minilm.onnx_path()
    encoder = onnx.load(fp32)
    feeds = minilm.encode(sentences)
    embeddings = minilm.embed(str(fp32), sentences)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", **minilm.encode(data.kjv_sentences(128, start=1), pad_to=64))
        configs = []
        for seed in range(args.seeds):
            order = np.random.default_rng(100 + seed).permutation(len(labels))
            train, task = order[:len(order) // 2], order[len(order) // 2:]
            head = LogisticRegression(C=10.0, max_iter=2000).fit(embeddings[train], labels[train])
            path = tmp / f"minilm-head{seed}.onnx"
            onnx.save(with_head(encoder, head.coef_, head.intercept_), path)
            np.savez(tmp / f"labels{seed}.npz", labels=labels[task], **{k: v[task] for k, v in feeds.items()})
            configs.append((seed, OptimizeConfig(calib=str(tmp / "calib.npz"), allocate=AllocateConfig(
                labels=str(tmp / f"labels{seed}.npz"), labels_seed=seed)), path))
        headers, rows = lossless_rows(fp32, tmp, configs)
    publish(f"MiniLM + logistic-regression head · {len(labels)} Pang & Lee sentences (100 train the head, "
            f"100 labelled, halves by seed) · calibration 128 KJV verses · fp32 file "
            f"{fp32.stat().st_size / 1e6:.2f} MB", headers, rows, args.out)


if __name__ == "__main__":
    main()
