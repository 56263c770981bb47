"""The on-disk cache for exported real models (``$LRQGRAPH_CACHE``, default ``~/.cache/lrqgraph``)."""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Callable

from lrqgraph.atomic import atomic_file
from lrqgraph.cache import fixture_dir


def cached_export(stem: str, packages: tuple[str, ...], recipe: str, export: Callable[[str], None]) -> Path:
    """``<cache>/<stem>-<key>.onnx``, made by ``export(path)`` on first use and renamed into place
    whole; the key hashes the packages' versions and the export recipe."""
    versions = [metadata.version(p) for p in packages]
    key = hashlib.sha256(f"{versions}|{recipe}".encode()).hexdigest()[:12]
    path = fixture_dir() / f"{stem}-{key}.onnx"
    if path.exists():
        return path
    with atomic_file(path, suffix=".onnx") as tmp:
        export(str(tmp))
    return path
