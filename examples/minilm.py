"""Optimize the real all-MiniLM-L6-v2 sentence encoder and check it on real sentences.

    python examples/minilm.py [--out out/minilm] [lrqgraph optimize options...]

1. Export MiniLM (BERT + mean pooling + L2 norm) to ONNX; the export is cached.
2. Write 128 real sentences as calibration inputs (an .npz keyed by input name): lrqgraph
   collects each layer's input statistics from them for GPTQ, and verifies on them.
3. Run ``lrqgraph optimize`` on it, which prints the per-layer table and a summary.
4. Compare sentence embeddings of 200 other real sentences with the fp32 model's.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from lrqgraph.cli import main as lrqgraph_cli
from lrqgraph.testing import data, minilm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/minilm", help="folder for the models and the report")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    fp32 = minilm.onnx_path()
    print(f"MiniLM exported to {fp32}")
    calib = out / "calib.npz"
    np.savez(calib, **minilm.encode(data.kjv_sentences(128, start=1), pad_to=64))

    optimized, report = out / "minilm.lrq.onnx", out / "report.json"
    argv = ["optimize", str(fp32), "-o", str(optimized), "--calib", str(calib), "--report", str(report), *extra]
    print("$ lrqgraph " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = lrqgraph_cli(argv)
    if rc:
        return rc

    sentences = data.kjv_sentences(200, start=0)
    cos = minilm.cosines(minilm.embed(str(fp32), sentences), minilm.embed(str(optimized), sentences))
    print(f"\nembedding cosine vs fp32 on {len(sentences)} held-out KJV verses: "
          f"mean {cos.mean():.4f}, min {cos.min():.4f}")
    print(f"sizes: fp32 {fp32.stat().st_size / 1e6:.1f} MB -> {optimized.stat().st_size / 1e6:.1f} MB; "
          f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
