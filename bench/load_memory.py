"""Peak resident memory of a process that loads each model into onnxruntime and runs it once.

    python bench/load_memory.py model.onnx [model.onnx ...] [--input-shape name=1,128 ...]

Each model loads in a fresh Python process (lrqgraph.runtime.session, CPU), so one model's peak
does not hide another's: the peak holds the weights as the session keeps them and whatever the
session's graph optimizations hold while they fold constants (a weight rebuilt in float at load,
codes widened to 4 bits). Inputs are zeros of the model's input shapes, free dimensions set to 1
unless ``--input-shape`` says otherwise. Prints MB per model and the ratio to the first model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import numpy as np
from lrqgraph.runtime import session
path, shapes = sys.argv[1], json.loads(sys.argv[2])
s = session(path)
types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float16)": np.float16}
feeds = {i.name: np.zeros(shapes.get(i.name) or [d if isinstance(d, int) else 1 for d in i.shape], types[i.type])
         for i in s.get_inputs()}
s.run(None, feeds)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_mb(path: str, shapes: dict[str, list[int]]) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, path, json.dumps(shapes)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2",
                        help="an input's shape (default: its dimensions, free ones 1)")
    args = parser.parse_args()
    shapes = {k: [int(d) for d in v.split(",")] for k, v in (s.split("=", 1) for s in args.input_shape)}
    first = None
    for path in args.models:
        mb = peak_mb(path, shapes)
        first = first or mb
        print(f"{mb:8.1f} MB  {mb / first:5.2f}x  {path}", flush=True)


if __name__ == "__main__":
    main()
