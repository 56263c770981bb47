"""lrqgraph's CUDA kernels against numpy (skipped without nvcc and a CUDA GPU)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrqgraph.numerics import QuantSpec, lplr_factorize, quantize
from lrqgraph.runtime import cuda_ops

pytestmark = pytest.mark.skipif(not cuda_ops.available(), reason="needs nvcc and a CUDA GPU visible to torch")
FLOAT_ULPS = 1e-5  # float32 sums over K of products, in another order than numpy's


@settings(max_examples=40, deadline=None)
@given(k=st.integers(16, 300), n=st.integers(1, 90), bits=st.integers(2, 8),
       block=st.sampled_from([16, 18, 32, 40, 64, 128]), symmetric=st.booleans(),
       scales=st.sampled_from(["float32", "float16"]), batch=st.sampled_from([1, 3, 17, 40]), seed=st.integers(0, 99))
def test_qmatmul_matches_numpy(k, n, bits, block, symmetric, scales, batch, seed):
    import torch
    rng = np.random.default_rng(seed)
    q = quantize(rng.standard_normal((k, n)).astype(np.float32),
                 QuantSpec(bits=bits, block_size=block, symmetric=symmetric, scale_dtype=scales))
    x = rng.standard_normal((batch, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = cuda_ops.qmatmul(torch.from_numpy(x).cuda(), cuda_ops.GpuFactor.of(q), torch.from_numpy(bias).cuda())
    w = q.dequantize().astype(np.float64)
    tol = FLOAT_ULPS * (np.abs(x) @ np.abs(w)).max() + 1e-6
    np.testing.assert_allclose(y.cpu().numpy(), x @ w + bias, rtol=0, atol=tol)


@pytest.mark.parametrize("dense", [False, True])
def test_lowrank_matches_numpy(dense):
    import torch
    rng = np.random.default_rng(1)
    k, n, rank = 200, 150, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    spec = QuantSpec(bits=4, block_size=32, scale_dtype="float16")
    left, right = lplr_factorize(w, rank, spec, spec).chains[0]
    q = quantize(w - left.dequantize() @ right.dequantize(), QuantSpec(bits=2, block_size=32, scale_dtype="float16"))
    x = rng.standard_normal((5 if dense else 33, k)).astype(np.float32)  # GEMV and SGEMM paths
    f = cuda_ops.GpuFactor.of
    y = cuda_ops.lowrank(torch.from_numpy(x).cuda(), f(left), f(right), f(q) if dense else None)
    lw, rw = left.dequantize().astype(np.float64), right.dequantize().astype(np.float64)
    want = x @ lw @ rw + (x @ q.dequantize() if dense else 0)
    tol = FLOAT_ULPS * ((np.abs(x) @ np.abs(lw)) @ np.abs(rw)).max() * 4
    np.testing.assert_allclose(y.cpu().numpy(), want, rtol=0, atol=tol)
