"""Gemma 3 270M as LLM users deploy it: onnxruntime-genai folders from onnxruntime-genai's own
model builder (fp32 and int4) beside lrqgraph's folders made from the builder's fp32 folder, all
measured through onnxruntime-genai in this run.

Rows ``llama-*`` are llama.cpp's quantizations of the same weights (bench/llamacpp.py), run
through llama-cpp-python: their MB is the GGUF file (weights, tokenizer and config in one).

Columns: folder MB (every file: model, data, tokenizer, config; the custom-op library where the
folder needs one), perplexity on 128-token windows (BOS first) of movie reviews (another domain
than the calibration text) and of KJV verses disjoint from the calibration verses, teacher-forced
through onnxruntime-genai (``append_tokens(window)`` then ``get_output("logits")``), each as a
ratio to fp32; prefill tokens/s (one 128-token prompt) and decode tokens/s (64 new tokens after a
32-token prompt), medians over interleaved rounds, as ratios to the builder's int4 in the same run;
the peak resident memory of a process that loads the folder and runs a prompt, over the bytes of
the model and its data; build time. lrqgraph calibrates on 128 KJV verses (the ``--calib`` rows).

    pip install -e '.[decoder]' && python bench/genai.py [--quick] [--rows defaults|allocations|latency|low-bits|lrq-bpw4,...]
        [--cold] [--out genai.md]      (the low-bits group also needs: pip install llama-cpp-python)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import movie_review_sentences, publish  # noqa: E402
import llamacpp  # noqa: E402

# bench/kernels.py would pass for the 'kernels' package transformers looks for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

from lrqgraph.atomic import atomic_folder  # noqa: E402
from lrqgraph.cache import fixture_dir  # noqa: E402
from lrqgraph.testing import data, gemma, genai_decoder  # noqa: E402
from lrqgraph.testing.memory import run_measured  # noqa: E402

BUILDER_ROWS = {  # name: (label, builder precision, extra options)
    "builder-int4": ("builder -p int4 (default: RTN b32, int8 activations, lm_head quantized)", "int4", []),
    "builder-int4-kqm": ("builder -p int4 algo_config=k_quant_mixed", "int4", ["algo_config=k_quant_mixed"]),
}
LRQ_ROWS = {  # name: (label, lrqgraph options; CALIB is the calibration text, INT4_BYTES the builder int4's bytes)
    "lrq-default": ("lrqgraph optimize <folder> (defaults: data-free, min/max scales, int8 activations)", []),
    "lrq-float": ("lrqgraph --accuracy-level 0 (float activations)", ["--accuracy-level", "0"]),
    "lrq-clip": ("lrqgraph --clip-search (per-block MSE clipping)", ["--clip-search"]),
    "lrq-calib": ("lrqgraph --calib (GPTQ 4-bit b32)", ["--calib", "CALIB"]),
    "lrq-bpw4": ("lrqgraph --target-bpw 4 --calib", ["--target-bpw", "4", "--calib", "CALIB"]),
    "lrq-bpw4-lrq": ("lrqgraph --target-bpw 4 --lowering lrq --calib",
                     ["--target-bpw", "4", "--lowering", "lrq", "--calib", "CALIB"]),
    "lrq-size": ("lrqgraph --target-size <builder int4 model bytes> --calib", ["--target-size", "INT4_BYTES", "--calib", "CALIB"]),
    "lrq-bpw3-lrq": ("lrqgraph --target-bpw 3 --lowering lrq --calib",
                     ["--target-bpw", "3", "--lowering", "lrq", "--calib", "CALIB"]),
}
QUICK = ["builder-int4", "lrq-default", "lrq-calib"]
# each under 30 minutes here (the default is the first)
GROUPS = {"defaults": ["builder-int4", "builder-int4-kqm", "lrq-default", "lrq-float", "lrq-clip", "lrq-calib"],
          "allocations": ["builder-int4", "lrq-bpw4", "lrq-size"],
          "latency": ["builder-int4", "lrq-bpw4", "lrq-bpw4-lrq"],
          "low-bits": ["builder-int4", "lrq-bpw3-lrq", *llamacpp.KINDS]}
# The builder (0.18) reads a flat rope_parameters and rope_local_base_freq, while transformers 5
# gives Gemma 3 one rope_parameters entry per attention type: the builder runs with its config
# flattened back (global theta for full attention, local theta for the sliding layers).
BUILDER = """
import runpy, sys, transformers
load = transformers.AutoConfig.from_pretrained
def flat(*args, **kwargs):
    config = load(*args, **kwargs)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
    return config
transformers.AutoConfig.from_pretrained = flat
sys.argv[0] = "builder"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""
PACKAGES = ("onnxruntime-genai", "onnxruntime", "torch", "transformers", "onnx", "onnx-ir")


