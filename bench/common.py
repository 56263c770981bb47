"""Shared helpers for benchmarks: stored weight bytes, random factors, onnxruntime's own weight-only
quantizers (RTN, GPTQ, HQQ, k-quant) and a second text domain for cross-domain evaluation."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import time
from pathlib import Path

import numpy as np
import onnx

from lrqgraph.io import tensor_bytes
from lrqgraph.numerics import QuantizedTensor


def rewritten_bpw(model_path, fp32_path, weight_names: list[str]) -> float:
    """Bits per weight of the layers a tool rewrote, counting every byte they now store.

    Everything else in the model is untouched, so the layers' bytes are the model's initializer
    bytes minus those of the fp32 model without the rewritten weights.
    """
    fp32 = onnx.load(str(fp32_path))
    sizes = {t.name: int(np.prod(t.dims)) for t in fp32.graph.initializer}
    params = sum(sizes[n] for n in weight_names)
    untouched = tensor_bytes(fp32) - 4 * params
    return (tensor_bytes(onnx.load(str(model_path))) - untouched) * 8 / params


def matrix_bpw(report: dict, weights: list[str]) -> float:
    """Bits per weight of the given matrices as lrqgraph stored them (kept ones at 32 bits), from
    its report: with embedding tables compressed too, rewritten_bpw's "everything else untouched"
    no longer holds."""
    by_weight = {e["weight"]: e for e in report["layers"]}
    bits = sum(by_weight[w].get("stored_bytes", by_weight[w]["params"] * 4) * 8 for w in weights)
    return bits / sum(by_weight[w]["params"] for w in weights)


def file_bits_per_param(model_path, fp32_path) -> float:
    """Every constant byte of the model file (external data included) over the fp32 model's parameters."""
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    params = sum(int(np.prod(t.dims)) for t in fp32.graph.initializer)
    return tensor_bytes(onnx.load(str(model_path))) * 8 / params


