"""Labelled data for the lossless search: a classifier's inputs with their true classes.

A ``labels.npz`` holds one array per model input (the names of the graph inputs, samples along
axis 0) and ``labels``: the class index of each sample. The samples are split by a seeded
permutation into a search half, on which the allocator looks for the smallest model that loses
nothing against the original: every search sample the original classifies right stays right (so
top-1 accuracy cannot fall), and a validation half it never looks at, on which the result is
checked (see passes/allocate.py, the lossless goal). Accuracy alone is a weaker test: on 50
sentences a model that flips a few predictions both ways can gain a sentence or two by chance and
pass, then lose them on the validation half. Log-loss alone is a coin flip for small perturbations
(their first-order change has a random sign), so it is reported, not tested.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import LrqError
from .evaluate import Degradation

BATCH = 16


def _scores(runs: list[list[np.ndarray]]) -> np.ndarray:
    """[samples, classes] of the first output of each run (batches in order)."""
    return np.concatenate([np.asarray(r[0], np.float64).reshape(len(r[0]), -1) for r in runs])


def top1_accuracy(runs: list[list[np.ndarray]], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output of each run (batches in order) against ``labels``."""
    return float((_scores(runs).argmax(1) == labels).mean())


def log_loss(runs: list[list[np.ndarray]], labels: np.ndarray) -> float:
    """Mean −log p(true class): p is the first output itself when its rows are probabilities
    (non-negative, summing to 1), else its softmax (logits)."""
    z = _scores(runs)
    if z.min() >= 0 and np.allclose(z.sum(1), 1.0, atol=1e-4):
        picked = np.log(np.maximum(z[np.arange(len(z)), labels], 1e-30))
    else:
        top = z.max(1, keepdims=True)
        picked = z[np.arange(len(z)), labels] - top[:, 0] - np.log(np.exp(z - top).sum(1))
    return float(-picked.mean())


@dataclass
class LabelledSplit:
    """One half of the labelled samples: a meter whose metric is what a candidate loses against the
    original (:func:`loss_against`: > 0 when a sample the original gets right goes wrong)."""

    meter: Degradation
    labels: np.ndarray

    @property
    def samples(self) -> int:
        return len(self.labels)

    def original(self) -> dict[str, float]:
        """Top-1 accuracy and log-loss of the original model."""
        return self._scored(self.meter.reference)

    def scored(self, replaced: dict[str, np.ndarray]) -> dict[str, float]:
        """Top-1 accuracy and log-loss with ``replaced`` weights."""
        return self._scored(self.meter.outputs(replaced))

    def _scored(self, runs) -> dict[str, float]:
        return {"accuracy": top1_accuracy(runs, self.labels), "log_loss": log_loss(runs, self.labels)}


def loss_against(reference, candidate, labels: np.ndarray) -> float:
    """The share of the samples the original classifies right that the candidate gets wrong: zero
    exactly when it keeps every one (its top-1 accuracy is then not below the original's)."""
    right = _scores(reference).argmax(1) == labels
    return float((right & (_scores(candidate).argmax(1) != labels)).mean())


def _batches(arrays: dict[str, np.ndarray], rows: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{k: v[rows[i:i + BATCH]] for k, v in arrays.items()} for i in range(0, len(rows), BATCH)]


def load_labelled(path: str, model: onnx.ModelProto, weights: list[str], seed: int) -> tuple[LabelledSplit, LabelledSplit]:
    """(search, validation) halves of the labelled samples in ``path`` for ``model``."""
    try:
        stored = np.load(Path(path))
        arrays = {k: stored[k] for k in stored.files}
    except (OSError, ValueError) as exc:
        raise LrqError(f"--labels {path}: cannot read it as .npz ({exc})") from None
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    missing = [name for name in inputs + ["labels"] if name not in arrays]
    if missing:
        raise LrqError(f"--labels {path}: no array {', '.join(repr(m) for m in missing)}; it needs one array per "
                       f"model input ({', '.join(inputs)}) and 'labels' (the class of each sample)")
    labels = arrays.pop("labels").astype(np.int64).reshape(-1)
    feeds = {name: arrays[name] for name in inputs}
    wrong = [name for name, v in feeds.items() if len(v) != len(labels)]
    if wrong or len(labels) < 4:
        raise LrqError(f"--labels {path}: {len(labels)} labels for {len(feeds[wrong[0]]) if wrong else len(labels)} "
                       f"samples of '{wrong[0] if wrong else inputs[0]}'; give one label per sample, at least 4")
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = order[:len(order) // 2], order[len(order) // 2:]

    def split(rows: np.ndarray) -> LabelledSplit:
        own = labels[rows]
        return LabelledSplit(Degradation(model, weights, _batches(feeds, rows),
                                         custom=lambda ref, cand: loss_against(ref, cand, own)), own)
    return split(halves[0]), split(halves[1])
