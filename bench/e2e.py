"""End-to-end MiniLM table: fp32, onnxruntime's own MatMulNBits quantizer, and lrqgraph settings.

Every row is built in this run; calibrated rows get H from 128 verses disjoint from the 200
evaluation verses. Columns: file size, bits per weight of the rewritten layers
(codes + scales + zero points), latency at batch 1 x seq 128 and batch 8 x seq 128 (onnxruntime
CPU, 2 threads, median), and sentence-embedding cosine against fp32 on 200 real sentences.

    python bench/e2e.py [--runs 20] [--out bench/e2e.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from common import rewritten_bpw  # noqa: E402

import lrqgraph  # noqa: E402
from lrqgraph import FactorizeConfig, OptimizeConfig  # noqa: E402
from lrqgraph.report import table  # noqa: E402
from lrqgraph.runtime import interleaved_latency_ms  # noqa: E402
from lrqgraph.testing import data, minilm  # noqa: E402

SETTINGS = [  # (label, lowering, factorize options, calibrated[, accuracy level])
    ("lrqgraph default, data-free: rtn 4-bit b32 sym, MSE clip (ort)", "ort", {}, False),
    ("lrqgraph default, data-free (std: DQ + MatMul)", "std", {}, False),
    ("lrqgraph default + --calib: gptq 4-bit b32 sym (ort)", "ort", {}, True),
    ("lrqgraph --calib: gptq 4-bit b64 asym (ort)", "ort", dict(symmetric=False, block_size=64), True),
    ("lrqgraph rtn 4-bit b64 asym (ort)", "ort", dict(symmetric=False, block_size=64), False),
    ("lrqgraph rtn 8-bit b32 (ort, int8 activations)", "ort", dict(bits=8), False),
    ("lrqgraph lplr 8-bit factors, rank 1/2 (ort)", "ort", dict(method="lplr", bits=8, rank_ratio=0.5), False),
    ("lrqgraph svd 8-bit factors, rank 1/2 (ort)", "ort", dict(method="svd", bits=8, rank_ratio=0.5), False),
    ("lrqgraph default + --calib (ort, accuracy_level 4: int8 activations)", "ort", {}, True, 4),
    ("lrqgraph default + --calib (lrq native ops, int8 activations)", "lrq", {}, True),
    ("lrqgraph --calib: gptq 3-bit b32 fp16 scales (lrq)", "lrq", dict(bits=3, scale_dtype="float16"), True),
]


def ort_baseline(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)
    quant = MatMulNBitsQuantizer(onnx.load(str(fp32)),
                                 algo_config=DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True))
    quant.process()
    quant.model.save_model_to_file(str(out), use_external_data_format=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40, help="timed runs per batch-1 latency cell")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()

    fp32 = minilm.onnx_path()
    sentences = data.kjv_sentences(args.sentences, start=0)
    reference = minilm.embed(str(fp32), sentences)
    b1 = minilm.encode(sentences[:1], pad_to=128)
    b8 = minilm.encode(sentences[:8], pad_to=128)
    tmp = Path(tempfile.mkdtemp(prefix="lrqgraph-bench-"))
    weights = [e["weight"] for e in lrqgraph.run(fp32, passes="discover").report["layers"]
               if e["action"] == "rewrite"]

    models = [("fp32", fp32), ("onnxruntime MatMulNBits 4-bit b32 sym (quantizer)", tmp / "ort4.onnx")]
    ort_baseline(fp32, models[1][1])
    calib = tmp / "calib.npz"  # 128 verses disjoint from the evaluation ones
    np.savez(calib, **minilm.encode(data.kjv_sentences(128, start=1), pad_to=64))
    for i, (label, lowering, kwargs, calibrated, *level) in enumerate(SETTINGS):
        path = tmp / f"lrq{i}.onnx"
        config = OptimizeConfig(lowering=lowering, factorize=FactorizeConfig(**kwargs),
                                calib=str(calib) if calibrated else None, accuracy_level=(level or [None])[0])
        result = lrqgraph.run(fp32, config, passes=f"discover,{'calibrate,' if calibrated else ''}factorize,"
                                                   f"lower({lowering}),cleanup")
        lrqgraph.save_model(result.model, path)
        models.append((label, path))

    paths = [path for _, path in models]
    ms1 = interleaved_latency_ms(paths, b1, args.runs)
    ms8 = interleaved_latency_ms(paths, b8, max(5, args.runs // 2))
    rows = []
    for (label, path), t1, t8 in zip(models, ms1, ms8):
        cos = minilm.cosines(reference, minilm.embed(str(path), sentences))
        rows.append([label, f"{os.path.getsize(path) / 1e6:.1f}", f"{rewritten_bpw(path, fp32, weights):.3f}",
                     f"{t1:.1f}", f"{t1 / ms1[0]:.2f}", f"{t8:.1f}", f"{t8 / ms8[0]:.2f}",
                     f"{cos.mean():.4f}", f"{cos.min():.4f}"])
    headers = ["model", "file MB", "bits/weight", "ms b1x128", "x fp32", "ms b8x128", "x fp32",
               "cos mean", "cos min"]
    text = table(headers, rows)
    stamp = (f"{datetime.date.today()} · {platform.machine()} · {os.cpu_count()} cores · onnxruntime "
             f"{__import__('onnxruntime').__version__} · {len(sentences)} KJV verses · {len(weights)} MatMul weights")
    print(stamp)
    print(text)
    if args.out:
        md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        Path(args.out).write_text(stamp + "\n\n" + "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
