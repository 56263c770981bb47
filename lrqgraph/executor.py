"""Where per-layer solves run: in this process, on worker processes, or on a Ray cluster.

A layer's solve (its candidate menu, its plan, its refit) is a pure function of numpy arrays and
configs, so layers are independent tasks. ``Executor.map`` runs them and yields the results in
task order, whatever order they finish in, so every executor gives the same output; each task
runs with one BLAS thread on every executor, so the arithmetic (and the output bytes) are the
same too. Parallelism is across layers: on this project's 2-core machine one layer's menu takes
as long with one BLAS thread as with two (bench/candidates.py), so the second core was idle.

At most ``2 × workers`` tasks are in flight: the caller builds a task's arrays only when a slot
frees up and consumes results while later layers are solved (the tolerance step measures layer i
in onnxruntime while the workers solve layers i+1, i+2, ...), and a model's weights are never all
copied to the workers at once.
"""
from __future__ import annotations

import itertools
import logging
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from threadpoolctl import threadpool_limits

from .errors import LrqError
from .worker import read_frame, write_frame

log = logging.getLogger(__name__)

KINDS = ("auto", "local", "process", "ray")
# ``auto`` starts processes only for this much work (weights x candidates; about 4 s of solves at
# MiniLM's shapes): starting a worker costs about a second of imports
AUTO_MIN_COST = 20e6


@dataclass(frozen=True)
class ExecutorConfig:
    """``kind``: ``auto`` (a process pool on a multi-core machine when the work is large enough,
    in this process otherwise), ``local``, ``process`` or ``ray``; ``workers``: the pool's size
    (None: the cores this process may use; for Ray the cluster's CPUs); ``address``: the Ray
    cluster to join (None: the one this process is connected to, or a new local one)."""

    kind: str = "auto"
    workers: int | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LrqError(f"unknown --executor '{self.kind}'; choose one of {', '.join(KINDS)}")
        if self.workers is not None and self.workers < 1:
            raise LrqError(f"--workers must be at least 1, got {self.workers}")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _one_thread(fn: Callable[..., Any], args: tuple) -> tuple[Any, float]:
    start = time.perf_counter()
    with threadpool_limits(limits=1):
        out = fn(*args)
    return out, time.perf_counter() - start


def _import_path() -> str:
    return os.pathsep.join(p for p in sys.path if p)


class _Worker:
    """One worker subprocess (lrqgraph.worker.serve) and its two pipes."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": _import_path(),
               **{name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
        self.proc = subprocess.Popen([sys.executable, "-c", "from lrqgraph.worker import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.index: int | None = None  # the task it is solving

    def send(self, index: int, fn: Callable[..., Any], args: tuple) -> None:
        self.index = index
        try:
            write_frame(self.proc.stdin, (fn, args))
        except BrokenPipeError:
            raise _died() from None

    def receive(self) -> tuple[Any, float]:
        try:
            status, out, seconds = read_frame(self.proc.stdout)
        except EOFError:
            raise _died() from None
        self.index = None
        if status == "error":
            raise out
        return out, seconds

    def stop(self, kill: bool = False) -> None:
        try:
            if kill:
                self.proc.kill()
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _died() -> LrqError:
    return LrqError("a worker process died (out of memory?); run with fewer --workers or --executor local")


class _ProcessPool:
    """Worker subprocesses of this machine, one task each at a time."""

    def __init__(self, workers: int):
        self.workers = [_Worker() for _ in range(workers)]
        log.info("executor: %d worker processes", workers)

    def idle(self) -> bool:
        return any(w.index is None for w in self.workers)

    def start(self, index: int, fn: Callable[..., Any], args: tuple) -> None:
        next(w for w in self.workers if w.index is None).send(index, fn, args)

    def collect(self) -> list[tuple[int, Any, float]]:
        """Blocks until a task finishes; [] when none runs."""
        busy = {w.proc.stdout: w for w in self.workers if w.index is not None}
        if not busy:
            return []
        out = []
        for stream in select.select(list(busy), [], [])[0]:
            index = busy[stream].index
            out.append((index, *busy[stream].receive()))
        return out

    def running(self) -> bool:
        return any(w.index is not None for w in self.workers)

    def close(self, kill: bool = False) -> None:
        for worker in self.workers:
            worker.stop(kill)


class _RayPool:
    """Ray tasks of one CPU each, on the cluster ``address`` names (a local one without): the
    arguments travel through Ray's object store."""

    def __init__(self, address: str | None):
        try:
            import ray
        except ImportError:
            raise LrqError("--executor ray needs the ray package: pip install 'lrqgraph[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()  # a cluster the caller connected stays up
        if self.started:
            # the caller's import path, as worker processes get it (where the nodes share the file system)
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": _import_path()}})
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.remote = ray.remote(num_cpus=1, max_retries=0)(_one_thread)
        self.pending: dict[Any, int] = {}
        log.info("executor: Ray cluster with %d CPUs", self.cpus)

    def idle(self) -> bool:
        return True  # Ray queues what the cluster cannot run yet

    def start(self, index: int, fn: Callable[..., Any], args: tuple) -> None:
        self.pending[self.remote.remote(fn, args)] = index

    def collect(self) -> list[tuple[int, Any, float]]:
        if not self.pending:
            return []
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        out = []
        for ref in ready:
            index = self.pending.pop(ref)
            try:
                result, seconds = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as exc:  # the task's own exception, as raised
                raise (getattr(exc, "cause", None) or exc) from None
            except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError):
                raise _died() from None
            out.append((index, result, seconds))
        return out

    def running(self) -> bool:
        return bool(self.pending)

    def close(self, kill: bool = False) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending = {}
        if self.started:
            self.ray.shutdown()


