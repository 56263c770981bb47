"""Typed configuration: one frozen dataclass per concern, with the defaults users get."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import LrqError
from .executor import ExecutorConfig
from .methods import LOWERINGS, METHODS, GPTQConfig, MethodConfig, get_method, method_config


@dataclass(frozen=True)
class SelectConfig:
    """Which layers are candidates for rewriting."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    include: tuple[str, ...] = ()       # regexes on node or weight names; empty = all
    exclude: tuple[str, ...] = ()       # regexes on node or weight names
    min_params: int = 4096              # smaller weights are not worth a rewrite
    # layers that write a graph output (lm_head, classifier); None: kept unless an allocation goal
    # is given, whose measured tolerance then decides for them like for any other layer
    keep_output_layers: bool | None = None
    # embedding tables (constant data of a Gather; tied with the lm_head when it reads the same
    # tensor); None: they join an allocation, and are kept otherwise
    embeddings: bool | None = None

    def resolved(self, allocating: bool) -> "SelectConfig":
        """The auto (None) fields decided: output layers and embedding tables join an allocation."""
        return dataclasses.replace(
            self, keep_output_layers=not allocating if self.keep_output_layers is None else self.keep_output_layers,
            embeddings=allocating if self.embeddings is None else self.embeddings)

    def matches(self, patterns: tuple[str, ...], *names: str) -> bool:
        return any(re.search(p, n) for p in patterns for n in names if n)


def FactorizeConfig(method: str = "gptq", **fields: Any) -> MethodConfig:  # noqa: N802 - reads as a config
    """The config of compression ``method`` (a registered method's own frozen dataclass, e.g.
    ``GPTQConfig``) with ``fields`` set; fields the method does not have are refused."""
    return method_config(method, **fields)


@dataclass(frozen=True)
class VerifyConfig:
    samples: int = 4
    calib: str | None = None       # .npz, folder of .npz or text file (with tokenizer) of inputs
    tokenizer: str | None = None
    calib_samples: int = 128
    # with calibration data, compare on its first that many samples: a broken rewrite shows on a
    # few, and two whole-model runs over a decoder's calibration set take minutes
    calib_verify_samples: int = 16
    max_error: float | None = None  # fail when max |Δ| / max |ref| over outputs exceeds this
    seed: int = 0
    # seconds spent timing the original and the rewritten model in turns, per batch size (one
    # sample, and one calibration batch of up to 8); 0: no timing
    time_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.calib_verify_samples < 1:
            raise LrqError(f"--verify-samples must be at least 1, got {self.calib_verify_samples}")
        if self.time_seconds < 0:
            raise LrqError(f"--time-seconds must be 0 (no timing) or more, got {self.time_seconds}")


# the allocation goals, one of which makes the allocate pass run (max_metric: Python only, with metric)
GOALS = ("target_bpw", "target_size", "min_cosine", "max_kl", "max_metric", "labels")


