"""Up to how many rows a quantized layer beats the float MatMul: time ratio to float at 1..128 rows.

Gemma 3 270M's o_proj (1024x640) and gate_proj (640x2048) shapes, random 4-bit codes, as lrq's
QMatMul (block 64, int8 activations) and as MatMulNBits (block 32, int8 activations); each form
and the float layer take turns (warm: the weights stay in the caches), the median of about
0.6 s per row count. Below 1.00 the quantized layer is faster.

    python bench/crossover.py [--seconds 0.6]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import random_factor  # noqa: E402

from lrqgraph.latency import float_model, models_latency_ms  # noqa: E402
from lrqgraph.numerics import Representation  # noqa: E402
from lrqgraph.passes.lower import layer_model  # noqa: E402
from lrqgraph.report import table  # noqa: E402

CASES = [(1024, 640, 4, 64, "lrq"), (640, 2048, 4, 64, "lrq"), (1024, 640, 4, 32, "ort"), (640, 2048, 4, 32, "ort")]
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.6)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for k, n, bits, block, target in CASES:
        rep = Representation(((random_factor(k, n, bits, block, rng),),), "rtn")
        models = [layer_model(rep, target, 4), float_model(k, n)]
        ratios = []
        for m in ROWS:
            quantized, dense = models_latency_ms(models, {"x": rng.standard_normal((m, k)).astype(np.float32)},
                                                 seconds=args.seconds)
            ratios.append(f"{quantized / dense:.2f}")
        rows.append([f"{k}x{n}", f"{'QMatMul' if target == 'lrq' else 'MatMulNBits'} {bits}b g{block} int8", *ratios])
        print(" | ".join(rows[-1]), flush=True)
    print(table(["K x N", "form", *(f"M={m}" for m in ROWS)], rows))


if __name__ == "__main__":
    main()
