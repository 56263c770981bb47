"""Quantization, packing and bits accounting: properties over shapes, bits and block sizes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrqgraph.numerics import (QuantSpec, lplr_factorize, pack_bits, quantize, rank_for_bpw,
                               relative_error, svd_factorize, unpack_bits)
from lrqgraph.numerics.lowrank import lowrank_storage_bits
from lrqgraph.numerics.pack import packed_nbytes
from lrqgraph.numerics.quant import QuantizedTensor, spec_storage_bits

FAST = settings(max_examples=60, deadline=None)
specs = st.builds(QuantSpec, bits=st.integers(2, 8), block_size=st.sampled_from([0, 16, 32, 48, 64, 128]),
                  symmetric=st.booleans(), clip_search=st.booleans())


@FAST
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), count=st.integers(1, 70), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits, rows, count, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, count)).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (rows, packed_nbytes(count, bits))
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), codes)


def test_pack_4bit_low_nibble_first():
    assert pack_bits(np.array([[1, 2, 15, 0]], np.uint8), 4).tolist() == [[0x21, 0x0F]]
    assert pack_bits(np.array([[1, 2, 3]], np.uint8), 2).tolist() == [[0b111001]]


@FAST
@given(spec=specs, k=st.integers(1, 150), n=st.integers(1, 20), seed=st.integers(0, 99))
def test_quantize_round_trip_error_is_bounded_by_half_a_step(spec, k, n, seed):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) * 3
    q = quantize(w, spec)
    assert q.codes.shape == (k, n) and q.codes.max() < (1 << spec.bits)
    blocks = -(-k // spec.block_for(k))
    assert q.scales.shape == (blocks, n)
    deq = q.dequantize()
    # Values inside the clipped range are within half a step; clipping only happens with the
    # search or on the symmetric side opposite the extreme, at most one step away plus clip.
    step = np.abs(np.repeat(q.scales, spec.block_for(k), axis=0)[:k])
    if not spec.clip_search:
        inside = (q.codes > 0) & (q.codes < (1 << spec.bits) - 1)
        assert np.all(np.abs(w - deq)[inside] <= step[inside] * 0.5 + 1e-5)
        assert np.all(np.abs(w - deq) <= step * 1.0 + 1e-5)
    # Requantizing the dequantized matrix gives it back (the grid is a fixed point), to float32
    # rounding of the scale arithmetic: measured at most 1e-7 of the largest value.
    again = quantize(deq, QuantSpec(spec.bits, spec.block_size, spec.symmetric, False))
    assert np.abs(again.dequantize() - deq).max() <= 1e-6 * max(float(np.abs(deq).max()), 1e-30)


@FAST
@given(spec=specs, k=st.integers(1, 300), n=st.integers(1, 40))
def test_storage_bits_counts_every_stored_byte(spec, k, n):
    q = quantize(np.ones((k, n), np.float32), spec)
    block = spec.block_for(k)
    blocks = -(-k // block)
    codes = n * blocks * packed_nbytes(block, spec.bits) * 8
    scales = n * blocks * 32
    zps = 0 if spec.symmetric else n * packed_nbytes(blocks, spec.bits) * 8
    assert q.storage_bits() == codes + scales + zps == spec_storage_bits(k, n, spec)


@FAST
@given(spec=specs, k=st.integers(1, 80), n=st.integers(1, 80), seed=st.integers(0, 99))
def test_blocks_along_axis_1_are_the_transposed_problem(spec, k, n, seed):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    along_cols = quantize(w, spec, axis=1)
    along_rows_of_t = quantize(w.T, spec)
    assert along_cols.axis == 1 and along_cols.shape == (k, n)
    assert along_cols.scales.shape == (k, -(-n // spec.block_for(n)))
    np.testing.assert_array_equal(along_cols.dequantize(), along_rows_of_t.dequantize().T)
    assert along_cols.storage_bits() == along_rows_of_t.storage_bits() == spec_storage_bits(n, k, spec)


def test_codebook_and_vector_codebook_tensors():
    codes = np.array([[0, 1], [3, 2], [1, 1]], np.uint8)
    scalar = QuantizedTensor(codes, None, None, bits=2, block_size=3, codebook=np.array([-1, 0, .5, 2], np.float32))
    np.testing.assert_array_equal(scalar.dequantize(), [[-1, 0], [2, .5], [0, 0]])
    assert scalar.storage_bits() == packed_nbytes(6, 2) * 8 + 4 * 16
    pairs = QuantizedTensor(codes, None, None, bits=2, block_size=3,
                            codebook=np.arange(8, dtype=np.float32).reshape(4, 2))
    assert pairs.dequantize().shape == (3, 2, 2) and pairs.dequantize()[1, 0].tolist() == [6, 7]
    assert pairs.storage_bits() == packed_nbytes(6, 2) * 8 + 8 * 16
    # scales apply on top of codebook levels, block by block
    scaled = QuantizedTensor(codes, np.array([[2, 3]], np.float32), None, bits=2, block_size=3,
                             codebook=scalar.codebook)
    np.testing.assert_array_equal(scaled.dequantize(), scalar.dequantize() * [[2, 3]])
    with pytest.raises(ValueError):
        QuantizedTensor(codes, None, None, bits=2, block_size=3)


def test_symmetric_matches_onnxruntime_convention():
    # The largest-magnitude value maps to code 0 (value -8 * scale), like onnxruntime's quantizer.
    w = np.array([[-2.0], [1.0], [0.5], [0.0]] * 4, np.float32)
    q = quantize(w, QuantSpec(4, 16, True))
    assert q.codes[0, 0] == 0 and q.scales[0, 0] == pytest.approx(0.25)
    np.testing.assert_allclose(q.dequantize(), w)


def test_clip_search_never_increases_error():
    w = np.random.default_rng(1).standard_t(3, (512, 64)).astype(np.float32)
    for sym in (True, False):
        plain = relative_error(w, quantize(w, QuantSpec(4, 32, sym, False)).dequantize())
        searched = relative_error(w, quantize(w, QuantSpec(4, 32, sym, True)).dequantize())
        assert searched <= plain


def _low_rank(k=256, n=192, r=16, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) + noise * rng.standard_normal((k, n))).astype(np.float32)


def test_factorizations_have_the_requested_rank_and_storage():
    w = _low_rank()
    spec = QuantSpec(4, 16, False)
    for rep in (svd_factorize(w, 32, spec, spec), lplr_factorize(w, 32, spec, spec, seed=3)):
        left, right = rep.chains[0]
        assert left.shape == (256, 32) and right.shape == (32, 192) and rep.rank == 32
        assert rep.storage_bits() == lowrank_storage_bits(256, 192, 32, spec, spec)
        assert relative_error(w, rep.dequantize()) < 0.1


def test_lplr_is_deterministic_given_the_seed():
    w = _low_rank()
    spec = QuantSpec(3, 32)
    a = lplr_factorize(w, 16, spec, spec, seed=7).dequantize()
    b = lplr_factorize(w, 16, spec, spec, seed=7).dequantize()
    c = lplr_factorize(w, 16, spec, spec, seed=8).dequantize()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_lplr_error_feedback_beats_dsvd_at_low_bits():
    # The paper's claim: the least-squares second factor absorbs the first factor's
    # quantization error, which DSVD cannot. Per-tensor-like coarse blocks, 2-bit factors.
    w = _low_rank(noise=0.05)
    spec = QuantSpec(2, 128, False)
    dsvd = relative_error(w, svd_factorize(w, 16, spec, spec).dequantize())
    lplr = relative_error(w, lplr_factorize(w, 16, spec, spec, seed=0).dequantize())
    assert lplr < dsvd


def test_rank_for_bpw_fits_the_budget():
    spec = QuantSpec(4, 32)
    rank = rank_for_bpw(384, 1536, 3.0, spec, spec)
    assert rank % 16 == 0 and rank > 0
    assert lowrank_storage_bits(384, 1536, rank, spec, spec) <= 3.0 * 384 * 1536
    assert lowrank_storage_bits(384, 1536, rank + 16, spec, spec) > 3.0 * 384 * 1536
    assert rank_for_bpw(64, 64, 0.1, spec, spec) == 0


def test_softmax_reference_kl_matches_the_direct_formula():
    from lrqgraph.evaluate import SoftmaxReference, kl_divergence
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((2, 7, 5000)) * 4).astype(np.float32)
    near = logits + (rng.standard_normal(logits.shape) * 0.05).astype(np.float32)
    ref = SoftmaxReference(logits)
    assert abs(ref.kl(logits)) < 1e-9
    # float32 probabilities and logits against the float64 formula: measured relative gap 1e-8
    assert ref.kl(near) == pytest.approx(kl_divergence(logits, near), rel=1e-5)
    assert ref.kl(near + 3.0) == pytest.approx(ref.kl(near), rel=1e-5)  # softmax ignores a shift


@pytest.mark.parametrize("n", [1, 5, 128, 129, 300])
def test_lower_inverse_inverts_by_halves(n):
    from lrqgraph.numerics.gptq import lower_inverse
    rng = np.random.default_rng(n)
    lower = np.tril(rng.standard_normal((n, n))) + n * np.eye(n)
    inv = lower_inverse(lower)
    assert np.array_equal(inv, np.tril(inv))
    np.testing.assert_allclose(inv @ lower, np.eye(n), atol=1e-12)  # float64, well conditioned


def test_inverse_cholesky_upper_factors_the_inverse_and_damps_a_singular_h():
    from lrqgraph.numerics.gptq import inverse_cholesky_upper
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 200)) * (1 + 3 * rng.random(200))
    h = x.T @ x
    u = inverse_cholesky_upper(h)
    assert np.array_equal(u, np.triu(u))
    np.testing.assert_allclose(u.T @ u @ h, np.eye(200), atol=1e-9)
    np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-7, atol=1e-12)
    singular = x[:, :50].T @ x[:, :50]
    singular[:, 0] = singular[0, :] = 0  # a dead input: not positive definite
    u = inverse_cholesky_upper(singular)
    assert np.isfinite(u).all() and np.array_equal(u, np.triu(u))


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizing_slab_by_slab_gives_the_whole_matrix_codes(monkeypatch, symmetric):
    """quantize walks a wide weight in column slabs that stay in cache: the codes, scales and zero
    points must be those of one pass over the whole matrix."""
    import lrqgraph.numerics.quant as quant
    w = np.random.default_rng(3).standard_normal((96, 1000)).astype(np.float32)
    spec = quant.QuantSpec(4, 32, symmetric, clip_search=True)
    monkeypatch.setattr(quant, "_SLAB_VALUES", 96 * 48)  # slabs of 48 columns, the last one ragged
    slabbed = quant.quantize(w, spec)
    monkeypatch.setattr(quant, "_SLAB_VALUES", 1 << 40)
    whole = quant.quantize(w, spec)
    for field in ("codes", "scales", "zero_points"):
        a, b = getattr(slabbed, field), getattr(whole, field)
        assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and np.array_equal(a, b)))
