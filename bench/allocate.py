"""Per-layer allocation on MiniLM against onnxruntime's own quantizers, and a Llama-style decoder.

Every model is built in this run. lrqgraph gets H and its one-layer measurements from 128 verses
(--calib); onnxruntime's GPTQ rows get the same 128 verses. The table evaluates on 200 other
verses (the calibration domain) and on 200 movie-review sentences (another domain; the column is
left out when gensim is missing). onnxruntime rows: its MatMulNBitsQuantizer with the RTN, GPTQ,
HQQ and k-quant configs of bench/common.py's ORT_SETTINGS. "bpw (36 matrices)" counts every
stored byte of the 36 MatMul weights (kept ones at 32 bits); "bits/param (file)" every constant
byte of the file over the fp32 parameters, embedding tables included (rows without
--no-embeddings compress them too). Rows with --families allocate with that family alone; the
`--lowering lrq` row runs lrqgraph's native ops, whose menu adds 3-bit codes and codebooks.
"families chosen" counts the layers per family; "held-out calib cos" is the allocator's own
measurement. SUMMARY lines put each lrqgraph row beside the best onnxruntime row that stores at
most 0.15 more bits per parameter in the file, or, where it has none that small, the best of its
smallest rows.

    python bench/allocate.py [--skip-decoder]
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
from common import build_ort_rows, file_bits_per_param, matrix_bpw, movie_review_sentences, rewritten_bpw, summary  # noqa: E402

import lrqgraph  # noqa: E402
from lrqgraph import OptimizeConfig, SelectConfig  # noqa: E402
from lrqgraph.config import AllocateConfig  # noqa: E402
from lrqgraph.report import table  # noqa: E402
from lrqgraph.testing import data, decoder, minilm  # noqa: E402

LRQ_RUNS = [  # (label, allocate goal with families, lowering, select options)
    # below 3.006 bits per weight the tables cannot join (their cheapest grid: 4-bit GatherBlockQuantized)
    *[(f"lrqgraph --target-bpw {b} --no-embeddings", dict(target_bpw=b), "ort", dict(embeddings=False))
      for b in (2.5, 3.0, 4.0)],
    ("lrqgraph --target-bpw 4", dict(target_bpw=4.0), "ort", {}),
    *[(f"lrqgraph --target-bpw 3 --no-embeddings --families {f}", dict(target_bpw=3.0, families=(f,)), "ort",
       dict(embeddings=False)) for f in ("dense", "rotated", "qlr")],
    ("lrqgraph --target-bpw 3 --no-embeddings --lowering lrq", dict(target_bpw=3.0), "lrq", dict(embeddings=False)),
]


def minilm_table(tmp: Path, only: str | None = None) -> tuple[str, list[str]]:
    fp32 = minilm.onnx_path()
    sentences = data.kjv_sentences(200, start=0)
    reviews = movie_review_sentences(200)
    if reviews is None:
        print("gensim is not installed: no cross-domain column (pip install --no-deps gensim==4.4.0)")
    reference = minilm.embed(str(fp32), sentences)
    reference_reviews = minilm.embed(str(fp32), reviews) if reviews else None
    calib = tmp / "calib128.npz"  # verses disjoint from the evaluation ones
    np.savez(calib, **minilm.encode(data.kjv_sentences(128, start=1), pad_to=64))
    weights = [e["weight"] for e in lrqgraph.run(fp32, passes="discover").report["layers"] if e["action"] == "rewrite"]
    rows, records = [], []

    def row(label, path, seconds, bpw, extra=("", "", "")):
        cos = minilm.cosines(reference, minilm.embed(str(path), sentences))
        cross = minilm.cosines(reference_reviews, minilm.embed(str(path), reviews)) if reviews else None
        whole = file_bits_per_param(path, fp32)
        rows.append([label, f"{bpw:.3f}", f"{whole:.3f}", f"{cos.mean():.4f}", f"{cos.min():.4f}"]
                    + ([f"{cross.mean():.4f}", f"{cross.min():.4f}"] if reviews else []) + [*extra, f"{seconds:.0f}"])
        records.append(dict(label=label, bpw=whole, cos=float(cos.mean()),
                            cross=float(cross.mean()) if reviews else None))

    if only is None:
        for label, path, seconds in build_ort_rows(fp32, tmp, dict(np.load(calib))):
            try:
                row(label, path, seconds, rewritten_bpw(path, fp32, weights) if "Gather" not in label else float("nan"))
            except Exception as exc:  # onnxruntime's quantizer can write a model onnxruntime refuses
                why = "model refused by onnxruntime: " + str(exc).split(":")[-1].strip()[:60]
                rows.append([label, why] + [""] * (len(rows[0]) - 2 if rows else 9))
    for i, (label, goal, lowering, select) in enumerate(LRQ_RUNS):
        if only is not None and only not in label:
            continue
        path = tmp / f"lrq{i}.onnx"
        start = time.perf_counter()
        config = OptimizeConfig(calib=str(calib), allocate=AllocateConfig(**goal), lowering=lowering,
                                select=SelectConfig(**select))
        try:
            result = lrqgraph.run(fp32, config)
        except lrqgraph.LrqError as exc:  # e.g. a budget below the cheapest choice: the row says so
            rows.append([label, str(exc)[:80]] + [""] * (len(rows[0]) - 2 if rows else 9))
            continue
        seconds = time.perf_counter() - start
        lrqgraph.save_model(result.model, path)
        a = result.report["allocation"]
        chosen = ", ".join(f"{f} {v['layers']}" for f, v in a["families"].items() if v["layers"])
        row(label, path, seconds, matrix_bpw(result.report, weights), (f"{1 - a['measured']:.4f}", chosen,
                                                                      f"{a['spearman']:.2f}"))
        print(f"built {label} in {seconds:.0f} s", flush=True)
    headers = (["MiniLM", "bpw (36 matrices)", "bits/param (file)", "KJV cos mean", "KJV cos min"]
               + (["reviews cos mean", "reviews cos min"] if reviews else [])
               + ["held-out calib cos", "families chosen", "spearman", "s"])
    return table(headers, rows), summary(records)


def decoder_table(tmp: Path) -> str:
    path = decoder.onnx_path()
    calib = tmp / "tokens.npz"
    np.savez(calib, **decoder.token_batches())
    rows = []
    for goal in (dict(target_bpw=4.0), dict(target_bpw=3.0), dict(max_kl=0.01)):
        start = time.perf_counter()
        result = lrqgraph.run(path, OptimizeConfig(calib=str(calib), allocate=AllocateConfig(**goal)))
        out = tmp / "decoder" / "out.onnx"
        out.parent.mkdir(exist_ok=True)
        lrqgraph.save_model(result.model, out, external_data=True)
        a, v = result.report["allocation"], result.report["verify"]["outputs"]["logits"]
        rows.append([", ".join(f"{k} {g}" for k, g in goal.items()), result.report["model"]["layers_rewritten"],
                     f"{a['bpw']:.3f}", a["metric"], f"{a['measured']:.4g}", f"{v['cosine_mean']:.4f}",
                     f"{time.perf_counter() - start:.0f}"])
    return table(["decoder goal", "layers", "bits/weight", "metric", "measured", "logit cos", "s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-decoder", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lrqgraph-allocate-"))
    text, lines = minilm_table(tmp)
    print(f"{datetime.date.today()} · {platform.machine()} · {os.cpu_count()} cores · onnxruntime "
          f"{__import__('onnxruntime').__version__} · calibration 128 KJV verses, evaluation 200 other verses"
          + (" and 200 movie-review sentences" if movie_review_sentences(1) else ""))
    print(text)
    print("\n".join(lines))
    if not args.skip_decoder:
        print()
        print(decoder_table(tmp))


if __name__ == "__main__":
    main()
