"""Per-layer allocation on MiniLM against onnxruntime's own quantizers, and a Llama-style decoder.

Every model is built in this run. lrqgraph gets H and its one-layer measurements from 128 verses
(--calib; 256 where the row says so, with --calib-samples 256); the table evaluates on 200 other
verses. Bits per weight count every stored byte of the
36 selected layers (layers the allocator keeps in float count at 32 bits). The `--lowering lrq`
rows run lrqgraph's native custom op, whose menu adds 3-bit codes (onnxruntime's MatMulNBits has
no 3-bit CPU kernel) and stores float16 scales without casting activations.

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
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from common import rewritten_bpw  # noqa: E402

import lrqgraph  # noqa: E402
from lrqgraph import FactorizeConfig, OptimizeConfig  # noqa: E402
from lrqgraph.config import AllocateConfig  # noqa: E402
from lrqgraph.report import table  # noqa: E402
from lrqgraph.testing import data, decoder, minilm  # noqa: E402

LRQ_RUNS = [  # (label, allocate goal, factorize options)
    ("lrqgraph --target-bpw 4 --scale-dtype float16", dict(target_bpw=4.0), dict(scale_dtype="float16")),
    ("lrqgraph --target-bpw 4 (float32 scales)", dict(target_bpw=4.0), {}),
    ("lrqgraph --target-bpw 3 --scale-dtype float16", dict(target_bpw=3.0), dict(scale_dtype="float16")),
    ("lrqgraph --min-cosine 0.99 --scale-dtype float16", dict(min_cosine=0.99), dict(scale_dtype="float16")),
    ("lrqgraph --target-bpw 3 --scale-dtype float16 --lowering lrq", dict(target_bpw=3.0),
     dict(scale_dtype="float16"), "lrq"),
    ("lrqgraph --target-bpw 4 --scale-dtype float16 --lowering lrq", dict(target_bpw=4.0),
     dict(scale_dtype="float16"), "lrq"),
    ("lrqgraph --target-bpw 3 --scale-dtype float16, 256 calibration verses", dict(target_bpw=3.0),
     dict(scale_dtype="float16"), "ort", 256),
    ("lrqgraph --target-bpw 3 --scale-dtype float16 --lowering lrq, 256 calibration verses", dict(target_bpw=3.0),
     dict(scale_dtype="float16"), "lrq", 256),
]


def ort_quantizer(fp32: Path, out: Path, block: int, symmetric: bool, bits: int = 4) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    quant = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=cfg)
    quant.process()
    quant.model.save_model_to_file(str(out), use_external_data_format=False)


def minilm_table(tmp: Path) -> str:
    fp32 = minilm.onnx_path()
    sentences = data.kjv_sentences(200, start=0)
    reference = minilm.embed(str(fp32), sentences)
    calib = {n: tmp / f"calib{n}.npz" for n in (128, 256)}  # verses disjoint from the evaluation ones
    for n, path in calib.items():
        np.savez(path, **minilm.encode(data.kjv_sentences(n, start=1), pad_to=64))
    weights = [e["weight"] for e in lrqgraph.run(fp32, passes="discover").report["layers"] if e["action"] == "rewrite"]
    rows = []

    def row(label, path, seconds, extra=("", "", "")):
        cos = minilm.cosines(reference, minilm.embed(str(path), sentences))
        rows.append([label, f"{rewritten_bpw(path, fp32, weights):.3f}", f"{cos.mean():.4f}", f"{cos.min():.4f}",
                     *extra, f"{seconds:.0f}"])

    for block, sym in ((32, True), (128, False)):
        path = tmp / f"ort{block}.onnx"
        start = time.perf_counter()
        ort_quantizer(fp32, path, block, sym)
        row(f"onnxruntime quantizer 4-bit b{block} {'sym' if sym else 'asym'}", path, time.perf_counter() - start)
    for i, (label, goal, fopts, *rest) in enumerate(LRQ_RUNS):
        lowering, samples = (rest + ["ort", 128][len(rest):])[:2]
        path = tmp / f"lrq{i}.onnx"
        start = time.perf_counter()
        config = OptimizeConfig(calib=str(calib[samples]), calib_samples=samples, allocate=AllocateConfig(**goal),
                                factorize=FactorizeConfig(**fopts), lowering=lowering)
        result = lrqgraph.run(fp32, config)
        lrqgraph.save_model(result.model, path)
        a = result.report["allocation"]
        row(label, path, time.perf_counter() - start,
            (f"{1 - a['measured']:.4f}", f"{a['spearman']:.3f}", a["repairs"]))
    return table(["MiniLM", "bits/weight", "cos mean", "cos min", "calib cos", "spearman", "repairs", "s"], rows)


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
    print(f"{datetime.date.today()} · {platform.machine()} · {os.cpu_count()} cores · onnxruntime "
          f"{__import__('onnxruntime').__version__} · calibration 128 verses, evaluation 200 other verses")
    print(minilm_table(tmp))
    if not args.skip_decoder:
        print()
        print(decoder_table(tmp))


if __name__ == "__main__":
    main()
