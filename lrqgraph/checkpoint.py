"""Per-layer checkpoints of a long step (the tolerance analysis), so that an interrupted run
resumes from the layers already done (``--resume``).

A step's folder is named by a digest of everything its results depend on (the model's graph and
weights, the calibration data, the config that shapes the output, lrqgraph's version), so a
changed input never resumes from stale layers. Each layer is one pickle, written to a temporary
file and renamed into place: a kill leaves whole layers or none. The folder is removed when the
run succeeds or stops with an error (bad input, an unreachable goal: the rerun changes something,
so its digest differs); an interrupted or killed run keeps it. Results are deterministic, so a resumed run writes the bytes of an
uninterrupted one.
"""
from __future__ import annotations

import hashlib
import pickle
import shutil
from typing import Any

from .atomic import atomic_file
from .cache import cache_dir


class LayerCheckpoints:
    def __init__(self, step: str, *keys: str, resume: bool = False):
        digest = hashlib.sha256("|".join((step, *keys)).encode()).hexdigest()[:24]
        self.folder = cache_dir("checkpoints", f"{step}-{digest}")
        self.resume = resume

    def get(self, index: int) -> Any | None:
        """Layer ``index``'s saved result (only with ``resume``), or None."""
        path = self.folder / f"{index}.pkl"
        if not self.resume or not path.exists():
            return None
        with open(path, "rb") as f:
            return pickle.load(f)

    def put(self, index: int, result: Any) -> None:
        with atomic_file(self.folder / f"{index}.pkl") as tmp, open(tmp, "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