def builder_folder(precision: str, extra: list[str]) -> tuple[Path, float]:
    """The builder's folder for the model (cached), and the seconds it took to build (0 if cached)."""
    versions = [metadata.version(p) for p in PACKAGES]
    key = hashlib.sha256(f"{versions}|{precision}|{extra}".encode()).hexdigest()[:12]
    target = fixture_dir() / f"gemma3-270m-genai-{precision}-{key}"
    if (target / "genai_config.json").exists():
        return target, 0.0
    hf = gemma.hf_folder()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".genai-", dir=fixture_dir()) as work, atomic_folder(target) as out:
        command = [sys.executable, "-c", BUILDER, "-i", str(hf), "-o", str(out),
                   "-p", precision, "-e", "cpu", "-c", str(Path(work) / "cache")]
        if extra:
            command += ["--extra_options", *extra]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"builder failed: {done.stderr[-3000:]}")
    return target, time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_bytes(folder: Path) -> int:
    """The model file and its data (what ``--target-size`` counts)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


# A child process: the folder loaded by onnxruntime-genai and a 32-token prompt run once.
SESSION = """
import sys, numpy as np, onnxruntime_genai as og
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
params.set_search_options(max_length=int(sys.argv[2]), do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(np.arange(2, 34, dtype=np.int32))
generator.generate_next_token()
"""


def session_rss(folder: Path, floor: int) -> float:
    """Peak resident bytes of a process running the folder through onnxruntime-genai, over the
    bytes of its model and data files."""
    measured = run_measured([sys.executable, "-c", SESSION, str(folder), str(max(floor, 64))])
    if measured.returncode != 0:
        raise RuntimeError(f"{folder}: {measured.output[-2000:]}")
    return measured.peak_rss / model_bytes(folder)


def gguf_rss(path: Path) -> float:
    """Peak resident bytes of a process running the GGUF through llama.cpp, over its file's bytes."""
    measured = run_measured([sys.executable, "-c", llamacpp.SESSION, str(path)])
    if measured.returncode != 0:
        raise RuntimeError(f"{path}: {measured.output[-2000:]}")
    return measured.peak_rss / path.stat().st_size


def perplexity(model, windows: np.ndarray, floor: int) -> float:
    """exp(mean next-token NLL) over the windows, teacher-forced through onnxruntime-genai
    (``floor``: the smallest max_length the folder takes, genai_decoder.cache_floor)."""
    import onnxruntime_genai as og
    nll, count = 0.0, 0
    for window in windows:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max(len(window) + 1, floor), do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(window.astype(np.int32))
        logits = np.asarray(generator.get_output("logits"), np.float64).reshape(len(window), -1)[:-1]
        top = logits.max(axis=-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
        nll -= np.take_along_axis(logp, window[1:, None], axis=-1).sum()
        count += len(window) - 1
    return float(np.exp(nll / count))


def speed(model, prompt: np.ndarray, prefill: np.ndarray, new_tokens: int, floor: int) -> tuple[float, float]:
    """(prefill tokens/s of ``prefill``, decode tokens/s of ``new_tokens`` after ``prompt``)."""
    import onnxruntime_genai as og
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(len(prefill) + 1, floor), do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prefill.astype(np.int32))
    prefill_rate = len(prefill) / (time.perf_counter() - start)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(len(prompt) + new_tokens, floor), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    start = time.perf_counter()
    for _ in range(new_tokens):
        generator.generate_next_token()
    return prefill_rate, new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} beside fp32, 4 windows")
    parser.add_argument("--rows", help=f"comma-separated row names or groups {', '.join(GROUPS)} (default: defaults)")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows per text")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    parser.add_argument("--keep", help="keep lrqgraph's folders under this folder")
    parser.add_argument("--cold", action="store_true",
                        help="each lrqgraph build starts from an empty cache (LRQGRAPH_CACHE), as on a fresh machine: "
                             "its build time then includes the calibration statistics")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    import onnxruntime_genai as og

    asked = args.rows.split(",") if args.rows else QUICK if args.quick else ["defaults"]
    names = list(dict.fromkeys(n for a in asked for n in GROUPS.get(a, [a])))
    unknown = [n for n in names if n not in BUILDER_ROWS and n not in LRQ_ROWS and n not in llamacpp.KINDS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {[*BUILDER_ROWS, *LRQ_ROWS, *llamacpp.KINDS]}")
    if any(n in llamacpp.KINDS for n in names) and not llamacpp.available():
        parser.error("the llama.cpp rows need `pip install llama-cpp-python gguf`")
    windows = 4 if args.quick else args.windows
    fp32, fp32_build = builder_folder("fp32", [])
    print(f"fp32 folder {fp32} ({fp32_build:.0f} s)", flush=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="genai-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "kjv-calib.txt"
    calib.write_text("\n".join(data.kjv_sentences(128, start=1)) + "\n", encoding="utf-8")
    texts = {"reviews": movie_review_sentences(2000), "KJV": data.kjv_sentences(300, start=0)}
    evaluation = {name: gemma.windows(lines, windows) for name, lines in texts.items() if lines}

    folders = {"fp32": (f"builder -p fp32", fp32, fp32_build)}
    int4 = None
    wanted = [n for n in names if n in BUILDER_ROWS] + (["builder-int4"] if "lrq-size" in names else [])
    for name in dict.fromkeys(wanted):
        label, precision, extra = BUILDER_ROWS[name]
        folder, seconds = builder_folder(precision, extra)
        folders[name] = (label, folder, seconds)
        int4 = folder if name == "builder-int4" else int4
        print(f"{name}: {folder} ({seconds:.0f} s)", flush=True)
    for name in [n for n in names if n in LRQ_ROWS]:
        label, options = LRQ_ROWS[name]
        options = [str(calib) if o == "CALIB" else str(model_bytes(int4)) if o == "INT4_BYTES" else o
                   for o in options]
        out = work / name
        start = time.perf_counter()
        print(f"{name}: lrqgraph optimize {' '.join(options)}", flush=True)
        # lrqgraph's progress log goes to this script's stderr as it runs
        env = {**os.environ, "LRQGRAPH_CACHE": str(work / f"{name}-cache")} if args.cold else None
        done = subprocess.run([sys.executable, "-m", "lrqgraph", "optimize", str(fp32), "-o", str(out), *options],
                              stdout=subprocess.DEVNULL, env=env)
        if done.returncode != 0:
            print(f"{name}: lrqgraph failed (exit {done.returncode}); see its log above", flush=True)
            continue
        folders[name] = (label + (" (cold)" if args.cold else ""), out, time.perf_counter() - start)
        shutil.rmtree(work / f"{name}-cache", ignore_errors=True)
        print(f"{name}: built in {folders[name][2]:.0f} s", flush=True)

    ggufs = {}
    for name in [n for n in names if n in llamacpp.KINDS]:
        path, seconds = llamacpp.quantized(name)
        ggufs[name] = (llamacpp.KINDS[name][0], path, seconds)
        print(f"{name}: {path} ({seconds:.0f} s)", flush=True)

    floor = genai_decoder.cache_floor(fp32)
    rss = {name: session_rss(folder, floor) for name, (_, folder, _) in folders.items()}  # before ours load
    rss.update({name: gguf_rss(path) for name, (_, path, _) in ggufs.items()})
    models = {name: og.Model(str(folder)) for name, (_, folder, _) in folders.items()}
    ppl = {name: {text: perplexity(model, ids, floor) for text, ids in evaluation.items()}
           for name, model in models.items()}
    context = max(floor, max(len(w) for ids in evaluation.values() for w in ids) + 1)
    models.update({name: llamacpp.load(path, context) for name, (_, path, _) in ggufs.items()})
    ppl.update({name: {text: llamacpp.perplexity(models[name], ids) for text, ids in evaluation.items()}
                for name in ggufs})
    rng = np.random.default_rng(0)
    prompt, prefill = evaluation["KJV"][0][:32], evaluation["KJV"][1][:128]
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in rng.permutation(list(models)):
            rates[name].append(llamacpp.speed(models[name], prompt, prefill, 64) if name in ggufs else
                               speed(models[name], prompt, prefill, 64, floor))
    median = {name: (statistics.median(r[0] for r in got), statistics.median(r[1] for r in got))
              for name, got in rates.items()}
    base = median.get("builder-int4", median["fp32"])
    rows = []
    for name, (label, folder, seconds) in {**folders, **ggufs}.items():
        size = folder.stat().st_size if name in ggufs else folder_bytes(folder)
        cells = [label, f"{size / 1e6:.1f}"]
        for text in evaluation:
            cells += [f"{ppl[name][text]:.3f}", f"{ppl[name][text] / ppl['fp32'][text]:.4f}x"]
        pre, dec = median[name]
        cells += [f"{pre:.0f}", f"{pre / base[0]:.2f}x", f"{dec:.1f}", f"{dec / base[1]:.2f}x",
                  f"{rss[name]:.2f}", f"{seconds:.0f}" if seconds else "cached"]
        rows.append(cells)
        print(cells, flush=True)
    headers = ["folder", "MB"]
    for text in evaluation:
        headers += [f"ppl {text}", "x fp32"]
    against = "builder int4" if "builder-int4" in median else "fp32"
    headers += ["prefill tok/s", f"x {against}", "decode tok/s", f"x {against}", "session RSS / model", "build s"]
    publish(f"Gemma 3 270M through onnxruntime-genai {metadata.version('onnxruntime-genai')}, "
            f"{windows} windows of 128 tokens per text, {args.rounds} speed rounds", headers, rows, args.out)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
