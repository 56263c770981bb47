"""lrqgraph's native custom-op library (domain ``lrq``), built by ``pip install`` from runtime/native."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from lrqgraph.errors import LrqError

DOMAIN = "lrq"
LIBRARY = Path(__file__).with_name("liblrq_ops.so")
MIN_ORT = (1, 16)  # the library asks for API version 16


def library_path() -> Path:
    """Path of the custom-op library; a clear error naming the fix when it is missing."""
    if not LIBRARY.exists():
        raise LrqError(f"{LIBRARY} is missing: the native ops were not built (they need a C++ compiler and "
                       f"onnxruntime's headers); reinstall with 'pip install -e .' and read its output, or "
                       f"use --lowering ort")
    version = tuple(int(p) for p in ort.__version__.split(".")[:2])
    if version < MIN_ORT:
        raise LrqError(f"onnxruntime {ort.__version__} is older than the {'.'.join(map(str, MIN_ORT))} the "
                       f"lrq ops need; upgrade onnxruntime")
    return LIBRARY


def available() -> bool:
    return LIBRARY.exists()


def cpu_has_int8_kernels() -> bool:
    """Whether this CPU runs the int8-activation kernels (AVX-512 with VNNI; Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"))
