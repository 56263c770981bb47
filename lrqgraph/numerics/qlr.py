"""W ≈ Q + L·R (CALDERA / LoftQ style): a quantized full-size Q plus quantized low-rank factors.

Alternate Q = quantize(W − L·R) (GPTQ when H = XᵀX is known, RTN otherwise) and
L·R = LPLR-SVD factors of W − Q (activation-aware with H); keep the best iterate by the
(activation-aware) error. The low-rank part mops up what the coarse grid of Q misses most.
"""
from __future__ import annotations

import numpy as np

from .gptq import HessianInfo
from .lowrank import _quantize, _score, lplr_factorize
from .quant import QuantSpec, QuantizedTensor
from .representation import Representation


def qlr_factorize(w: np.ndarray, rank: int, spec_q: QuantSpec, spec_lr: QuantSpec, *,
                  h: np.ndarray | HessianInfo | None = None, iters: int = 5, refits: int = 1,
                  seed: int = 0, sweeps: int = 2, per_iter_sweeps: bool = False,
                  q0: QuantizedTensor | None = None) -> Representation:
    """``q0``: the first alternation's Q, already quantized on ``spec_q`` (the allocator's dense
    candidate); with ``iters=1`` that is W ≈ Q + L·R with L·R the best rank-``rank`` fit of the
    residual W − Q (EoRA-style), at one truncated SVD."""
    w = np.asarray(w, np.float32)
    hinfo = HessianInfo.of(h)
    lowrank = np.zeros_like(w)
    best, best_err = None, np.inf
    for step in range(iters):
        # coordinate descent on Q costs a K·K·N product per sweep: only in the last alternation
        # (or in every one with per_iter_sweeps), where it ends polishing the Q that is kept
        if step == 0 and q0 is not None:
            q = q0
        else:
            q = _quantize(w - lowrank, spec_q, hinfo, sweeps if per_iter_sweeps or step == iters - 1 else 0)
        qd = q.dequantize()
        lr = lplr_factorize(w - qd, rank, spec_lr, spec_lr, h=hinfo, init="svd", refits=refits, seed=seed)
        lowrank = lr.dequantize()
        err = _score(w, qd + lowrank, hinfo)
        if err < best_err:
            best, best_err = ((q,), lr.chains[0]), err
    return Representation(chains=best, method="qlr", rank=rank,
                          info={"iters": iters, "activation_aware": hinfo is not None})
