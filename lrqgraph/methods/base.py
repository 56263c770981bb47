"""The method registry: one compression method is one module with one frozen config and one entry.

A :class:`Method` bundles what every part of lrqgraph needs to know about a method:
 - ``config``: its frozen config dataclass (a :class:`MethodConfig`); fields of other methods are
   refused by :func:`configure`, never silently ignored;
 - ``factorize(w, cfg, scale_dtype, h)``: the Representation, or a reason why none is made;
 - ``storage(cfg, k, n, scale_dtype)``: its exact stored bits from shapes alone (``inspect``);
 - ``forms``: the representation forms it yields (see Representation.form), and ``lowerings``
   the targets that run them (the lower pass checks against its rules);
 - ``menu(lowering)``: the candidate settings it offers the allocator (empty: none), and
   ``family`` the representation family the allocator's report groups it under (dense, qlr,
   lowrank, kashin, kmeans);
 - ``warm_start``: whether ``factorize`` takes ``warm=`` (a dense Representation of the same grid,
   already computed for the allocator's menu, that it starts from instead of quantizing again);
 - ``factorize_many(w, cfgs, scale_dtype, h)``: optional, ``factorize`` for several configs of
   one weight at once where they share work (the allocator's menus); same results.
Adding a method is one new module that calls :func:`register_method`, plus its tests.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from lrqgraph.errors import LrqError
from lrqgraph.numerics import HessianInfo, QuantSpec, Representation

LOWERINGS = ("ort", "std", "lrq")
SCALE_DTYPES = ("auto", "float16", "float32")


@dataclass(frozen=True)
class MethodConfig:
    """Fields every method has. Subclasses add their own and set ``method``."""

    method: ClassVar[str] = ""
    bits: int = 4                  # code bits (of every factor for low-rank methods)
    scale_dtype: str = "auto"      # auto: the weight's float type; float16 halves scale storage of fp32
                                   # models (stored as float16, cast once when the session loads: the
                                   # layer still computes in float32)
    seed: int = 0
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # (regex, fields) per layer

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LrqError(f"bits must be in 2..8, got {self.bits}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LrqError(f"scale dtype must be auto, float16 or float32, got '{self.scale_dtype}'")
        for pattern, fields in self.overrides:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise LrqError(f"override pattern '{pattern}' is not a regular expression ({exc})") from None
            configure(dataclasses.replace(self, overrides=()), **dict(fields))  # refuse bad fields now

    def scales_for(self, weight_dtype: str) -> str:
        """The scale type for a weight of ``weight_dtype``."""
        return str(weight_dtype) if self.scale_dtype == "auto" else self.scale_dtype

    def for_layer(self, *names: str) -> "MethodConfig":
        """This config with the per-layer overrides whose regex matches one of ``names`` applied."""
        cfg = self
        for pattern, fields in self.overrides:
            if any(re.search(pattern, n) for n in names if n):
                cfg = configure(cfg, **dict(fields), overrides=())
        return cfg

    def describe(self) -> dict[str, Any]:
        """The method and its fields, for reports and model metadata."""
        return {"method": self.method, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                           if f.name != "overrides"}}


@dataclass(frozen=True)
class GridConfig(MethodConfig):
    """Fields of methods whose codes sit on a uniform block grid down K."""

    block_size: int = 32           # 0 = one block per column (per channel)
    symmetric: bool = True
    clip_search: bool = True       # MSE-optimal clipping per block
    rotate: bool = False           # a seeded randomized Hadamard of the input dimension first (numerics/rotation.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.block_size == 0 or 16 <= self.block_size <= 256):
            raise LrqError(f"block size must be 0 (per-channel) or in 16..256, got {self.block_size}")

    def spec(self, scale_dtype: str = "float32", bits: int | None = None) -> QuantSpec:
        """The factor quantizer at this config's grid."""
        return QuantSpec(bits=bits or self.bits, block_size=self.block_size, symmetric=self.symmetric,
                         clip_search=self.clip_search, scale_dtype=scale_dtype)


Factorizer = Callable[[np.ndarray, Any, str, "HessianInfo | None"], "tuple[Representation | None, str]"]
Storage = Callable[[Any, int, int, str], "tuple[int | None, str]"]


@dataclass(frozen=True)
class Method:
    name: str
    config: type[MethodConfig]
    factorize: Factorizer
    storage: Storage
    forms: tuple[str, ...]
    lowerings: tuple[str, ...] = LOWERINGS
    summary: str = ""
    family: str = ""               # '' = the method's name
    warm_start: bool = False
    factorize_many: Callable[[np.ndarray, list, str, "HessianInfo | None"], list] | None = None
    menu: Callable[[str], tuple[dict[str, Any], ...]] = field(default=lambda lowering: ())
    # a per-config refinement of ``lowerings`` (e.g. Kashin's kernel runs Hadamard transforms only):
    # returns '' when ``lowering`` runs ``cfg``, else what to change
    lowering_check: Callable[[Any, str], str] = field(default=lambda cfg, lowering: "")

    @property
    def group(self) -> str:
        """The representation family (what the allocation report groups candidates by)."""
        return self.family or self.name

    def family_of(self, fields: dict[str, Any]) -> str:
        """The family of one of its settings: ``rotated`` when it rotates the input first."""
        return "rotated" if fields.get("rotate") else self.group

    def check_lowering(self, cfg: MethodConfig, lowering: str) -> str:
        """'' when ``lowering`` runs this method with ``cfg``, else a one-line reason with the fix."""
        if lowering not in self.lowerings:
            runs = " or ".join(f"--lowering {t}" for t in self.lowerings)
            return f"method {self.name} runs only with {runs}, not --lowering {lowering}"
        return self.lowering_check(cfg, lowering)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (its config class must name it)."""
    if method.config.method != method.name:
        raise TypeError(f"{method.config.__name__}.method is '{method.config.method}', not '{method.name}'")
    if method.name in METHODS and METHODS[method.name] is not method:
        raise TypeError(f"a method named '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LrqError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_of(cfg: MethodConfig) -> Method:
    return get_method(cfg.method)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def method_config(method: str = "gptq", **fields: Any) -> MethodConfig:
    """The config of ``method`` with ``fields`` set; a field the method does not have is an error."""
    cls = get_method(method).config
    unknown = sorted(set(fields) - _fields(cls))
    if unknown:
        owners = {name: sorted(m for m, entry in METHODS.items() if name in _fields(entry.config))
                  for name in unknown}
        detail = "; ".join(f"{name} belongs to {', '.join(o) if o else 'no method'}" for name, o in owners.items())
        raise LrqError(f"method {method} has no option {', '.join(unknown)} ({detail}); "
                       f"its options: {', '.join(sorted(_fields(cls) - {'overrides'}))}")
    return cls(**fields)


def configure(cfg: MethodConfig, **fields: Any) -> MethodConfig:
    """``cfg`` with ``fields`` changed. A new ``method`` keeps the fields both methods share."""
    method = fields.pop("method", cfg.method)
    if method == cfg.method:
        unknown = sorted(set(fields) - _fields(type(cfg)))
        if unknown:
            method_config(method, **fields)  # raises, naming the methods that have them
        return dataclasses.replace(cfg, **fields)
    target = _fields(get_method(method).config)
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in target}
    return method_config(method, **{**shared, **fields})
