"""Passes, analyses and the manager that runs them (after LLVM's new pass manager and onnx_ir).

- A pass has a registered name, validates its parameters when it is built (so a pipeline string is
  checked before any work), and returns a PassResult saying whether it changed the graph and
  which analyses stay valid.
- An analysis declares the analyses it reads (``requires``) and the config sections it reads
  (``config``). It is computed lazily and cached per value of those sections (a pass may ask for
  it with its own section, e.g. ``ctx.analysis("tolerance", allocate=cfg)``); when a pass changes
  the graph, every analysis it does not preserve is dropped, and so is every analysis that
  requires a dropped one.
- Pipelines are strings (``discover,factorize(method=lplr,rank_ratio=0.25),lower(ort)``) or lists.
- The manager is itself a pass, times every pass, and can check the graph after each one. An
  LrqError inside a pass becomes a PassError naming the pass (bad input: exit 2); any other
  exception is a bug and becomes an InternalError naming the pass (exit 3).
- Passes hand results forward through the typed fields of :class:`Context` (plans, lowered
  layers, calibration, allocation, verification); the report is assembled from them at the end.
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import onnx

from .config import OptimizeConfig
from .errors import InternalError, LrqError, PassError
from .checkpoint import LayerCheckpoints
from .executor import Executor, ExecutorConfig
from .io import default_opset
from .model import ModelState
from .ortops import as_contrib
from .plan import Layer, LayerPlan, LoweredLayer
from .results import AllocationSummary, CalibrationSummary, Verification

log = logging.getLogger(__name__)

PASSES: dict[str, type["Pass"]] = {}


@dataclass(frozen=True)
class Analysis:
    name: str
    compute: Callable[..., Any]       # compute(ctx, config) with config = ctx.config plus overrides
    requires: tuple[str, ...] = ()    # analyses it reads
    config: tuple[str, ...] = ()      # OptimizeConfig fields it reads (and may be asked with)


ANALYSES: dict[str, Analysis] = {}


@dataclass(frozen=True)
class PassResult:
    modified: bool
    # Analyses still valid afterwards; None means "all" when unmodified and "none" when modified.
    preserved: frozenset[str] | None = None


@dataclass(frozen=True)
class PassTiming:
    name: str          # the pass as written in a pipeline
    seconds: float
    modified: bool


@dataclass
class Context:
    """Everything a pipeline run shares: the model, the config, cached analyses and typed results.

    ``discovered`` is set by ``discover``; ``plans`` (weight name -> LayerPlan) are written by the decide step (factorize, allocate) and
    consumed by ``lower``, which records what it emitted in ``lowered``; ``calibration``,
    ``allocation`` and ``verification`` hold those passes' typed results.
    """

    model: ModelState
    config: OptimizeConfig = field(default_factory=OptimizeConfig)
    original: str | onnx.ModelProto | None = None  # the input model (path or ModelProto), for verification
    discovered: list[Layer] = field(default_factory=list)  # every layer discover found, with its verdict
    plans: dict[str, LayerPlan] = field(default_factory=dict)  # weight name -> what to do with it
    lowered: dict[str, LoweredLayer] = field(default_factory=dict)  # weight name -> what lower emitted
    calibration: CalibrationSummary | None = None
    allocation: AllocationSummary | None = None
    verification: Verification | None = None
    timings: list[PassTiming] = field(default_factory=list)
    executor: Executor = field(default_factory=lambda: Executor(ExecutorConfig("local")))  # per-layer solves
    saved: dict[str, LayerCheckpoints] = field(default_factory=dict)  # per-layer checkpoints of long steps
    depth: int = 0            # pass managers running on this context (the outermost drops the checkpoints)
    _cache: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def analysis(self, name: str, **sections: Any) -> Any:
        """The named analysis, computed on first use and cached until invalidated. ``sections``
        replace config sections the analysis declared (e.g. ``allocate=cfg``)."""
        spec = ANALYSES.get(name)
        if spec is None:
            raise LrqError(f"unknown analysis '{name}'; registered: {', '.join(sorted(ANALYSES))}")
        undeclared = sorted(set(sections) - set(spec.config))
        if undeclared:
            raise LrqError(f"analysis '{name}' does not read config section(s) {', '.join(undeclared)}")
        config = dataclasses.replace(self.config, **sections) if sections else self.config
        key = (name, *(_key(getattr(config, s)) for s in spec.config))
        if key not in self._cache:
            start = time.perf_counter()
            self._cache[key] = spec.compute(self, config)
            log.debug("analysis %s: %.3f s", name, time.perf_counter() - start)
        return self._cache[key]

    def checkpoints(self, step: str, key: str) -> LayerCheckpoints:
        """The per-layer checkpoints of ``step`` for inputs named by ``key``, read when the config
        says ``resume``; removed when the run succeeds (api.run)."""
        self.saved[step] = LayerCheckpoints(step, key, resume=self.config.resume)
        return self.saved[step]

    def drop_checkpoints(self) -> None:
        """Remove every step's checkpoints (see PassManager.run)."""
        for saved in self.saved.values():
            saved.clear()

    def invalidate(self, preserved: frozenset[str] | None) -> None:
        """Drop analyses not in ``preserved`` (None: all), then those that require a dropped one."""
        dropped = {k[0] for k in self._cache if preserved is None or k[0] not in preserved}
        changed = True
        while changed:
            changed = False
            for k in self._cache:
                if k[0] not in dropped and set(ANALYSES[k[0]].requires) & dropped:
                    dropped.add(k[0])
                    changed = True
        for k in [k for k in self._cache if k[0] in dropped]:
            del self._cache[k]

    def cached(self) -> frozenset[str]:
        return frozenset(k[0] for k in self._cache)


