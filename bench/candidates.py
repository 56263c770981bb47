"""Time of one layer's allocation menu (passes/tolerance.candidates_for) at the shapes of Gemma 3
270M and MiniLM, split by where it goes.

Every candidate of the `ort` menu is computed for real (GPTQ on the dense and rotated grids, LPLR,
Q + L·R warm-started from the dense candidates) with its activation-aware error, as the
allocator's tolerance step does for each layer. Weights and H = XᵀX are seeded random (4096
input rows with uneven feature scales): the work depends on the shapes only. The split comes
from cProfile (its overhead included in the total); "per model" multiplies each shape by how
often the model has it.

    python bench/candidates.py [--repeat 2]
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent))
from lrqgraph.methods import GPTQConfig  # noqa: E402
from lrqgraph.passes import tolerance  # noqa: E402
from lrqgraph.report import table  # noqa: E402

# (model, role, K, N, layers of that shape in the model)
SHAPES = [("Gemma 3 270M", "q", 640, 1024, 18), ("Gemma 3 270M", "k / v", 640, 256, 36),
          ("Gemma 3 270M", "o", 1024, 640, 18), ("Gemma 3 270M", "gate / up", 640, 2048, 36),
          ("Gemma 3 270M", "down", 2048, 640, 18),
          ("MiniLM", "q / k / v / o", 384, 384, 24), ("MiniLM", "intermediate", 384, 1536, 6),
          ("MiniLM", "output", 1536, 384, 6)]
# where the time goes: (column, functions whose own time counts there)
PARTS = [("GPTQ walk", ("gptq_quantize_grids", "outer", "_clip")),
         ("clip search", ("quantize", "_codes_for", "_scales_for", "_block_range")),
         ("factorizations", ("cholesky", "lower_inverse", "inv", "solve", "qr", "svd")),
         ("errors", ("output_energy", "c_einsum"))]


class _Layer:
    """What candidates_for reads of a plan.Layer."""
    gathers = ()
    kernel = None
    dtype = "float32"

    def __init__(self, w: np.ndarray):
        self.w, self.shape, self.stored_bits = w, w.shape, w.size * 32

    def weight_matrix(self) -> np.ndarray:
        return self.w


def time_shape(k: int, n: int, repeat: int) -> tuple[int, float, dict[str, float]]:
    """(candidates, fastest unprofiled seconds, share of the profiled time per part)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((4096, k)).astype(np.float32) * (1 + 3 * rng.random(k)).astype(np.float32)
    h = x.T @ x
    menu = tolerance.menu_for("ort")
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        cands = tolerance.candidates_for(_Layer(w), menu, GPTQConfig(), h, "ort")
        best = min(best, time.perf_counter() - start)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    tolerance.candidates_for(_Layer(w), menu, GPTQConfig(), h, "ort")
    prof.disable()
    profiled = time.perf_counter() - start
    own: dict[str, float] = {}
    for (_, _, name), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
        key = name.strip("<>").split(" ")[-1].split(".")[-1]  # "c_einsum" of "<built-in method ....c_einsum>"
        own[key] = own.get(key, 0.0) + tottime
    return len(cands) - 1, best, {col: sum(own.get(f, 0.0) for f in funcs) / profiled for col, funcs in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2, help="runs per shape; the fastest is reported")
    args = parser.parse_args()
    tolerance.lowerable = lambda layer, rep, lowering: True  # a bare matrix: every candidate lowers
    rows, per_model = [], {}
    for model, role, k, n, layers in SHAPES:
        count, seconds, parts = time_shape(k, n, args.repeat)
        per_model[model] = per_model.get(model, 0.0) + seconds * layers
        rows.append([model, role, f"{k}x{n}", str(layers), str(count), f"{seconds:.2f}",
                     *[f"{parts[col]:.0%}" for col, _ in PARTS], f"{seconds * layers:.0f}"])
    print(f"{datetime.date.today()} · {platform.machine()} · {os.cpu_count()} cores · numpy {np.__version__} · "
          f"ort menu, fastest of {args.repeat}")
    print(table(["model", "role", "K x N", "layers", "candidates", "s per layer", *[c for c, _ in PARTS],
                 "s for the role"], rows))
    for model, seconds in per_model.items():
        print(f"{model}: {seconds:.0f} s of candidates for every layer of these shapes")


if __name__ == "__main__":
    main()
