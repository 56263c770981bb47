"""GPTQ / LDLQ: quantize a weight row by row with error feedback through the input Hessian.

For Y = X·W with W[K, N] (rows are inputs), the layer's output error is tr(ΔWᵀ H ΔW) with
H = XᵀX. Rows are quantized in order; each row's rounding error is pushed onto the rows not yet
quantized along the upper Cholesky factor of H⁻¹, which minimises the added output error
(GPTQ, Frantar et al. 2022; LDLQ of QuIP is the same update). Lazy batches of rows keep the work
in matrix products; all N output columns are processed together.
"""
from __future__ import annotations

import numpy as np

from .quant import QuantSpec, QuantizedTensor, _codes_for, _scales_for, quantize


def damped(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """H + damp·mean(diag H)·I, with dead inputs (zero diagonal) given a unit diagonal."""
    h = np.array(h, dtype=np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    mean = diag[~dead].mean() if (~dead).any() else 1.0
    h[np.diag_indices_from(h)] += damp * mean
    return h


def lower_inverse(lower: np.ndarray) -> np.ndarray:
    """L⁻¹ of a lower-triangular L, by halves: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹·C·A⁻¹, D⁻¹]].
    About n³/3 flops in matrix products, a sixth of a general inverse (numpy has no triangular solve)."""
    n = len(lower)
    if n <= 128:
        return np.tril(np.linalg.inv(lower))
    m = n // 2
    a, d = lower_inverse(lower[:m, :m]), lower_inverse(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m], out[m:, m:] = a, d
    out[m:, :m] = -(d @ (lower[m:, :m] @ a))
    return out


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper-triangular U with H⁻¹ = UᵀU.

    With J the reversal, J·H·J = C·Cᵀ (Cholesky), so H = V·Vᵀ for the upper V = J·C·J and
    U = V⁻¹ = J·C⁻¹·J: one Cholesky and one triangular inverse, no general inverse.
    A nearly singular H (e.g. Lᵀ H L of a low-rank factor) can lose definiteness to rounding:
    the damping is then raised tenfold, up to four times.
    """
    h = np.asarray(h, np.float64)
    extra = 0.0
    for _ in range(5):
        try:
            c = np.linalg.cholesky(h[::-1, ::-1] + extra * np.eye(len(h)))
            return np.ascontiguousarray(lower_inverse(c)[::-1, ::-1])
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-2 * float(np.mean(np.diag(h))) or 1e-6)
    raise np.linalg.LinAlgError("H is not positive definite even after damping")


class HessianInfo:
    """H = XᵀX of one layer's inputs with its factorizations computed once and reused."""

    def __init__(self, h: np.ndarray, damp: float = 0.01):
        self.h = np.asarray(h, np.float32)
        self.damp = damp
        self.damped = damped(h, damp)  # float64, as the factorizations use it
        self._u: np.ndarray | None = None
        self._s: np.ndarray | None = None
        self._s_inv: np.ndarray | None = None
        self._ordered: tuple[np.ndarray, np.ndarray] | None = None
        self._rotated: dict = {}

    def rotated(self, rotation) -> "HessianInfo":
        """The statistics of the rotated inputs X·R (numerics.rotation.Rotation), made once."""
        if rotation not in self._rotated:
            self._rotated[rotation] = HessianInfo(rotation.rotate_hessian(self.h), self.damp)
        return self._rotated[rotation]

    @classmethod
    def of(cls, h: "np.ndarray | HessianInfo | None") -> "HessianInfo | None":
        return h if h is None or isinstance(h, HessianInfo) else cls(h)

    @property
    def inverse_cholesky(self) -> np.ndarray:
        if self._u is None:
            self._u = inverse_cholesky_upper(self.damped).astype(np.float32)
        return self._u

    def act_order(self) -> tuple[np.ndarray, np.ndarray]:
        """(row order by decreasing diag H, upper inverse Cholesky factor of H in that order)."""
        if self._ordered is None:
            order = np.argsort(-np.diag(self.h), kind="stable")
            u = inverse_cholesky_upper(self.damped[np.ix_(order, order)]).astype(np.float32)
            self._ordered = (order, u)
        return self._ordered

    @property
    def cholesky(self) -> np.ndarray:
        """Lower S with damped H = S·Sᵀ."""
        if self._s is None:
            s = np.linalg.cholesky(damped(self.damped, 1e-6))
            self._s, self._s_inv = s.astype(np.float32), lower_inverse(s).astype(np.float32)
        return self._s

    @property
    def cholesky_inverse(self) -> np.ndarray:
        """S⁻¹ of :attr:`cholesky` (lower), so solves against S are matrix products."""
        self.cholesky  # made together
        return self._s_inv


def gptq_quantize(w: np.ndarray, h: "np.ndarray | HessianInfo", spec: QuantSpec,
                  act_order: bool = True, batch: int | None = None,
                  grid: QuantizedTensor | None = None) -> QuantizedTensor:
    """GPTQ-quantize W[K, N] given H[K, K] = XᵀX (any positive scale; 1% damping).

    With ``act_order`` (default) rows are visited by decreasing H diagonal (the inputs with the
    most energy first, so later rows can absorb their error) on grids fixed up front by the
    MSE-optimal block scales of W ("static groups"; ``grid`` gives them); without it, rows go in
    order and each block's grid is set from its rows as updated when the block is reached
    (reference GPTQ).
    """
    if act_order:
        return gptq_quantize_grids(w, h, [spec], None if grid is None else [grid], batch or 128)[0]
    k, n = w.shape
    info = _checked(h, k)
    block = spec.block_for(k)
    dtype = np.dtype(spec.scale_dtype)
    blocks = -(-k // block)
    scales = np.zeros((blocks, n), np.float32)
    zps = None if spec.symmetric else np.zeros((blocks, n), np.float32)
    u = info.inverse_cholesky
    w = np.array(w, dtype=np.float32)
    codes = np.zeros((k, n), np.uint8)
    batch = batch or 64
    for start in range(0, k, batch):
        stop = min(start + batch, k)
        rows = w[start:stop]  # a view: in-batch feedback updates w in place
        errors = np.zeros_like(rows)
        for i in range(stop - start):
            row = start + i
            b = row // block
            if row % block == 0:
                # a block's grid comes from its rows as updated so far (rows past this batch
                # have not yet received this batch's feedback, as in the reference GPTQ)
                scale, zp = _scales_for(w[None, row:row + block], spec.bits, spec.symmetric, 1.0, dtype)
                scales[b] = scale[0]
                if zps is not None:
                    zps[b] = zp[0]
            zp_b = None if zps is None else zps[b][None]
            code = _codes_for(rows[None, i:i + 1], scales[b][None], zp_b, spec.bits)[0, 0]
            codes[row] = code
            offset = (1 << (spec.bits - 1)) if zps is None else zps[b]
            err = (rows[i] - (code - offset) * scales[b]) / u[row, row]
            rows[i + 1:] -= np.outer(u[row, row + 1:stop], err)
            errors[i] = err
        w[stop:] -= u[start:stop, stop:].T @ errors
    return QuantizedTensor(codes=codes, scales=scales.astype(dtype),
                           zero_points=None if zps is None else zps.astype(np.uint8),
                           bits=spec.bits, block_size=block)


SUB_BATCH = 16  # rows per inner lazy update of gptq_quantize_grids
_WIDE_ENTRIES = 1 << 25  # entries of the side-by-side copies of W per pass (128 MB in float32)


def gptq_quantize_grids(w: np.ndarray, h: "np.ndarray | HessianInfo", specs: list[QuantSpec],
                        grids: list[QuantizedTensor] | None = None, batch: int = 128) -> list[QuantizedTensor]:
    """GPTQ with act-order and static groups on several grids of one weight in one pass.

    Given H, the columns of W are quantized independently (the feedback runs down the rows), so
    the grids' copies of W go side by side as one wide matrix: one walk over the rows serves
    every grid, and the per-row work is long vector operations instead of one short pass per
    grid. Each grid's scales are fixed up front (``grids``, or the MSE-optimal block scales of
    W per spec); the result per grid equals :func:`gptq_quantize` on it alone.
    """
    return gptq_grids_with_errors(w, h, specs, grids, batch)[0]


def gptq_grids_with_errors(w: np.ndarray, h: "np.ndarray | HessianInfo", specs: list[QuantSpec],
                           grids: list[QuantizedTensor] | None = None, batch: int = 128
                           ) -> tuple[list[QuantizedTensor], list[float]]:
    """:func:`gptq_quantize_grids` and each grid's output error tr(ΔWᵀ H ΔW), from the walk itself.

    With H⁻¹ = UᵀU (in visiting order) the walk's scaled errors e (row i's rounding error over
    U_ii) satisfy ΔW = Uᵀe, so tr(ΔWᵀ H_d ΔW) = ‖e‖² for the damped H_d the walk used; H_d − H is
    diagonal, which leaves tr(ΔWᵀ H ΔW) = ‖e‖² − Σ_i (H_d − H)_ii ‖ΔW_i‖², an O(KN) correction
    instead of a K²N product per grid.
    """
    k, n = w.shape
    info = _checked(h, k)
    w = np.asarray(w, np.float32)
    grids = list(grids) if grids is not None else [quantize(w, spec) for spec in specs]
    per_pass = max(1, _WIDE_ENTRIES // (k * n))  # the wide working copy stays below this
    if len(grids) > per_pass:
        parts = [gptq_grids_with_errors(w, info, specs[i:i + per_pass], grids[i:i + per_pass], batch)
                 for i in range(0, len(grids), per_pass)]
        return [q for made, _ in parts for q in made], [e for _, errors in parts for e in errors]
    order, u = info.act_order()
    per_grid = [(q.scales.astype(np.float32), q.zero_point_array().astype(np.float32), order // q.block_size)
                for q in grids]
    top = np.repeat(np.array([(1 << q.bits) - 1 for q in grids], np.float32), n)
    work = np.tile(w[order], (1, len(grids)))
    codes = np.empty(work.shape, np.uint8)
    squared = np.zeros(work.shape[1], np.float64)  # Σ e² per column
    # two levels of lazy updates: the feedback of a sub-batch of rows reaches the rest of its
    # batch as one product, and a batch's reaches the rows below it as one product (the rows
    # below are touched once per batch, the batch's rows stay in cache)
    for start in range(0, k, batch):
        stop = min(start + batch, k)
        rows = work[start:stop]  # a view: feedback updates work in place
        errors = np.empty_like(rows)
        for sub in range(start, stop, SUB_BATCH):
            end = min(sub + SUB_BATCH, stop)
            # each visited row's scale and zero offset on every grid (its block's, side by side)
            scale = np.concatenate([sc[blocks[sub:end]] for sc, _, blocks in per_grid], axis=1)
            offset = np.concatenate([zp[blocks[sub:end]] for _, zp, blocks in per_grid], axis=1)
            for row in range(sub, end):
                i, j = row - start, row - sub
                code = np.clip(np.rint(rows[i] / scale[j]) + offset[j], 0, top)
                codes[row] = code
                err = (rows[i] - (code - offset[j]) * scale[j]) / u[row, row]
                rows[i + 1:end - start] -= np.outer(u[row, row + 1:end], err)
                errors[i] = err
            rows[end - start:] -= u[sub:end, end:stop].T @ errors[sub - start:end - start]
        work[stop:] -= u[start:stop, stop:].T @ errors
        squared += np.einsum("ij,ij->j", errors, errors, dtype=np.float64)
    codes[order] = codes.copy()
    made = [QuantizedTensor(codes=np.ascontiguousarray(codes[:, j * n:(j + 1) * n]), scales=q.scales,
                            zero_points=q.zero_points, bits=q.bits, block_size=q.block_size)
            for j, q in enumerate(grids)]
    extra = np.diag(info.damped) - np.diag(info.h).astype(np.float64)  # H_d − H, diagonal
    errors = []
    for j, q in enumerate(made):
        delta = w - q.dequantize().astype(np.float32)
        correction = float(extra @ np.einsum("ij,ij->i", delta, delta, dtype=np.float64))
        errors.append(max(float(squared[j * n:(j + 1) * n].sum()) - correction, 0.0))
    return made, errors


def _checked(h: "np.ndarray | HessianInfo", k: int) -> HessianInfo:
    info = HessianInfo.of(h)
    if info.h.shape != (k, k):
        raise ValueError(f"H must be {k}x{k} for a weight with {k} rows, got {info.h.shape}")
    return info


def output_energy(w: np.ndarray, h: np.ndarray) -> float:
    """tr(Wᵀ H W) = ‖X·W‖² for inputs with H = XᵀX (float32 products: the K²N cost; float64 sum)."""
    w = np.asarray(w, np.float32)
    return float(np.einsum("ij,ij->", w, np.asarray(h, np.float32) @ w, dtype=np.float64))


def activation_error(w: np.ndarray, approx: np.ndarray, h: np.ndarray, energy: float | None = None) -> float:
    """sqrt(tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)): relative output error of Y = X·W for inputs with H = XᵀX.
    ``energy``: output_energy(w, h), when the caller compares many approximations of one W."""
    delta = np.asarray(w, np.float32) - np.asarray(approx, np.float32)
    num = output_energy(delta, h)
    den = output_energy(w, h) if energy is None else energy
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else float(np.sqrt(max(num, 0.0)))