def _key(section: Any) -> Any:
    # config sections are frozen dataclasses; callables inside (metric=) compare by identity
    return (section, tuple(id(v) for v in vars(section).values() if callable(v))) \
        if dataclasses.is_dataclass(section) else section


class Pass:
    """Base class: subclasses set ``name`` (and ``positional`` parameter names), implement ``run``
    and may override ``validate`` to check their parameters when the pass is built."""

    name: ClassVar[str] = ""
    positional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **params: Any):
        if len(args) > len(self.positional):
            raise LrqError(f"pass '{self.name}' takes at most {len(self.positional)} positional argument(s)")
        self.params = {**dict(zip(self.positional, args)), **params}
        try:
            self.validate()
        except LrqError as exc:
            raise LrqError(f"pass '{self.name}': {exc}") from None

    def validate(self) -> None:
        """Raise LrqError for parameters this pass cannot take (before any pass runs)."""

    def run(self, ctx: Context) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})" if args else self.name


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise TypeError(f"a pass named '{cls.name}' is already registered")
    PASSES[cls.name] = cls
    return cls


def register_analysis(name: str, requires: tuple[str, ...] = (), config: tuple[str, ...] = ()
                      ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(ctx)`` or ``fn(ctx, config)`` as an analysis (see the module docstring)."""
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(OptimizeConfig)})
    if unknown:
        raise TypeError(f"analysis '{name}' declares unknown config section(s) {unknown}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        takes_config = fn.__code__.co_argcount >= 2
        compute = fn if takes_config else (lambda ctx, config: fn(ctx))
        ANALYSES[name] = Analysis(name, compute, tuple(requires), tuple(config))
        return fn
    return wrap


_STEP = re.compile(r"\s*([A-Za-z_][\w-]*)\s*(?:\((.*?)\))?\s*(?:,|$)")


def _value(text: str) -> Any:
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pipeline(text: str) -> list[Pass]:
    """``"discover,factorize(method=lplr,rank=64),lower(ort)"`` -> validated pass instances."""
    passes: list[Pass] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _STEP.match(text, pos)
        if not match or match.end() == pos:
            raise LrqError(f"cannot parse pipeline at '{text[pos:]}'; expected name or name(k=v,...)")
        name, arg_text = match.group(1), match.group(2)
        args, kwargs = [], {}
        for item in filter(None, (a.strip() for a in (arg_text or "").split(","))):
            if "=" in item:
                key, val = item.split("=", 1)
                kwargs[key.strip()] = _value(val)
            else:
                args.append(_value(item))
        passes.append(make_pass(name, *args, **kwargs))
        pos = match.end()
    return passes


def make_pass(name: str, *args: Any, **kwargs: Any) -> Pass:
    if name not in PASSES:
        raise LrqError(f"unknown pass '{name}'; registered passes: {', '.join(sorted(PASSES))}")
    return PASSES[name](*args, **kwargs)


class PassManager(Pass):
    """Runs passes in order; itself a pass, so pipelines nest."""

    name = "pipeline"

    def __init__(self, passes: list[Pass] | str, check_each: bool = False):
        super().__init__()
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.check_each = check_each

    def run(self, ctx: Context) -> PassResult:
        """Run the passes; the outermost manager then drops the run's per-layer checkpoints, also
        when it stops on an LrqError (bad input, an unreachable goal: a rerun changes something),
        and keeps them when it is interrupted, for --resume."""
        outermost, ctx.depth = ctx.depth == 0, ctx.depth + 1
        try:
            result = self._run(ctx)
        except LrqError:
            if outermost:
                ctx.drop_checkpoints()
            raise
        finally:
            ctx.depth -= 1
        if outermost:
            ctx.drop_checkpoints()
        return result

    def _run(self, ctx: Context) -> PassResult:
        modified = False
        done: list[str] = []
        # what the input already fails (exporters write graphs that strict inference rejects) is not a pass's doing
        inherited = graph_problem(ctx.model) if self.check_each else None
        if inherited:
            log.warning("--check-each-pass: the input already fails the check, which is not reported again: %s",
                        inherited)
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p.run(ctx)
                problem = graph_problem(ctx.model) if self.check_each and result.modified else None
                if problem and problem != inherited:
                    raise LrqError(f"graph check failed: {problem}")
            except (PassError, InternalError):
                raise
            except LrqError as exc:
                if exc.exit_code != PassError.exit_code:  # e.g. a failed verification keeps its kind
                    raise
                raise PassError(f"{exc} [in pass '{p.name}'{_after(done)}]") from exc
            except Exception as exc:  # a bug: say where it happened; --debug shows the traceback
                raise InternalError(f"pass '{p.name}' failed{_after(done)}: {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            ctx.invalidate(result.preserved if result.modified else ctx.cached())
            modified |= result.modified
            done.append(p.name)
            ctx.timings.append(PassTiming(repr(p), round(seconds, 4), result.modified))
            log.info("pass %-10s %7.3f s%s", p.name, seconds, "  (modified)" if result.modified else "")
        return PassResult(modified, frozenset() if modified else None)

    def __repr__(self) -> str:
        return ",".join(repr(p) for p in self.passes)


def _after(done: list[str]) -> str:
    return f" after {', '.join(done)}" if done else ""


def graph_problem(model: ModelState) -> str | None:
    """The first line of what onnx.checker plus strict shape inference find wrong with the current
    graph (debug mode), or None; onnxruntime's ops in the default domain count as its contrib ops
    (lrqgraph.ortops)."""
    proto = model.to_onnx()
    try:
        with as_contrib(proto, default_opset(proto)):
            onnx.checker.check_model(proto)
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return str(exc).strip().splitlines()[0]
    return None
