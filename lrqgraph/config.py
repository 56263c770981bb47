"""Typed configuration: one frozen dataclass per concern, with the defaults users get."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import LrqError
from .numerics import QuantSpec

METHODS = ("rtn", "gptq", "svd", "lplr", "qlr", "kmeans", "kashin")
LOWERINGS = ("ort", "std", "lrq")


@dataclass(frozen=True)
class SelectConfig:
    """Which layers are candidates for rewriting."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    include: tuple[str, ...] = ()       # regexes on node or weight names; empty = all
    exclude: tuple[str, ...] = ()       # regexes on node or weight names
    min_params: int = 4096              # smaller weights are not worth a rewrite
    keep_output_layers: bool = True     # layers that write a graph output (lm_head, classifier)

    def matches(self, patterns: tuple[str, ...], *names: str) -> bool:
        return any(re.search(p, n) for p in patterns for n in names if n)


@dataclass(frozen=True)
class FactorizeConfig:
    """How each selected weight is compressed."""

    method: str = "gptq"           # = rtn when no calibration data is given
    bits: int = 4                  # code bits (of every factor for low-rank methods)
    block_size: int = 32
    symmetric: bool = True
    clip_search: bool = True       # MSE-optimal clipping per block
    rank: int | None = None
    rank_ratio: float | None = None
    target_bpw: float | None = None
    seed: int = 0
    oversample: int = 8            # lplr: extra sketch columns
    power_iters: int = 0           # lplr: power iterations on the sketch
    init: str = "sketch"           # lplr: first factor from a Gaussian sketch or the SVD
    refits: int = 0                # lplr/qlr: alternating refits of L and R (best iterate kept)
    lr_bits: int = 8               # qlr: bits of the low-rank factors (Q takes ``bits``)
    iters: int = 5                 # qlr: outer Q / L·R alternations
    sweeps: int = 2                # gptq/qlr with H: coordinate-descent passes over codes and scales
    scale_dtype: str = "auto"      # auto: the weight's float type; float16 halves scale storage of fp32
                                   # models (the layer then computes in float16 between two Casts)
    transform: str = "hadamard"    # kashin: dct, hadamard or qr
    tol: float = 1e-3              # kashin: relative residual that ends the decomposition
    max_iter: int = 200            # kashin: decomposition steps before falling back to kmeans
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # (regex, fields) per layer

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LrqError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if not 2 <= self.bits <= 8 or not 2 <= self.lr_bits <= 8:
            raise LrqError(f"bits must be in 2..8, got {self.bits} (lr_bits {self.lr_bits})")
        if not 0 <= self.sweeps <= 100:
            raise LrqError(f"sweeps must be in 0..100, got {self.sweeps}")
        if self.scale_dtype not in ("auto", "float16", "float32"):
            raise LrqError(f"scale dtype must be auto, float16 or float32, got '{self.scale_dtype}'")
        if self.init not in ("sketch", "svd"):
            raise LrqError(f"init must be sketch or svd, got '{self.init}'")
        if self.transform not in ("dct", "hadamard", "qr"):
            raise LrqError(f"transform must be dct, hadamard or qr, got '{self.transform}'")
        if not (self.block_size == 0 or 16 <= self.block_size <= 256):
            raise LrqError(f"block size must be 0 (per-channel) or in 16..256, got {self.block_size}")
        if sum(x is not None for x in (self.rank, self.rank_ratio, self.target_bpw)) > 1:
            raise LrqError("give at most one of rank, rank_ratio and target_bpw")
        if self.rank is not None and self.rank < 1:
            raise LrqError(f"rank must be positive, got {self.rank}")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            raise LrqError(f"rank ratio must be in (0, 1], got {self.rank_ratio}")
        if self.target_bpw is not None and self.target_bpw <= 0:
            raise LrqError(f"target bits per weight must be positive, got {self.target_bpw}")

    def scales_for(self, weight_dtype: str) -> str:
        """The scale type for a weight of ``weight_dtype``."""
        return str(weight_dtype) if self.scale_dtype == "auto" else self.scale_dtype

    def spec(self, scale_dtype: str = "float32", bits: int | None = None) -> QuantSpec:
        """The factor quantizer; scales take the weight's float type so that kernels accept them."""
        return QuantSpec(bits=bits or self.bits, block_size=self.block_size, symmetric=self.symmetric,
                         clip_search=self.clip_search, scale_dtype=scale_dtype)

    def for_layer(self, *names: str) -> "FactorizeConfig":
        """This config with the per-layer overrides whose regex matches one of ``names`` applied."""
        cfg = self
        for pattern, fields in self.overrides:
            if any(re.search(pattern, n) for n in names if n):
                cfg = with_fields(cfg, dict(fields), overrides=())
        return cfg


