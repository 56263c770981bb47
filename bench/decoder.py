"""Gemma 3 270M (a real trained decoder, lrqgraph/testing/gemma.py): perplexity of the fp32 model,
onnxruntime's own 4-bit weight-only quantizers and lrqgraph's settings, all built in this run.

Perplexity is measured with onnxruntime on 128-token windows (BOS first) of KJV text disjoint from
the calibration windows and, when gensim is installed, of movie reviews (another domain). The
single-setting rows rewrite every MatMul with a constant weight except the lm_head, which reads the
tied embedding table (kept by those rows; onnxruntime's "Gather tables too" row quantizes the
table for the lookup and keeps the float table for the lm_head). The allocation rows
(``--target-bpw``, ``--target-size``) let the tied table and lm_head join as one layer, stored
once. Columns: bits per weight of the 126 matrices (every stored byte; the table not counted),
bits per parameter of the whole file (every constant byte over the 268M fp32 parameters), build
time (for the allocation rows: the whole allocation), perplexity and its ratio to fp32 per text.

    pip install -e '.[decoder]' && python bench/decoder.py [--windows 16] [--calib-windows 64] [--out decoder.md]
"""
from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import file_bits_per_param, matrix_bpw, movie_review_sentences, ort_weight_only, rewritten_bpw  # noqa: E402

import lrqgraph  # noqa: E402
from lrqgraph import AllocateConfig, FactorizeConfig, OptimizeConfig  # noqa: E402
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
       ("onnxruntime RTN 4-bit b32 sym, Gather tables too", dict(method="default", tables=True)),
       ("onnxruntime k_quant 4-bit b32", dict(method="k_quant"))]
PARAMS = 268_098_176
ALLOCATIONS = {  # --allocate names: (label, AllocateConfig goal)
    "bpw4": ("lrqgraph --target-bpw 4 --calib (table 8-bit)", dict(target_bpw=4.0)),
    "bpw3": ("lrqgraph --target-bpw 3 --calib (table 8-bit)", dict(target_bpw=3.0)),
    "bpw4-tables": ("lrqgraph --target-bpw 4 --tables-in-budget --calib", dict(target_bpw=4.0, tables_in_budget=True)),
    "size4.25": ("lrqgraph --target-size 142.4MB --calib (4.25 bits/param)", dict(target_size=int(4.25 * PARAMS / 8))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows per text")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--measure-windows", type=int, default=None,
                        help="calibration windows each one-layer measurement of an allocation runs "
                        "(default: lrqgraph's, the windows holding 512 tokens: 4)")
    parser.add_argument("--probe-layers", type=int, default=32, help="layers measured at their probe (the "
                        "others interpolated within their role)")
    parser.add_argument("--check-layers", type=int, default=6, help="layers also measured at a check candidate "
                        "and at one candidate of every other family")
    parser.add_argument("--allocate", default="bpw4,size4.25",
                        help=f"allocation rows, comma-separated from {', '.join(ALLOCATIONS)} ('' for none)")
    parser.add_argument("--skip-settings", action="store_true", help="only fp32, onnxruntime and allocation rows")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("lrqgraph.progress", "lrqgraph.passmanager", "lrqgraph.passes.allocate", "lrqgraph.passes.tolerance",
                 "lrqgraph.passes.verify", "lrqgraph.evaluate"):
        logging.getLogger(name).setLevel(logging.INFO)  # per-layer progress of the long allocation rows

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
            # with the tables quantized beside the float one, "everything else untouched" fails: no matrix figure
            bpw = float("nan") if options.get("tables") else rewritten_bpw(out, fp32, weights)
            rows.append((label, out, bpw, time.perf_counter() - start))
        for label, options, calibrated in ([] if args.skip_settings else SETTINGS):
            out, start = tmp / f"lrq-{len(rows)}.onnx", time.perf_counter()
            lowering = "lrq" if options.get("bits") == 3 else "ort"
            config = OptimizeConfig(factorize=FactorizeConfig(**options), lowering=lowering,
                                    calib=str(calib) if calibrated else None, calib_samples=args.calib_windows)
            result = lrqgraph.run(fp32, config)
            lrqgraph.save_model(result.model, out, external_data=True)
            rows.append((label, out, result.report["model"]["rewritten_bpw"], time.perf_counter() - start))
        for name in filter(None, args.allocate.split(",")):
            label, goal = ALLOCATIONS[name]
            out, start = tmp / f"lrq-{len(rows)}" / "model.onnx", time.perf_counter()
            out.parent.mkdir()
            config = OptimizeConfig(calib=str(calib), calib_samples=args.calib_windows,
                                    allocate=AllocateConfig(**goal, measure_samples=args.measure_windows,
                                                            probe_layers=args.probe_layers,
                                                            check_layers=args.check_layers))
            result = lrqgraph.run(fp32, config)
            lrqgraph.save_model(result.model, out, external_data=True)
            a = result.report["allocation"]
            chosen = ", ".join(f"{f} {v['layers']}" for f, v in a["families"].items())
            print(f"{label}: families {chosen}; measured {a['metric']} {a['measured']:.4g}", flush=True)
            rows.append((label, out, matrix_bpw(result.report, weights), time.perf_counter() - start))
        base: dict[str, float] = {}
        printed = []
        for label, path, bpw, seconds in rows:
            sess = session(str(path), session_options(threads=2))
            ppl = {name: gemma.perplexity(sess, ids) for name, ids in texts.items()}
            del sess
            base = base or ppl
            printed.append([label, "32.000" if bpw is None else f"{bpw:.3f}", f"{file_bits_per_param(path, fp32):.3f}",
                            f"{seconds:.0f}" if seconds else "",
                            *[v for name in texts for v in (f"{ppl[name]:.3f}", f"{ppl[name] / base[name]:.4f}")]])
            print(f"{label}: {ppl}", flush=True)
    headers = ["model", "bpw (126 matrices)", "bits/param (file)", "build s", *[c for name in texts for c in (f"{name} ppl", "x fp32")]]
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
