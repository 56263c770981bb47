"""The main job on a real model: per-layer allocation of all-MiniLM-L6-v2 at a size budget.

    python examples/minilm.py [--out out/minilm] [--target-bpw 4] [lrqgraph optimize options...]

1. Export MiniLM (BERT + mean pooling + L2 norm) to ONNX (cached) and write 128 KJV verses as
   calibration inputs (an .npz keyed by input name).
2. ``lrqgraph optimize --target-bpw 4``: every layer gets candidates from every representation
   family the lowering runs (dense grids, rotated grids, Q + L·R, L·R), measured in onnxruntime;
   the allocator picks one per layer within 4 bits per weight and writes the HTML report. The word
   and position embedding tables take 8-bit grids outside that budget (``--tables-in-budget``
   lets them compete; ``--target-size`` always does). The command prints the family chosen per layer.
3. onnxruntime's own quantizer (RTN 4-bit block 32 on the MatMuls; its Gather path upgrades
   MiniLM to opset 21 and writes a ReduceL2 that onnxruntime then refuses, so tables stay float).
4. Both against fp32 on 200 other verses and on 200 movie-review sentences (another domain than
   the calibration text): whole-file bits per parameter, embedding cosine, and latency for 128-token
   inputs at batch 1 and 8 (the three models in turns), as ratios to fp32. The allocation holds
   its latency budget at those rows (``--latency-rows 128,1024``: one 128-token input, and eight).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import onnx

from lrqgraph.cli import main as lrqgraph_cli
from lrqgraph.io import tensor_bytes
from lrqgraph.runtime import interleaved_latency_ms
from lrqgraph.testing import data, minilm

TOKENS = 128  # the inputs the example times (padded), and the rows its latency budget holds at

def run(argv: list[str]) -> int:
    print("$ lrqgraph " + " ".join(shlex.quote(a) for a in argv), flush=True)
    return lrqgraph_cli(argv)


def onnxruntime_rtn(fp32: Path, out: Path) -> None:
    """onnxruntime's MatMulNBitsQuantizer: round-to-nearest 4-bit block 32 on the MatMuls."""
    import logging
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True)
    quant = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True, algo_config=config)
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer sets the root logger to INFO
    quant.process()
    quant.model.save_model_to_file(str(out), use_external_data_format=False)


def movie_reviews(count: int) -> list[str]:
    import gensim
    path = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"
    return [line.split(" ", 1)[1].strip() for line in path.read_text(encoding="latin1").splitlines()][:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/minilm", help="folder for the models and the reports")
    parser.add_argument("--target-bpw", default="4", help="bits per weight over every layer but the tables (default 4)")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    fp32 = minilm.onnx_path()
    print(f"MiniLM exported to {fp32}")
    calib = out / "calib.npz"
    np.savez(calib, **minilm.encode(data.kjv_sentences(128, start=1), pad_to=64))
    optimized, report, html = out / "minilm.onnx", out / "report.json", out / "report.html"
    rc = run(["optimize", str(fp32), "-o", str(optimized), "--calib", str(calib), "--target-bpw", args.target_bpw,
              "--latency-rows", f"{TOKENS},{8 * TOKENS}", "--report", str(report), "--report-html", str(html), *extra])
    if rc:
        return rc
    ort_rtn = out / "minilm.onnxruntime-rtn.onnx"
    onnxruntime_rtn(fp32, ort_rtn)
    models = {"fp32": fp32, f"lrqgraph --target-bpw {args.target_bpw}": optimized, "onnxruntime RTN 4-bit": ort_rtn}

    texts = {"KJV verses": data.kjv_sentences(200, start=0), "movie reviews": movie_reviews(200)}
    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(fp32)).graph.initializer)
    latency = {batch: interleaved_latency_ms(list(models.values()),
                                             minilm.encode(texts["KJV verses"][:batch], pad_to=TOKENS),
                                             runs=120 if batch == 1 else 40, rounds=20 if batch == 1 else 10)
               for batch in (1, 8)}
    print(f"\nagainst fp32: embedding cosine mean (min) on 200 held-out KJV verses and 200 movie reviews; "
          f"latency for {TOKENS}-token inputs at batch 1 and 8 (2 threads, the models in turns)")
    references = {name: minilm.embed(str(fp32), sentences) for name, sentences in texts.items()}
    for i, (label, path) in enumerate(models.items()):
        bits = tensor_bytes(onnx.load(str(path))) * 8 / params
        quality = []
        for name, sentences in texts.items():
            cos = minilm.cosines(references[name], minilm.embed(str(path), sentences))
            quality.append(f"{name} {cos.mean():.4f} ({cos.min():.4f})")
        speed = "  ".join(f"b{b} {ms[i]:6.1f} ms ({ms[i] / ms[0]:.3f}x)" for b, ms in latency.items())
        print(f"  {label:28s} {path.stat().st_size / 1e6:5.1f} MB  {bits:6.3f} bits/param  {speed}  "
              + "  ".join(quality))
    print(f"report: {report}, {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
