"""Optimize the real all-MiniLM-L6-v2 sentence encoder and check it on real sentences.

    python examples/minilm.py [--out out/minilm] [lrqgraph optimize options...]

1. Export MiniLM (BERT + mean pooling + L2 norm) to ONNX; the export is cached.
2. Write 128 real sentences as calibration inputs (an .npz keyed by input name): lrqgraph
   collects each layer's input statistics from them for GPTQ, and verifies on them.
3. Run ``lrqgraph optimize`` on it, which prints the per-layer table and a summary. With the
   native ops built (``pip install`` does it when a C++ compiler is present) the model uses them
   (``--lowering lrq``), and ``lrqgraph lower --to ort`` also writes a copy that any onnxruntime
   runs (MatMulNBits, the same codes and scales).
4. Compare sentence embeddings of 200 other real sentences with the fp32 model's, and time the
   models on one 128-token sentence.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from lrqgraph.cli import main as lrqgraph_cli
from lrqgraph.runtime import available, interleaved_latency_ms
from lrqgraph.testing import data, minilm


def run(argv: list[str]) -> int:
    print("$ lrqgraph " + " ".join(shlex.quote(a) for a in argv), flush=True)
    return lrqgraph_cli(argv)


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

    native = available() and "--lowering" not in extra
    optimized, report = out / "minilm.lrq.onnx", out / "report.json"
    lowering = ["--lowering", "lrq"] if native else []
    rc = run(["optimize", str(fp32), "-o", str(optimized), "--calib", str(calib), "--report", str(report),
              *lowering, *extra])
    if rc:
        return rc
    models = {"fp32": fp32, "optimized": optimized}
    if native:
        portable = out / "minilm.ort.onnx"
        rc = run(["lower", str(optimized), "-o", str(portable), "--to", "ort"])
        if rc:
            return rc
        models = {"fp32": fp32, "lrq (native ops)": optimized, "ort (MatMulNBits)": portable}

    sentences = data.kjv_sentences(200, start=0)
    reference = minilm.embed(str(fp32), sentences)
    latency = interleaved_latency_ms(list(models.values()), minilm.encode(sentences[:1], pad_to=128), runs=30)
    print(f"\non {len(sentences)} held-out KJV verses, and one 128-token sentence (2 threads):")
    for (name, path), ms in zip(models.items(), latency):
        cos = minilm.cosines(reference, minilm.embed(str(path), sentences))
        print(f"  {name:18s} {path.stat().st_size / 1e6:5.1f} MB  {ms:6.1f} ms  "
              f"embedding cosine vs fp32: mean {cos.mean():.4f}, min {cos.min():.4f}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
