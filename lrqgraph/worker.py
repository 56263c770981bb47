"""A worker process of lrqgraph.executor: ``serve`` reads tasks from stdin and writes results to
stdout, one pickled frame each, until stdin closes.

Workers are plain subprocesses rather than multiprocessing's: those re-run the caller's main
script in every worker, which a script or notebook without an ``if __name__ == "__main__"``
guard cannot survive. The parent sets OPENBLAS_NUM_THREADS=1 (and its kin) before this process
imports numpy.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import struct
import sys
import time
from typing import Any, BinaryIO

HEADER = struct.Struct("<Q")


def write_frame(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def read_frame(stream: BinaryIO) -> Any:
    """The next object, or EOFError when the other end closed."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        raise EOFError
    size = HEADER.unpack(head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def serve() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its workers itself
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a task prints goes to stderr, never into the result channel
    sys.stdout = sys.stderr
    tasks = os.fdopen(0, "rb")
    # a task's warnings reach the parent's stderr formatted as the CLI formats its own
    logging.basicConfig(format="%(levelname).1s %(name)s (worker): %(message)s", stream=sys.stderr,
                        level=logging.WARNING)
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1)  # numpy loaded by a task's import: one BLAS thread, as in the parent
    while True:
        try:
            fn, args = read_frame(tasks)
        except EOFError:
            return
        start = time.perf_counter()
        try:
            reply = ("ok", fn(*args), time.perf_counter() - start)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            reply = ("error", exc, time.perf_counter() - start)
        try:
            write_frame(channel, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            write_frame(channel, ("error", RuntimeError(f"{type(reply[1]).__name__} cannot be sent back: {exc}"), 0.0))