@dataclass(frozen=True)
class AllocateConfig:
    """Per-layer choice of representation against a goal (the ``allocate`` pass).

    ``quality``: the least predicted degradation within a size (``target_bpw`` over the selected
    layers, or ``target_size`` bytes for the whole model). ``compact``: the smallest model whose
    measured degradation meets ``min_cosine`` or ``max_kl`` on the calibration inputs.
    """

    target_bpw: float | None = None
    target_size: int | None = None
    min_cosine: float | None = None
    max_kl: float | None = None
    # Python only: metric(reference_runs, candidate_runs) -> degradation >= 0 (each run: the list of
    # the model's outputs for one batch), with max_metric as the compact mode's tolerance
    metric: Callable[[list, list], float] | None = field(default=None, compare=False)
    max_metric: float | None = None
    # the lossless goal: labels.npz (the model's inputs and 'labels', lrqgraph.labels): the smallest
    # model that loses neither top-1 accuracy nor log-loss on a seeded half of the samples, checked
    # on the other half (the report's "labelled" entry)
    labels: str | None = None
    labels_seed: int = 0
    # what a budget goal minimises: "cosine" (1 − mean cosine of the first output) or "kl" (KL of its
    # softmax); None: "kl" for --max-kl or a first output named like logits, "cosine" otherwise
    measure: str | None = None
    menu: tuple[tuple[int, int], ...] = ()  # (bits, block) candidates; () = the lowering's default
    families: tuple[str, ...] = ()  # representation families the menu may hold (Method.family_of); () = all
    validate: bool = True        # also measure layers at a second candidate (predicted vs measured)
    # ... that many layers, spread over the model (None: every layer), each also at one candidate of
    # every other family; the other layers' predictions follow the checked layers' power law
    check_layers: int | None = 12
    # at most that many layers measured at their probe (None: all); beyond, a sample per role at
    # spread depths, the others interpolated between measured layers of their role
    probe_layers: int | None = 48
    # per role, that many layers (spread over depth) solve the whole menu; the role's other layers
    # solve only the entries on some family's error-vs-bits frontier in one of them (None: every
    # layer the whole menu). MiniLM: 6 of 19 entries are on no layer's frontier (bench/RESULTS.md)
    screen_layers: int | None = 2
    # calibration samples each end-to-end measurement runs; None: those holding 512 tokens (within
    # 4..32; 16 without a sequence axis). MiniLM at --target-bpw 4 chooses alike with 16 and 32
    # samples (cosine on other text 0.9736 and 0.9743) and 16 halve the measurement time
    measure_samples: int | None = None
    # embedding tables (and a tied lm_head with them) compete in the knapsack like every other
    # layer; None: for --target-size and the compact goals, which count or measure every byte.
    # Otherwise (--target-bpw by default) a table takes a fixed grid (tolerance.guard_menu: 8-bit from 4 bits
    # per weight up, 4-bit below), outside the bits per weight, which are then the other layers' (an untied output layer competes as usual). Gemma 3 270M at --target-bpw 4 with its tied
    # 262144-word table competing: table at 4 bits, 1.44x fp32 perplexity on KJV, 2.02x on reviews;
    # with the table at 8 bits outside the budget: 1.15x / 1.49x (bench/RESULTS.md)
    tables_in_budget: bool | None = None
    polish_sweeps: int = 4       # coordinate-descent sweeps on each chosen GPTQ candidate
    # run time as a cost (passes/latency_budget.py): a candidate whose lowered form runs slower than
    # its layer as onnxruntime's 4-bit RTN writes it (or than max_latency x the float layer) is
    # dropped, at the rows latency_rows lists (() = one calibration sample's and eight samples';
    # a decoder's 1 and 128); False: choices on bytes and error alone
    latency_budget: bool = True
    max_latency: float | None = None
    latency_rows: tuple[int, ...] = ()
    repair_steps: int = 64       # compact mode: most upgrades of the worst layers before giving up

    def __post_init__(self) -> None:
        if len(self.goals()) > 1:
            raise LrqError("give one goal: --target-bpw, --target-size, --min-cosine, --max-kl or --labels")
        if (self.metric is None) != (self.max_metric is None):
            raise LrqError("a custom metric needs both metric (a callable) and max_metric")
        if self.target_bpw is not None and not 1 <= self.target_bpw <= 32:
            raise LrqError(f"--target-bpw must be in 1..32, got {self.target_bpw}")
        if self.target_size is not None and self.target_size <= 0:
            raise LrqError(f"--target-size must be positive, got {self.target_size}")
        if self.min_cosine is not None and not -1 < self.min_cosine < 1:
            raise LrqError(f"--min-cosine must be in (-1, 1), got {self.min_cosine}")
        if self.probe_layers is not None and self.probe_layers < 1:
            raise LrqError(f"probe_layers must be at least 1 (or None: every layer), got {self.probe_layers}")
        if self.screen_layers is not None and self.screen_layers < 1:
            raise LrqError(f"screen_layers must be at least 1 (or None: no screening), got {self.screen_layers}")
        if self.check_layers is not None and self.check_layers < 1:
            raise LrqError(f"check_layers must be at least 1 (or None: every layer), got {self.check_layers}")
        if (self.measure_samples is not None and self.measure_samples < 1) or self.repair_steps < 0:
            raise LrqError("measure_samples must be at least 1 and repair_steps at least 0")
        if self.max_latency is not None and self.max_latency <= 0:
            raise LrqError(f"--max-latency must be a positive ratio to the float model, got {self.max_latency}")
        if any(int(r) < 1 for r in self.latency_rows):
            raise LrqError(f"--latency-rows must be positive row counts, got {list(self.latency_rows)}")
        if self.measure not in (None, "cosine", "kl"):
            raise LrqError(f"--metric must be cosine or kl, got {self.measure}")
        if (self.measure == "kl" and self.min_cosine is not None) or (self.measure == "cosine" and self.max_kl):
            raise LrqError("--metric contradicts the goal: --min-cosine measures cosine, --max-kl measures kl")
        if self.max_kl is not None and self.max_kl <= 0:
            raise LrqError(f"--max-kl must be positive, got {self.max_kl}")
        known = {m.group for m in METHODS.values()} | {"rotated"}
        unknown = sorted(set(self.families) - known)
        if unknown:
            raise LrqError(f"unknown representation family {', '.join(unknown)}; choose from {', '.join(sorted(known))}")

    def goals(self) -> dict[str, Any]:
        """The goals given (GOALS that are set)."""
        return {name: getattr(self, name) for name in GOALS if getattr(self, name) is not None}

    @property
    def active(self) -> bool:
        return bool(self.goals())

    def metric_for(self, first_output: str) -> str:
        """The built-in metric the allocation measures (``measure``, resolved)."""
        if self.measure is not None:
            return self.measure
        if self.max_kl is not None or self.labels is not None:  # labels: a classifier's logits
            return "kl"
        return "kl" if self.min_cosine is None and "logits" in first_output.lower() else "cosine"

    @property
    def tables_join(self) -> bool:
        """Whether embedding tables compete in the knapsack (``tables_in_budget``, resolved)."""
        return self.target_bpw is None if self.tables_in_budget is None else self.tables_in_budget

    @property
    def mode(self) -> str:
        """quality: least degradation within a size; compact: smallest within a degradation;
        lossless: smallest that keeps the labelled accuracy."""
        if self.labels is not None:
            return "lossless"
        return "quality" if self.target_bpw is not None or self.target_size is not None else "compact"


