"""Progress of long per-layer loops that shows in logs and non-interactive terminals too."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")
log = logging.getLogger("lrqgraph.progress")


def progress(items: Sequence[T], what: str, every_s: float = 2.0, unit: str = "layer") -> Iterator[T]:
    """Yield ``items``; log "what i/n layers, s spent, ~s left" after an item when ``every_s``
    seconds passed since the last line (and after the last item), with a bar on a terminal."""
    total = len(items)
    start = last = time.perf_counter()
    bar = None
    if sys.stderr.isatty() and total > 1:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=what, unit=unit, leave=False)
    try:
        for i, item in enumerate(items, 1):
            yield item
            now = time.perf_counter()
            if bar is not None:
                bar.update()
            if now - last >= every_s or (i == total and now - start >= every_s):
                spent = now - start
                log.info("%s: %d/%d %ss, %.1f s spent, ~%.1f s left", what, i, total, unit, spent,
                         spent / i * (total - i))
                last = now
    finally:
        if bar is not None:
            bar.close()