@dataclass(frozen=True)
class VerifyConfig:
    samples: int = 4
    calib: str | None = None       # .npz, folder of .npz or text file (with tokenizer) of inputs
    tokenizer: str | None = None
    calib_samples: int = 128
    max_error: float | None = None  # fail when max |Δ| / max |ref| over outputs exceeds this
    seed: int = 0


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
    menu: tuple[tuple[int, int], ...] = ()  # (bits, block) candidates; () = the lowering's default
    validate: bool = True        # also measure each layer at a second candidate (predicted vs measured)
    measure_samples: int = 32    # calibration samples each end-to-end measurement runs
    polish_sweeps: int = 4       # coordinate-descent sweeps on each chosen GPTQ candidate
    repair_steps: int = 64       # compact mode: most upgrades of the worst layers before giving up

    def __post_init__(self) -> None:
        goals = [g for g in (self.target_bpw, self.target_size, self.min_cosine, self.max_kl, self.max_metric)
                 if g is not None]
        if len(goals) > 1:
            raise LrqError("give one goal: --target-bpw, --target-size, --min-cosine or --max-kl")
        if (self.metric is None) != (self.max_metric is None):
            raise LrqError("a custom metric needs both metric (a callable) and max_metric")
        if self.target_bpw is not None and not 1 <= self.target_bpw <= 32:
            raise LrqError(f"--target-bpw must be in 1..32, got {self.target_bpw}")
        if self.target_size is not None and self.target_size <= 0:
            raise LrqError(f"--target-size must be positive, got {self.target_size}")
        if self.min_cosine is not None and not -1 < self.min_cosine < 1:
            raise LrqError(f"--min-cosine must be in (-1, 1), got {self.min_cosine}")
        if self.measure_samples < 1 or self.repair_steps < 0:
            raise LrqError("measure_samples must be at least 1 and repair_steps at least 0")
        if self.max_kl is not None and self.max_kl <= 0:
            raise LrqError(f"--max-kl must be positive, got {self.max_kl}")

    @property
    def active(self) -> bool:
        return any(g is not None for g in (self.target_bpw, self.target_size, self.min_cosine, self.max_kl,
                                           self.max_metric))

    @property
    def mode(self) -> str:
        return "quality" if self.target_bpw is not None or self.target_size is not None else "compact"


@dataclass(frozen=True)
class OptimizeConfig:
    select: SelectConfig = field(default_factory=SelectConfig)
    factorize: FactorizeConfig = field(default_factory=FactorizeConfig)
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

    def __post_init__(self) -> None:
        if self.lowering not in LOWERINGS:
            raise LrqError(f"unknown lowering '{self.lowering}'; choose one of {', '.join(LOWERINGS)}")
        if self.accuracy_level not in (None, 0, 4):
            raise LrqError(f"--accuracy-level must be 0 (float activations) or 4 (int8), got {self.accuracy_level}")
        if self.calib_samples < 1:
            raise LrqError(f"--calib-samples must be at least 1, got {self.calib_samples}")


def with_fields(cfg: Any, fields: dict[str, Any], **extra: Any) -> Any:
    """``dataclasses.replace`` with a clear error for unknown field names."""
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise LrqError(f"unknown option(s) {', '.join(unknown)} for {type(cfg).__name__}; "
                       f"known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **fields, **extra)


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
