"""Gemma 3 270M (a real trained decoder, lrqgraph/testing/gemma.py): perplexity of the fp32 model,
onnxruntime's own 4-bit weight-only quantizers and lrqgraph's settings, all built in this run.

Perplexity is measured with onnxruntime on 128-token windows (BOS first) of KJV text disjoint from
the calibration windows and, when gensim is installed, of movie reviews (another domain). Every
MatMul with a constant weight is rewritten except the lm_head, which reads the tied embedding
table (kept by every quantizer here). Columns: bits per weight of the rewritten layers (every
stored byte), perplexity and its ratio to fp32 on each text.

    pip install -e '.[decoder]' && python bench/decoder.py [--windows 16] [--calib-windows 32] [--out decoder.md]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import movie_review_sentences, ort_weight_only, rewritten_bpw  # noqa: E402

import lrqgraph  # noqa: E402
from lrqgraph import FactorizeConfig, OptimizeConfig  # noqa: E402
from lrqgraph.report import table  # noqa: E402
from lrqgraph.runtime import session, session_options  # noqa: E402
from lrqgraph.testing import data, gemma  # noqa: E402

SETTINGS = [  # (label, factorize options, calibrated)
    ("lrqgraph default, data-free: rtn 4-bit b32 sym, MSE clip", {}, False),
    ("lrqgraph data-free, --no-clip-search: rtn 4-bit b32 sym", dict(clip_search=False), False),
    ("lrqgraph default + --calib: gptq 4-bit b32 sym", {}, True),
    ("lrqgraph --calib: gptq 3-bit b32 (lrq lowering)", dict(bits=3), True),
]
ORT = [("onnxruntime RTN 4-bit b32 sym (DefaultWeightOnlyQuantConfig)", dict(method="default")),
       ("onnxruntime k_quant 4-bit b32", dict(method="k_quant"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows per text")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()

    fp32 = gemma.onnx_path()
    weights = [e["weight"] for e in lrqgraph.run(fp32, passes="discover").report["layers"] if e["action"] == "rewrite"]
    verses = data.kjv_sentences(3000, start=0, stride=10)       # evaluation: verses 0, 10, 20, ...
    calib_verses = data.kjv_sentences(3000, start=5, stride=10)  # calibration: verses 5, 15, ... (disjoint)
    texts = {"KJV": gemma.windows(verses, args.windows)}
    reviews = movie_review_sentences(4000)
    if reviews:
        texts["reviews"] = gemma.windows(reviews, args.windows)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib.npz"
        np.savez(calib, input_ids=gemma.windows(calib_verses, args.calib_windows))
        rows = [("fp32", fp32, None, 0.0)]
        for label, options in ORT:
            out, start = tmp / f"ort-{len(rows)}.onnx", time.perf_counter()
            ort_weight_only(fp32, out, **options)
            rows.append((label, out, rewritten_bpw(out, fp32, weights), time.perf_counter() - start))
        for label, options, calibrated in SETTINGS:
            out, start = tmp / f"lrq-{len(rows)}.onnx", time.perf_counter()
            lowering = "lrq" if options.get("bits") == 3 else "ort"
            config = OptimizeConfig(factorize=FactorizeConfig(**options), lowering=lowering,
                                    calib=str(calib) if calibrated else None, calib_samples=args.calib_windows)
            result = lrqgraph.run(fp32, config)
            lrqgraph.save_model(result.model, out, external_data=True)
            rows.append((label, out, result.report["model"]["rewritten_bpw"], time.perf_counter() - start))
        base: dict[str, float] = {}
        printed = []
        for label, path, bpw, seconds in rows:
            sess = session(str(path), session_options(threads=2))
            ppl = {name: gemma.perplexity(sess, ids) for name, ids in texts.items()}
            del sess
            base = base or ppl
            printed.append([label, "32.000" if bpw is None else f"{bpw:.3f}", f"{seconds:.0f}" if seconds else "",
                            *[v for name in texts for v in (f"{ppl[name]:.3f}", f"{ppl[name] / base[name]:.4f}")]])
            print(f"{label}: {ppl}", flush=True)
    headers = ["model", "bits/weight", "build s", *[c for name in texts for c in (f"{name} ppl", "x fp32")]]
    head = (f"{datetime.date.today()} · {platform.machine()} · Gemma 3 270M · {args.windows} windows of 128 tokens "
            f"per text · calibration {args.calib_windows} other KJV windows")
    print(head)
    print(table(headers, printed))
    if args.out:
        md = [head, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(r) + " |" for r in printed]
        Path(args.out).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
