"""Compression time of each method on one 4096x4096 matrix (this machine: 2 cores).

    python bench/timing.py

Targets from the issue: LPLR at rank 512 <= 2 s, GPTQ 4-bit <= 15 s, Kashin with a structured
transform <= 30 s, Q + L·R with 10 outer iterations <= 60 s.
"""
from __future__ import annotations

import time

import numpy as np

from lrqgraph.numerics import HessianInfo, QuantSpec, gptq_factorize, gptq_quantize, lplr_factorize, qlr_factorize
from lrqgraph.numerics.kashin import kashin_quantize
from lrqgraph.report import table


def main() -> None:
    rng = np.random.default_rng(0)
    n = 4096
    w = rng.standard_normal((n, n)).astype(np.float32)
    x = rng.standard_normal((2 * n, n)).astype(np.float32)
    h = x.T @ x
    spec4 = QuantSpec(4, 64, False)
    jobs = [
        ("lplr rank 512, 4-bit factors", 2, lambda: lplr_factorize(w, 512, spec4, spec4)),
        ("gptq 4-bit g128 (H given, act-order)", 15, lambda: gptq_quantize(w, HessianInfo(h), QuantSpec(4, 128))),
        ("gptq 4-bit g128 + 2 coordinate-descent sweeps (the default)", 15,
         lambda: gptq_factorize(w, QuantSpec(4, 128), HessianInfo(h), sweeps=2)),
        ("kashin 4-bit, hadamard", 30, lambda: kashin_quantize(w, 4, "hadamard")),
        ("qlr 10 iters, Q 2-bit g64 + rank 64 8-bit, data-free", 60,
         lambda: qlr_factorize(w, 64, QuantSpec(2, 64), QuantSpec(8, 64, False), iters=10, refits=0)),
        ("qlr 10 iters, Q 2-bit g64 + rank 64 8-bit, with H (2 cd sweeps on the last Q)", 60,
         lambda: qlr_factorize(w, 64, QuantSpec(2, 64), QuantSpec(8, 64, False), h=HessianInfo(h), iters=10,
                               refits=0)),
        ("qlr 10 iters as above, no coordinate descent (the issue's Q + L·R)", 60,
         lambda: qlr_factorize(w, 64, QuantSpec(2, 64), QuantSpec(8, 64, False), h=HessianInfo(h), iters=10,
                               refits=0, sweeps=0)),
        ("qlr 10 iters as above, 2 cd sweeps in every iteration", 60,
         lambda: qlr_factorize(w, 64, QuantSpec(2, 64), QuantSpec(8, 64, False), h=HessianInfo(h), iters=10,
                               refits=0, per_iter_sweeps=True)),
    ]
    rows = []
    for label, target, job in jobs:
        start = time.perf_counter()
        job()
        seconds = time.perf_counter() - start
        rows.append([label, f"{seconds:.1f}", target, "yes" if seconds <= target else "NO"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    print(table(["4096x4096", "seconds", "target s", "met"], rows))


if __name__ == "__main__":
    main()
