"""Models beyond memory: a Llama-shaped decoder with seeded random weights in external data,
compressed by ``lrqgraph optimize`` with its defaults (data-free 4-bit, verification included).

    python bench/scale.py --out scale.md                 # 2, 4 and 8 layers (8 layers = 7.5 GB)
    python bench/scale.py --layers 32 --executors auto   # the 27 GB model, where the disk allows
    python bench/scale.py --layers 8 --executors auto --ort  # beside onnxruntime's own quantizer

Per run: wall time, the factorize pass's time per parameter, the peak resident memory of the
whole process tree (workers included, sampled from /proc), the output's size, and the peak memory
of an onnxruntime session on the output (created, then run on 16 tokens). Random weights: a
structure and memory benchmark, never a quality one. Models are written once to ``--workdir``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import publish

from lrqgraph.testing.llama_shaped import LlamaShape, write_llama_shaped
from lrqgraph.testing.memory import run_measured

SESSION_PROBE = """
import sys, numpy as np, lrqgraph.runtime as rt
s = rt.session(sys.argv[1])
s.run(None, {"input_ids": np.arange(16, dtype=np.int64)[None] % 1000})
"""


def model_for(layers: int, workdir: Path) -> tuple[Path, LlamaShape]:
    shape = LlamaShape(layers=layers)
    path = workdir / f"llama-shaped-{layers}" / "model.onnx"
    if not (path.exists() and (path.parent / "model.onnx.data").stat().st_size >= shape.nbytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the {layers}-layer model ({shape.nbytes / 1e9:.2f} GB) to {path.parent}", flush=True)
        write_llama_shaped(path, shape)
    return path, shape


def optimize(model: Path, out: Path, executor: str, extra: list[str]) -> dict:
    report = out.with_suffix(".json")
    kind, _, workers = executor.partition(":")
    command = [sys.executable, "-m", "lrqgraph", "optimize", str(model), "-o", str(out), "--report", str(report),
               "--executor", kind, *(["--workers", workers] if workers else []), *extra]
    measured = run_measured(command)
    if measured.returncode != 0:
        print(measured.output[-4000:])
        raise SystemExit(f"optimize failed ({executor})")
    data = json.loads(report.read_text())
    passes = {p["pass"].split("(")[0]: p["seconds"] for p in data["passes"]}
    files = [out, out.parent / (out.name + ".data")]
    return {"wall": measured.seconds, "rss": measured.peak_rss, "passes": passes,
            "params": data["model"]["params_rewritten"],
            "out_bytes": sum(f.stat().st_size for f in files if f.exists()),
            "max_rel": data["verify"]["max_rel"], "executor": data["executor"]}


ORT_RTN = """
import sys
sys.path.insert(0, sys.argv[3])
from common import ort_weight_only
ort_weight_only(sys.argv[1], sys.argv[2], method="default", block=32, symmetric=True)
"""


def onnxruntime_rtn(model: Path, out: Path) -> dict:
    """onnxruntime's own weight-only quantizer (MatMulNBitsQuantizer, RTN 4-bit block 32): it
    loads the whole model."""
    measured = run_measured([sys.executable, "-c", ORT_RTN, str(model), str(out), str(Path(__file__).parent)])
    if measured.returncode != 0:
        print(measured.output[-4000:])
        return {"wall": measured.seconds, "rss": measured.peak_rss, "failed": True}
    files = [out, out.parent / (out.name + ".data")]
    return {"wall": measured.seconds, "rss": measured.peak_rss,
            "out_bytes": sum(f.stat().st_size for f in files if f.exists())}


def _median_run(tries: list[dict]) -> dict:
    """The run of median factorize time (its wall, passes and RSS as measured together), with the
    largest peak RSS of all tries."""
    ordered = sorted(tries, key=lambda t: t["passes"].get("factorize", 0))
    return {**ordered[len(ordered) // 2], "rss": max(t["rss"] for t in tries)}


def session_rss(path: Path) -> int:
    measured = run_measured([sys.executable, "-c", SESSION_PROBE, str(path)])
    if measured.returncode != 0:
        print(measured.output[-4000:])
        raise SystemExit(f"onnxruntime could not run {path}")
    return measured.peak_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="2,4,8", help="decoder layer counts (comma-separated)")
    parser.add_argument("--executors", default="local,process:2",
                        help="executors for the largest model (kind[:workers], comma-separated); the smaller "
                             "models run on the first")
    parser.add_argument("--lrq", action="store_true", help="also lower the largest model with --lowering lrq")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per row; the row shows the run of median factorize time (the machine is noisy)")
    parser.add_argument("--ort", action="store_true",
                        help="also run onnxruntime's MatMulNBitsQuantizer (RTN 4-bit b32) on the largest model")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lrqgraph-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--out")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    counts = [int(c) for c in args.layers.split(",")]
    executors = args.executors.split(",")
    runs = [(n, executors[0], []) for n in counts[:-1]] + [(counts[-1], e, []) for e in executors]
    if args.lrq:
        runs.append((counts[-1], executors[0], ["--lowering", "lrq"]))
    rows = []
    for layers, executor, extra in runs:
        model, shape = model_for(layers, workdir)
        out = model.parent / f"out-{executor.replace(':', '')}{'-lrq' if extra else ''}.onnx"
        print(f"optimize: {layers} layers, executor {executor} {' '.join(extra)}", flush=True)
        tries = [optimize(model, out, executor, extra) for _ in range(args.repeat)]
        got = _median_run(tries)
        session = session_rss(out)
        rows.append([f"{layers} layers{' (lrq lowering)' if extra else ''}", f"{shape.params / 1e9:.3f}",
                     f"{shape.nbytes / 1e9:.2f}", executor, f"{got['wall']:.0f}",
                     f"{got['passes'].get('factorize', 0):.1f}",
                     f"{got['passes'].get('factorize', 0) / got['params'] * 1e9:.1f}",
                     f"{got['passes'].get('verify', 0):.1f}", f"{got['rss'] / 1e9:.2f}",
                     f"{got['rss'] / shape.nbytes:.3f}", f"{got['out_bytes'] / 1e9:.2f}",
                     f"{got['out_bytes'] / shape.nbytes:.3f}", f"{session / 1e9:.2f}",
                     f"{session / got['out_bytes']:.2f}", f"{got['max_rel']:.3g}"])
        print(" | ".join(rows[-1]), flush=True)
        for f in (out, out.parent / (out.name + ".data"), out.with_suffix(".json")):
            f.unlink(missing_ok=True)
    if args.ort:
        model, shape = model_for(counts[-1], workdir)
        out = model.parent / "out-ort.onnx"
        print(f"onnxruntime RTN: {counts[-1]} layers", flush=True)
        got = onnxruntime_rtn(model, out)
        failed = got.get("failed")
        session = 0 if failed else session_rss(out)
        rows.append([f"{counts[-1]} layers, onnxruntime RTN 4-bit b32" + (" (failed)" if failed else ""),
                     f"{shape.params / 1e9:.3f}", f"{shape.nbytes / 1e9:.2f}", "its own", f"{got['wall']:.0f}",
                     "", "", "", f"{got['rss'] / 1e9:.2f}", f"{got['rss'] / shape.nbytes:.3f}",
                     "" if failed else f"{got['out_bytes'] / 1e9:.2f}",
                     "" if failed else f"{got['out_bytes'] / shape.nbytes:.3f}",
                     "" if failed else f"{session / 1e9:.2f}",
                     "" if failed else f"{session / got['out_bytes']:.2f}", ""])
        print(" | ".join(rows[-1]), flush=True)
        for f in (out, out.parent / (out.name + ".data")):
            f.unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    publish("Llama-shaped decoder, seeded random weights, `lrqgraph optimize` defaults",
            ["model", "params (B)", "GB", "executor", "wall s", "factorize s", "factorize ns/param", "verify s",
             "peak RSS GB", "RSS / model", "output GB", "output / model", "session RSS GB", "session / file",
             "verify max rel"], rows, args.out)


if __name__ == "__main__":
    main()
