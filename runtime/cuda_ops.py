"""lrqgraph's CUDA kernels (runtime/cuda/lrq_cuda.cu) on torch CUDA tensors, through their C ABI.

The library is compiled with nvcc on first use into lrqgraph's cache (keyed by the source's hash).
It computes the lrq ops' products on the GPU from the same packed factors; registering the kernels
with onnxruntime's CUDA execution provider needs onnxruntime-gpu, which no machine here has.
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lrqgraph.errors import LrqError
from lrqgraph.cache import cache_dir
from lrqgraph.numerics import QuantizedTensor

if TYPE_CHECKING:  # torch is imported where the kernels run, not on import
    import torch

SOURCE = Path(__file__).with_name("cuda") / "lrq_cuda.cu"


def available() -> bool:
    """nvcc on PATH (or in /usr/local/cuda) and a CUDA device torch can use."""
    try:
        import torch
    except ImportError:
        return False
    return _nvcc() is not None and torch.cuda.is_available()


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    return found or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def library_path() -> Path:
    nvcc = _nvcc()
    if nvcc is None:
        raise LrqError("nvcc not found: the CUDA kernels need a CUDA toolkit (put nvcc on PATH)")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = cache_dir("cuda") / f"liblrq_cuda-{digest}.so"
    failed = target.with_suffix(".error")
    if failed.exists():  # compile once per source, failures included
        raise LrqError(failed.read_text())
    if not target.exists():
        tmp = target.with_suffix(".tmp.so")
        done = subprocess.run([nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-o", str(tmp), str(SOURCE), "-lcublas"],
                              capture_output=True, text=True)
        if done.returncode:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()[-1:]
            failed.write_text(f"nvcc failed on {SOURCE}: {lines[0].strip() if lines else 'no message'}")
            raise LrqError(failed.read_text())
        tmp.replace(target)
    return target


_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(library_path()))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.lrq_cuda_qmatmul.argtypes = [p, i64, i64, i64, p, i32, i32, p, i32, p, p, p, i32, p]
        _LIB = lib
    return _LIB


@dataclass
class GpuFactor:
    """One quantized factor on the GPU, in the lrq ops' layout."""

    k: int
    n: int
    bits: int
    block: int
    codes: "torch.Tensor"          # uint8 [N, blocks, blob]
    scales: "torch.Tensor"         # float32 or float16 [N, blocks]
    zero_points: "torch.Tensor | None"

    @classmethod
    def of(cls, q: QuantizedTensor, device: str = "cuda") -> "GpuFactor":
        import torch
        codes, scales, zero_points = q.packed_columns()
        on = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        return cls(q.shape[0], q.shape[1], q.bits, q.block_size, on(codes), on(scales),
                   None if zero_points is None else on(zero_points))

    @property
    def half(self) -> bool:
        import torch
        return self.scales.dtype == torch.float16


def _check(code: int) -> None:
    if code:
        raise LrqError(f"CUDA kernel launch failed (cudaError {code})")


def qmatmul(x: "torch.Tensor", w: GpuFactor, bias: "torch.Tensor | None" = None) -> "torch.Tensor":
    """x[M, K] (float32, CUDA) · dequant(w) (+ bias)."""
    import torch
    x = x.contiguous()
    y = torch.empty((x.shape[0], w.n), dtype=torch.float32, device=x.device)
    _check(_lib().lrq_cuda_qmatmul(x.data_ptr(), x.shape[0], w.k, w.n, w.codes.data_ptr(), w.bits, w.block,
                                   w.scales.data_ptr(), int(w.half),
                                   w.zero_points.data_ptr() if w.zero_points is not None else None,
                                   bias.data_ptr() if bias is not None else None, y.data_ptr(), 0,
                                   torch.cuda.current_stream().cuda_stream))
    return y


def lowrank(x: "torch.Tensor", left: GpuFactor, right: GpuFactor, dense: GpuFactor | None = None,
            bias: "torch.Tensor | None" = None) -> "torch.Tensor":
    """x · L · R (+ x · Q) (+ bias), the lrq::QLowRankMatMul product (two or three launches)."""
    y = qmatmul(qmatmul(x, left), right, bias if dense is None else None)
    return y if dense is None else y + qmatmul(x, dense, bias)
