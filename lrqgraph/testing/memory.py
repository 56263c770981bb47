"""Peak memory of a command and every process it starts (worker pools, Ray workers), from /proc.

``ru_maxrss`` of the children counts the largest single process only; a run with worker processes
holds memory in several at once. This samples the resident set of the whole process tree.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and all its descendants now (0 for processes already gone)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


@dataclass(frozen=True)
class Measured:
    returncode: int
    seconds: float
    peak_rss: int          # bytes, the process tree's largest sampled sum
    output: str


def run_measured(command: list[str], interval: float = 0.05, env: dict | None = None,
                 timeout: float | None = None) -> Measured:
    """Run ``command`` to completion, sampling its tree's RSS every ``interval`` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
    return Measured(proc.returncode, time.perf_counter() - start, peak[0], output)