def random_factor(k: int, n: int, bits: int, block: int, rng: np.random.Generator) -> QuantizedTensor:
    """A quantized [k, n] factor with random codes and float16 scales (for latency only)."""
    return QuantizedTensor(codes=rng.integers(0, 1 << bits, (k, n), dtype=np.uint8),
                           scales=(rng.random((-(-k // block), n)) * 0.01).astype(np.float16), zero_points=None,
                           bits=bits, block_size=block)


ORT_METHODS = ("default", "gptq", "hqq", "k_quant")

# onnxruntime's quantizer rows of the MiniLM tables: (label, ort_weight_only options); "calib" rows get
# the calibration batches. GPTQ's own default grid (block 128, asymmetric) is not among them: its
# zero-point packing fails on MiniLM's K = 384 (3 blocks, an odd count; see bench/RESULTS.md), and
# k-quant's at block 128 likewise. Blocks 32 and 64 match lrqgraph's rows byte for byte.
ORT_SETTINGS = [
    ("onnxruntime RTN 4-bit b32 sym (DefaultWeightOnlyQuantConfig)", dict(method="default")),
    ("onnxruntime RTN 4-bit b64 asym", dict(method="default", block=64, symmetric=False)),
    ("onnxruntime RTN 4-bit b128 asym (quantizer defaults)", dict(method="default", block=128, symmetric=False)),
    ("onnxruntime RTN 8-bit b32 sym", dict(method="default", bits=8)),
    ("onnxruntime RTN 4-bit b32 sym, Gather tables too", dict(method="default", tables=True)),
    ("onnxruntime GPTQ 4-bit b32 sym (GPTQWeightOnlyQuantConfig defaults)", dict(method="gptq", calib=True)),
    ("onnxruntime GPTQ 4-bit b32 sym, act-order", dict(method="gptq", calib=True, actorder=True)),
    ("onnxruntime GPTQ 4-bit b64 asym", dict(method="gptq", block=64, symmetric=False, calib=True)),
    ("onnxruntime GPTQ 4-bit b64 asym, act-order", dict(method="gptq", block=64, symmetric=False, calib=True,
                                                        actorder=True)),
    ("onnxruntime HQQ 4-bit b64 (float zero points)", dict(method="hqq", block=64)),
    ("onnxruntime HQQ 4-bit b128 (HQQWeightOnlyQuantConfig defaults)", dict(method="hqq", block=128)),
    ("onnxruntime k_quant 4-bit b32", dict(method="k_quant")),
    ("onnxruntime k_quant 4-bit b64", dict(method="k_quant", block=64)),
]


def ort_weight_only(fp32, out, method: str = "default", block: int = 32, symmetric: bool = True,
                    calib_feeds: list[dict] | None = None, actorder: bool = False, bits: int = 4,
                    tables: bool = False) -> None:
    """Quantize the MatMul weights of ``fp32`` with onnxruntime's ``MatMulNBitsQuantizer``.

    ``method``: ``default`` (its C++ round-to-nearest packer, ``DefaultWeightOnlyQuantConfig``),
    ``gptq`` (``GPTQWeightOnlyQuantConfig`` with its defaults: percdamp 0.01, lazy-update block 128,
    mse off, per-channel; ``actorder`` switches act-order on; calibration batches from
    ``calib_feeds``), ``hqq`` (``HQQWeightOnlyQuantConfig``: float zero points, always asymmetric)
    or ``k_quant`` (``KQuantWeightOnlyQuantConfig``: always stores zero points). ``block`` and
    ``symmetric`` are the quantizer's group size and scheme (for GPTQ and k-quant they are the
    quantizer's own ``block_size`` / ``is_symmetric``, which its config classes do not carry;
    HQQ takes the block from its config and ignores ``symmetric``). ``tables``: the RTN config also
    quantizes Gather tables (its GatherBlockQuantized path; the other configs have none).
    """
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  GPTQWeightOnlyQuantConfig,
                                                                  HQQWeightOnlyQuantConfig,
                                                                  KQuantWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)

    class Reader(CalibrationDataReader):  # deep-copied by the quantizer before it iterates
        def __init__(self, feeds):
            self.feeds, self.i = list(feeds), 0

        def get_next(self):
            self.i += 1
            return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    if method == "default":
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits,
                                           op_types_to_quantize=("MatMul", "Gather") if tables else None)
    elif method == "gptq":
        if not calib_feeds:
            raise ValueError("onnxruntime's GPTQ needs calibration batches")
        cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(calib_feeds), actorder=actorder)
    elif method == "hqq":
        cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    elif method == "k_quant":
        cfg = KQuantWeightOnlyQuantConfig()
    else:
        raise ValueError(f"method must be one of {ORT_METHODS}, got {method!r}")
    if method in ("gptq", "k_quant") and bits != 4:
        raise ValueError(f"onnxruntime's {method} path here writes MatMulNBits only at 4 bits")
    # the quantizer module sets the root logger to INFO on import, and GPTQ draws a progress bar
    logging.getLogger().setLevel(logging.WARNING)
    quant = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=bits, block_size=block, is_symmetric=symmetric,
                                 algo_config=cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        quant.process()
    quant.model.save_model_to_file(str(out), use_external_data_format=False)


def build_ort_rows(fp32, tmp: Path, calib_feeds: dict[str, np.ndarray], settings=None):
    """Build every row of ``settings`` (default ORT_SETTINGS): [(label, path, seconds)]."""
    import time
    rows = []
    for i, (label, opts) in enumerate(settings or ORT_SETTINGS):
        opts = dict(opts)
        path = tmp / f"ort{i}.onnx"
        start = time.perf_counter()
        ort_weight_only(fp32, path, calib_feeds=batches(calib_feeds, 16) if opts.pop("calib", False) else None,
                        **opts)
        rows.append((label, path, time.perf_counter() - start))
        print(f"built {label} in {rows[-1][2]:.0f} s", flush=True)
    return rows


def summary(records: list[dict], slack: float = 0.15) -> list[str]:
    """SUMMARY lines: each lrqgraph record beside the best onnxruntime record (by in-domain cosine
    mean) among those storing at most ``slack`` more bits per weight; when onnxruntime has none
    that small, beside the best of its smallest rows (within 0.25 of its smallest). Records:
    dicts with label, bpw, cos and cross (the cross-domain cosine mean, or None)."""
    def text(r):
        cross = f", reviews {r['cross']:.4f}" if r.get("cross") is not None else ""
        return f"{r['label']} ({r['bpw']:.3f} bpw) cos {r['cos']:.4f}{cross}"

    ort = [r for r in records if r["label"].startswith("onnxruntime")]
    out = []
    for r in records:
        if not r["label"].startswith("lrqgraph") or not ort:
            continue
        rivals = [o for o in ort if o["bpw"] <= r["bpw"] + slack]
        if rivals:
            head = f"best onnxruntime at <= {r['bpw'] + slack:.3f} bpw"
        else:
            low = min(o["bpw"] for o in ort)
            rivals = [o for o in ort if o["bpw"] <= low + 0.25]
            head = f"no onnxruntime row at <= {r['bpw'] + slack:.3f} bpw; best of its smallest"
        best = max(rivals, key=lambda o: o["cos"])
        out.append(f"SUMMARY {text(r)} | {head}: {text(best)}")
    return out


def batches(feeds: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """Split a dict of equally long arrays into feeds of ``size`` rows."""
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n, size)]