class Executor:
    """Runs tasks ``fn(*args)``; ``map`` yields results in task order. Use as a context manager
    (or call ``close``) to stop the workers."""

    def __init__(self, config: ExecutorConfig | None = None):
        self.config = config or ExecutorConfig()
        self.workers = self.config.workers or (usable_cores() if self.config.kind in ("auto", "process") else 1)
        self._pool: _ProcessPool | _RayPool | None = None
        self.tasks = 0
        self.seconds = 0.0          # summed over tasks: the work, wherever it ran
        self.used = "local"         # what ran the tasks so far: local, process, ray

    def _parallel(self, costs: Sequence[float] | None, count: int | None) -> bool:
        """Whether these tasks go to workers: always for ``process`` and ``ray`` (one worker too:
        the solves then run apart from this process), for ``auto`` only when there are several
        workers and enough work to repay starting them."""
        if self.config.kind in ("process", "ray"):
            return count != 0
        if self.config.kind == "local" or self.workers < 2 or count == 1:
            return False
        return costs is not None and sum(costs) >= AUTO_MIN_COST

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple], costs: Sequence[float] | None = None
            ) -> Iterator[Any]:
        """``fn(*args)`` for each task, in order. ``fn`` must be a module-level function and the
        arguments picklable; ``costs`` (one per task, any unit) let ``auto`` decide whether a pool pays."""
        if not self._parallel(costs, len(costs) if costs is not None else None):
            for args in tasks:
                out, seconds = _one_thread(fn, args)
                self._count(seconds)
                yield out
            return
        yield from self._pooled(fn, iter(tasks), costs)

    def _count(self, seconds: float) -> None:
        self.tasks += 1
        self.seconds += seconds

    def _pooled(self, fn: Callable[..., Any], tasks: Iterator[tuple], costs: Sequence[float] | None = None
                ) -> Iterator[Any]:
        if self._pool is None:
            self._pool = _RayPool(self.config.address) if self.config.kind == "ray" else _ProcessPool(self.workers)
            if self.config.kind == "ray":
                self.workers = self.config.workers or self._pool.cpus
        self.used = "ray" if self.config.kind == "ray" else "process"
        pool, done = self._pool, {}
        limit = None if not costs else (2 * self.workers * max(costs), [0.0, *itertools.accumulate(costs)])
        sent = following = 0  # tasks handed out; the next index to yield
        exhausted = False
        try:
            while True:
                # hand out tasks while workers are idle, at most 2 x workers ahead of the caller
                # (with costs: as much work ahead as 2 x workers of the largest tasks)
                while not exhausted and self._room(limit, sent, following) and pool.idle():
                    args = next(tasks, None)
                    if args is None:
                        exhausted = True
                    else:
                        pool.start(sent, fn, args)
                        sent += 1
                if following in done:
                    yield done.pop(following)
                    following += 1
                    continue
                finished = pool.collect()
                if not finished:
                    return
                for index, out, seconds in finished:
                    self._count(seconds)
                    done[index] = out
        finally:  # stopped early (an error, or the caller's): workers still solving are stopped
            if pool.running():
                self.close(kill=True)

    def _room(self, limit: tuple[float, list[float]] | None, sent: int, following: int) -> bool:
        """Whether task ``sent`` may go out while the caller waits for task ``following``. By count
        alone, a slow task at the head of the line idles the other workers once a few quick ones
        behind it are done (a decoder block's down projection beside its k and v); by cost
        (``limit``: the most work ahead, and the prefix sums of the costs), the results held for
        the caller stay within what 2 x workers of the largest tasks hold."""
        if limit is None or sent + 1 >= len(limit[1]) or sent == following:
            return sent - following < 2 * self.workers
        most, prefix = limit
        return prefix[sent + 1] - prefix[following] <= most

    def describe(self) -> dict[str, Any]:
        """The report's "executor" entry."""
        return {"kind": self.used, "workers": self.workers if self.used != "local" else 1,
                "tasks": self.tasks, "seconds": round(self.seconds, 3)}

    def close(self, kill: bool = False) -> None:
        if self._pool is not None:
            self._pool.close(kill)
            self._pool = None

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
