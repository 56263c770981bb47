"""lrqgraph's on-disk caches and the keys that name their entries (a leaf module: every layer may use it).

Two roots: ``cache_dir`` for what lrqgraph derives from a model (calibration statistics, latency
tables, checkpoints; ``$LRQGRAPH_CACHE``, default ``~/.cache/lrqgraph``) and ``fixture_dir`` for the
real models the tests, examples and benchmarks export once (``$LRQGRAPH_FIXTURES``, default the
same folder): the tests point the first at a fresh folder and keep the second.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

from .version import __version__


def _root(variable: str) -> Path:
    return Path(os.environ.get(variable) or os.environ.get("LRQGRAPH_CACHE") or Path.home() / ".cache" / "lrqgraph")


def cache_dir(*parts: str) -> Path:
    """lrqgraph's on-disk cache (``$LRQGRAPH_CACHE``, default ``~/.cache/lrqgraph``), created on use."""
    root = _root("LRQGRAPH_CACHE").joinpath(*parts)
    root.mkdir(parents=True, exist_ok=True)
    return root


def fixture_dir(*parts: str) -> Path:
    """Where exported real models are kept (``$LRQGRAPH_FIXTURES``, else ``cache_dir``'s root), created on use."""
    root = _root("LRQGRAPH_FIXTURES").joinpath(*parts)
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.lru_cache(maxsize=None)
def code_version(*modules: str) -> str:
    """A digest of the source of the named modules (a package: every .py file under it) and of
    lrqgraph's version: a cached value made by that code is found again only while it is unchanged."""
    digest = hashlib.sha256(__version__.encode())
    for name in modules:
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        path = Path(module.__file__)
        files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        for file in files:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(*parts: object, code: tuple[str, ...] = ()) -> str:
    """The name of a cache entry made from ``parts`` by the code of the modules in ``code``."""
    text = "|".join(map(str, (*parts, code_version(*code))))
    return hashlib.sha256(text.encode()).hexdigest()[:24]