def movie_review_sentences(count: int = 200) -> list[str] | None:
    """``count`` movie-review sentences (Pang & Lee polarity data shipped in the ``gensim`` wheel,
    read directly from its file, labels stripped): a second text domain beside the KJV verses.
    None when gensim is not installed (``pip install --no-deps gensim==4.4.0`` is enough: only its
    data file is read)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / "pang_lee_polarity.cor"
    lines = [line.split(" ", 1)[1].strip() for line in path.read_text(encoding="latin1").splitlines() if " " in line]
    return lines[:count]


def lossless_rows(fp32, tmp: Path, configs) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the lossless goal over seeds: ``configs`` yields (seed, OptimizeConfig
    with --labels, the model for that seed or None for ``fp32``); the last row is the mean ± std
    of the file's size and of the validation half's changes (accuracy, log-loss)."""
    import lrqgraph
    rows, kept = [], []
    for seed, config, model in configs:
        start = time.perf_counter()
        result = lrqgraph.run(model if model is not None else fp32, config)
        out = tmp / f"lossless{seed}.onnx"
        lrqgraph.save_model(result.model, out)
        got = result.report["allocation"]["labelled"]
        s, v = got["search"], got["validation"]
        kept.append((file_bits_per_param(out, fp32), out.stat().st_size / 1e6,
                     v["accuracy"] - v["original"]["accuracy"], v["log_loss"] - v["original"]["log_loss"]))
        rows.append([str(seed), f"{kept[-1][0]:.3f}", f"{kept[-1][1]:.2f}", f"{s['original']['accuracy']:.4f}",
                     f"{s['accuracy']:.4f}", f"{v['original']['accuracy']:.4f}", f"{v['accuracy']:.4f}",
                     f"{v['original']['log_loss']:.4f}", f"{v['log_loss']:.4f}", f"{time.perf_counter() - start:.0f}"])
        print(rows[-1], flush=True)
    bits, mb, delta, loss = (np.array(col) for col in zip(*kept))
    rows.append(["mean ± std", f"{bits.mean():.3f} ± {bits.std():.3f}", f"{mb.mean():.2f} ± {mb.std():.2f}", "", "",
                 "", f"Δ {delta.mean():+.4f} ± {delta.std():.4f}", "", f"Δ {loss.mean():+.4f} ± {loss.std():.4f}", ""])
    headers = ["seed", "bits/weight (file)", "MB", "search: fp32", "search: lrq", "validation: fp32",
               "validation: lrq", "val. log-loss: fp32", "val. log-loss: lrq", "build s"]
    return headers, rows


def publish(title: str, headers: list[str], rows: list[list[str]], out: str | None) -> None:
    """Print "date · machine · title" and the table; also write them to ``out`` when given."""
    import datetime
    import platform

    from lrqgraph.report import table
    text = f"{datetime.date.today()} · {platform.machine()} · {title}\n" + table(headers, rows)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
