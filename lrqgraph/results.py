"""The typed results a pipeline run records in its Context, one per step that has one; the report
(lrqgraph.report) is assembled from them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CalibrationSummary:
    layers: int
    samples: int
    source: str

    def describe(self) -> str:
        return f"H = XᵀX for {self.layers} layers from {self.samples} samples of {self.source}"


@dataclass(frozen=True)
class AllocationSummary:
    """What ``allocate`` decided for the whole model (the report's "allocation" entry)."""

    mode: str
    metric: str
    goal: dict
    bpw: float                  # over the budgeted layers (tables and output layers only when they join), every stored bit counted
    predicted: float
    measured: float
    joint_measured: float       # the joint knapsack's choice, out of sample (before the final refit)
    held_out: float             # the choice, out of sample: its candidates were fitted without the measured samples
    target_loss: float | None
    met: bool
    repairs: int
    spearman: float | None      # predicted vs measured one-layer degradation at the check candidates
    spearman_by_family: dict    # the same per family (dense: every layer; others: the sampled layers)
    frontier: list              # (bits per weight, predicted degradation) of the knapsack's frontier
    uniform: list               # one dense grid for every layer, measured: the baselines
    families: dict              # family -> its layers' count in the choice, its own frontier and its
                                # own allocation at the same goal (measured), for the joint-vs-alone comparison
    labelled: dict | None = None  # the lossless goal: samples, accuracy and log-loss per half, original and chosen
    latency: dict | None = None   # the latency budget: rows, reference, candidates dropped, estimated ms per rows


@dataclass(frozen=True)
class Verification:
    """``verify``'s comparison of the original and rewritten models on the same inputs."""

    inputs: str                                   # where the inputs came from
    samples: int
    outputs: dict[str, dict[str, float]]          # per output: max_abs, max_rel, cosines, non_finite
    max_rel: float                                # the worst output's
    blocks: dict[str, dict[str, float]] | None = None   # streamed runs: the same per block boundary
    latency: dict[str, dict[str, float]] | None = None  # per batch size: original_ms, rewritten_ms, ratio

    def as_report(self) -> dict[str, Any]:
        """The report's "verify" entry (the fields that are set)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
