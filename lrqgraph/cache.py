"""lrqgraph's on-disk cache folder (a leaf module: every layer may use it)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """lrqgraph's on-disk cache (``$LRQGRAPH_CACHE``, default ``~/.cache/lrqgraph``), created on use."""
    root = Path(os.environ.get("LRQGRAPH_CACHE", Path.home() / ".cache" / "lrqgraph")).joinpath(*parts)
    root.mkdir(parents=True, exist_ok=True)
    return root
