"""Labelled data for the lossless search: a classifier's inputs with their true classes.

A ``labels.npz`` holds one array per model input (the names of the graph inputs, samples along
axis 0) and ``labels``: the class index of each sample. The samples are split by a seeded
permutation into a search half, on which the allocator looks for the smallest model whose top-1
accuracy is not below the original's, and a validation half it never looks at, on which the
result is checked (see passes/allocate.py, the lossless goal).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import LrqError
from .evaluate import Degradation

BATCH = 16


def top1_accuracy(runs: list[list[np.ndarray]], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output of each run (batches in order) against ``labels``."""
    predicted = np.concatenate([r[0].reshape(len(r[0]), -1).argmax(1) for r in runs])
    return float((predicted == labels).mean())


@dataclass
class LabelledSplit:
    """One half of the labelled samples: a meter whose metric is the accuracy lost against the original."""

    meter: Degradation
    labels: np.ndarray

    @property
    def samples(self) -> int:
        return len(self.labels)

    @property
    def original_accuracy(self) -> float:
        return top1_accuracy(self.meter.reference, self.labels)

    def accuracy(self, replaced: dict[str, np.ndarray]) -> float:
        return self.original_accuracy - self.meter.measure(replaced)


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

        def lost(reference, candidate) -> float:  # accuracy the candidate loses against the original
            return top1_accuracy(reference, own) - top1_accuracy(candidate, own)
        return LabelledSplit(Degradation(model, weights, _batches(feeds, rows), custom=lost), own)
    return split(halves[0]), split(halves[1])
