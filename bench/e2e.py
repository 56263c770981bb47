"""End-to-end MiniLM table: fp32, onnxruntime's own weight-only quantizers, and lrqgraph settings.

Every row is built in this run. Calibrated rows (lrqgraph's and onnxruntime's GPTQ) get the same
128 KJV verses (padded to 64 tokens), disjoint from the 200 evaluation verses. onnxruntime rows:
its MatMulNBitsQuantizer with DefaultWeightOnlyQuantConfig (data-free round to nearest),
GPTQWeightOnlyQuantConfig (its defaults, and act-order on), HQQWeightOnlyQuantConfig and
KQuantWeightOnlyQuantConfig, at the block sizes of lrqgraph's rows. Columns: file size, bits per
weight of the rewritten layers (codes + scales + zero points, counted alike for every tool),
seconds to build, latency at batch 1 x seq 128 and batch 8 x seq 128 (onnxruntime CPU, 2 threads,
median of interleaved runs: the models take turns), and sentence-embedding cosine against fp32 on
200 KJV verses (the calibration domain) and on 200 movie-review sentences (Pang & Lee, from the
gensim wheel: another domain; the column is left out when gensim is missing). The SUMMARY lines
put each lrqgraph row beside the best onnxruntime row (by in-domain cosine) that stores at most
0.15 more bits per weight (or, where onnxruntime has none that small, the best of its smallest).

    python bench/e2e.py [--runs 40] [--out bench/e2e.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import build_ort_rows, movie_review_sentences, rewritten_bpw, summary  # noqa: E402

import lrqgraph  # noqa: E402
from lrqgraph import FactorizeConfig, OptimizeConfig  # noqa: E402
from lrqgraph.report import table  # noqa: E402
from lrqgraph.runtime import interleaved_latency_ms  # noqa: E402
from lrqgraph.testing import data, minilm  # noqa: E402

SETTINGS = [  # (label, lowering, factorize options, calibrated[, accuracy level])
    ("lrqgraph default, data-free: rtn 4-bit b32 sym, MSE clip (ort)", "ort", {}, False),
    ("lrqgraph data-free, --no-clip-search: rtn 4-bit b32 sym (ort)", "ort", dict(clip_search=False), False),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40, help="timed runs per batch-1 latency cell")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()

    fp32 = minilm.onnx_path()
    sentences = data.kjv_sentences(args.sentences, start=0)
    reviews = movie_review_sentences(args.sentences)
    if reviews is None:
        print("gensim is not installed: no cross-domain column (pip install --no-deps gensim==4.4.0)")
    reference = minilm.embed(str(fp32), sentences)
    reference_reviews = minilm.embed(str(fp32), reviews) if reviews else None
    b1 = minilm.encode(sentences[:1], pad_to=128)
    b8 = minilm.encode(sentences[:8], pad_to=128)
    tmp = Path(tempfile.mkdtemp(prefix="lrqgraph-bench-"))
    weights = [e["weight"] for e in lrqgraph.run(fp32, passes="discover").report["layers"]
               if e["action"] == "rewrite"]

    calib_feeds = minilm.encode(data.kjv_sentences(128, start=1), pad_to=64)  # disjoint from the evaluation
    calib = tmp / "calib.npz"
    np.savez(calib, **calib_feeds)
    models = [("fp32", fp32, 0.0)] + build_ort_rows(fp32, tmp, calib_feeds)
    for i, (label, lowering, kwargs, calibrated, *level) in enumerate(SETTINGS):
        path = tmp / f"lrq{i}.onnx"
        start = time.perf_counter()
        config = OptimizeConfig(lowering=lowering, factorize=FactorizeConfig(**kwargs),
                                calib=str(calib) if calibrated else None, accuracy_level=(level or [None])[0])
        result = lrqgraph.run(fp32, config, passes=f"discover,{'calibrate,' if calibrated else ''}factorize,"
                                                   f"lower({lowering}),cleanup")
        lrqgraph.save_model(result.model, path)
        models.append((label, path, time.perf_counter() - start))
        print(f"built {label} in {models[-1][2]:.0f} s", flush=True)

    paths = [path for _, path, _ in models]
    ms1 = interleaved_latency_ms(paths, b1, args.runs)
    ms8 = interleaved_latency_ms(paths, b8, max(5, args.runs // 2))
    rows, records = [], []
    for (label, path, seconds), t1, t8 in zip(models, ms1, ms8):
        cos = minilm.cosines(reference, minilm.embed(str(path), sentences))
        cross = minilm.cosines(reference_reviews, minilm.embed(str(path), reviews)) if reviews else None
        bpw = rewritten_bpw(path, fp32, weights)
        rows.append([label, f"{os.path.getsize(path) / 1e6:.1f}", f"{bpw:.3f}", f"{seconds:.0f}" if seconds else "",
                     f"{t1:.1f}", f"{t1 / ms1[0]:.2f}", f"{t8:.1f}", f"{t8 / ms8[0]:.2f}",
                     f"{cos.mean():.4f}", f"{cos.min():.4f}"]
                    + ([f"{cross.mean():.4f}", f"{cross.min():.4f}"] if reviews else []))
        records.append(dict(label=label, bpw=bpw, cos=float(cos.mean()),
                            cross=float(cross.mean()) if reviews else None))
    headers = (["model", "file MB", "bits/weight", "build s", "ms b1x128", "x fp32", "ms b8x128", "x fp32",
                "KJV cos mean", "KJV cos min"] + (["reviews cos mean", "reviews cos min"] if reviews else []))
    text = table(headers, rows)
    stamp = (f"{datetime.date.today()} · {platform.machine()} · {os.cpu_count()} cores · onnxruntime "
             f"{__import__('onnxruntime').__version__} · calibration 128 KJV verses · evaluation "
             f"{len(sentences)} other KJV verses" + (f" and {len(reviews)} movie-review sentences" if reviews else "")
             + f" · {len(weights)} MatMul weights")
    print(stamp)
    print(text)
    lines = summary(records)
    print("\n".join(lines))
    if args.out:
        md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        Path(args.out).write_text(stamp + "\n\n" + "\n".join(md) + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
