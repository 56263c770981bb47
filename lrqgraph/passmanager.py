"""Passes, analyses and the manager that runs them (after LLVM's new pass manager and onnx_ir).

- A pass has a registered name, declares the analyses it reads, and returns a PassResult saying
  whether it changed the graph and which analyses stay valid.
- Analyses are computed lazily, cached, and dropped when a pass changes what they depend on.
- Pipelines are strings (``discover,factorize(method=lplr,rank_ratio=0.25),lower(ort)``) or lists.
- The manager is itself a pass, times every pass, and can check the graph after each one.
"""
from __future__ import annotations

import ast
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import onnx

from .config import OptimizeConfig
from .errors import LrqError, PassError, VerificationError
from .model import ModelState

log = logging.getLogger(__name__)

PASSES: dict[str, type["Pass"]] = {}
ANALYSES: dict[str, Callable[["Context"], Any]] = {}


@dataclass(frozen=True)
class PassResult:
    modified: bool
    # Analyses still valid afterwards; None means "all" when unmodified and "none" when modified.
    preserved: frozenset[str] | None = None


@dataclass
class Context:
    """Everything a pipeline run shares: the model, the config, cached analyses, results, report."""

    model: ModelState
    config: OptimizeConfig = field(default_factory=OptimizeConfig)
    original: Any = None      # the input model (path or ModelProto), for verification
    plans: dict[str, Any] = field(default_factory=dict)      # weight name -> Representation
    report: dict[str, Any] = field(default_factory=lambda: {"layers": {}, "passes": [], "notes": []})
    _cache: dict[str, Any] = field(default_factory=dict)

    def analysis(self, name: str) -> Any:
        """The named analysis, computed on first use and cached until invalidated."""
        if name not in ANALYSES:
            raise LrqError(f"unknown analysis '{name}'")
        if name not in self._cache:
            start = time.perf_counter()
            self._cache[name] = ANALYSES[name](self)
            log.debug("analysis %s: %.3f s", name, time.perf_counter() - start)
        return self._cache[name]

    def invalidate(self, preserved: frozenset[str] | None) -> None:
        for name in list(self._cache):
            if preserved is None or name not in preserved:
                del self._cache[name]


class Pass:
    """Base class: subclasses set ``name`` (and ``positional`` parameter names) and implement ``run``."""

    name: ClassVar[str] = ""
    positional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **params: Any):
        if len(args) > len(self.positional):
            raise LrqError(f"pass '{self.name}' takes at most {len(self.positional)} positional argument(s)")
        self.params = {**dict(zip(self.positional, args)), **params}

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


def register_analysis(name: str) -> Callable[[Callable[[Context], Any]], Callable[[Context], Any]]:
    def wrap(fn: Callable[[Context], Any]) -> Callable[[Context], Any]:
        ANALYSES[name] = fn
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
    """``"discover,factorize(method=lplr,rank=64),lower(ort)"`` -> pass instances."""
    _ensure_builtin_passes()
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
    _ensure_builtin_passes()
    if name not in PASSES:
        raise LrqError(f"unknown pass '{name}'; registered passes: {', '.join(sorted(PASSES))}")
    return PASSES[name](*args, **kwargs)


def _ensure_builtin_passes() -> None:
    from . import passes  # noqa: F401  (registers the built-in passes on import)


class PassManager(Pass):
    """Runs passes in order; itself a pass, so pipelines nest."""

    name = "pipeline"

    def __init__(self, passes: list[Pass] | str, check_each: bool = False):
        super().__init__()
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.check_each = check_each

    def run(self, ctx: Context) -> PassResult:
        modified = False
        done: list[str] = []
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p.run(ctx)
                if self.check_each and result.modified:
                    check_graph(ctx.model)
            except (PassError, VerificationError):
                raise
            except LrqError as exc:
                raise PassError(f"{exc} [in pass '{p.name}'{_after(done)}]") from exc
            except Exception as exc:  # a bug or an unexpected model: say where it happened
                raise PassError(f"pass '{p.name}' failed{_after(done)}: {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            ctx.invalidate(result.preserved if result.modified else frozenset(ctx._cache))
            modified |= result.modified
            done.append(p.name)
            ctx.report["passes"].append({"pass": repr(p), "seconds": round(seconds, 4),
                                         "modified": result.modified})
            log.info("pass %-10s %7.3f s%s", p.name, seconds, "  (modified)" if result.modified else "")
        return PassResult(modified, frozenset() if modified else None)

    def __repr__(self) -> str:
        return ",".join(repr(p) for p in self.passes)


def _after(done: list[str]) -> str:
    return f" after {', '.join(done)}" if done else ""


def check_graph(model: ModelState) -> None:
    """onnx.checker plus strict shape inference on the current graph (debug mode)."""
    proto = model.to_onnx()
    try:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise LrqError(f"graph check failed: {first}") from exc