@dataclass(frozen=True)
class OptimizeConfig:
    select: SelectConfig = field(default_factory=SelectConfig)
    factorize: MethodConfig = field(default_factory=GPTQConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    allocate: AllocateConfig = field(default_factory=AllocateConfig)
    lowering: str = "ort"
    # activations the kernels may quantize: 0 float, 4 int8 per block (MatMulNBits' accuracy_level);
    # None: ort 0 (4 for 8-bit codes, whose only fast kernel needs it), lrq 4
    accuracy_level: int | None = None
    calib: str | None = None       # .npz, folder of .npz, or text file (with tokenizer) of real inputs
    tokenizer: str | None = None   # tokenizer.json (or its folder) for text calibration data
    calib_samples: int = 128       # at most this many calibration samples are used
    check_each_pass: bool = False
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)  # where per-layer solves run
    resume: bool = False  # reuse the per-layer checkpoints an interrupted run left (lrqgraph.checkpoint)
    # a model with more weight bytes than this in external data is streamed (lrqgraph.external): read
    # one tensor at a time, verified block by block; None never streams
    stream_above: int | None = 2 * 2**30

    def __post_init__(self) -> None:
        if self.lowering not in LOWERINGS:
            raise LrqError(f"unknown lowering '{self.lowering}'; choose one of {', '.join(LOWERINGS)}")
        if self.accuracy_level not in (None, 0, 4):
            raise LrqError(f"--accuracy-level must be 0 (float activations) or 4 (int8), got {self.accuracy_level}")
        if self.calib_samples < 1:
            raise LrqError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if not isinstance(self.factorize, MethodConfig):
            raise LrqError(f"factorize must be a method config (e.g. FactorizeConfig(method='lplr', rank=64)), "
                           f"got {type(self.factorize).__name__}")
        if not self.allocate.active:  # a method the lowering cannot run is refused before any work
            why = get_method(self.factorize.method).check_lowering(self.factorize, self.lowering)
            if why:
                raise LrqError(why)


def with_fields(cfg: Any, fields: dict[str, Any], **extra: Any) -> Any:
    """``dataclasses.replace`` with a clear error for unknown field names."""
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise LrqError(f"unknown option(s) {', '.join(unknown)} for {type(cfg).__name__}; "
                       f"known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **fields, **extra)


def describe_config(config: "OptimizeConfig") -> dict[str, Any]:
    """The config as plain data (model metadata, reports), the method named."""
    out = dataclasses.asdict(config)
    out["factorize"] = config.factorize.describe()
    del out["executor"], out["resume"]  # where the solves ran, or whether some were resumed, does not change the output
    return out
