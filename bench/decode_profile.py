"""Where one decode step's time goes: onnxruntime's profiler over one-token forwards of genai folders.

For each folder (an onnxruntime-genai model: model.onnx + genai_config.json), one new token after
``--past`` cached ones (the KV buffers sized as onnxruntime-genai sizes them: at least the sliding
window), ``--steps`` profiled calls on 2 threads; the folders run one after another, so compare
them within one run. Prints the wall time per step, then the kernels' time per op type and per
role (node names with the layer number folded away: all 18 q/k/v projections are one row).

    pip install -e '.[decoder]' && python bench/decode_profile.py FOLDER [FOLDER ...] [--past 127] [--steps 40]
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent))
from lrqgraph.report import table  # noqa: E402
from lrqgraph.runtime.session import session, session_options  # noqa: E402


def decode_feeds(sess, config: dict, past: int) -> dict[str, np.ndarray]:
    decoder = config["model"]["decoder"]
    window = decoder.get("sliding_window", {}).get("window_size", 0)
    buffer = max(past, window)
    feeds = {}
    for arg in sess.get_inputs():
        if arg.name == "input_ids":
            feeds[arg.name] = np.array([[42]], np.int64)
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones((1, past + 1), np.int64)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.array([[past]], np.int64)
        elif arg.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in arg.type else np.float32
            feeds[arg.name] = np.zeros((1, decoder["num_key_value_heads"], buffer, decoder["head_size"]), dtype)
        else:
            raise SystemExit(f"{arg.name}: an input this script does not know how to feed")
    return feeds


def profile(folder: Path, past: int, steps: int) -> tuple[float, dict[str, float], dict[str, float], dict[str, int]]:
    """(wall ms per step, kernel ms per op type, kernel ms per role, nodes per op type)."""
    config = json.loads((folder / "genai_config.json").read_text())
    options = session_options(2)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    sess = session(str(folder / config["model"]["decoder"]["filename"]), options)
    feeds = decode_feeds(sess, config, past)
    for _ in range(5):
        sess.run(None, feeds)
    start = time.perf_counter()
    for _ in range(steps):
        sess.run(None, feeds)
    wall = (time.perf_counter() - start) / steps * 1e3
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = sum(1 for e in events if e.get("name") == "model_run")
    by_op: dict[str, float] = collections.defaultdict(float)
    by_role: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] += e["dur"] / runs / 1e3
        nodes[op] += 1
        by_role[re.sub(r"layers\.\d+", "layers.N", e["name"].removesuffix("_kernel_time"))] += e["dur"] / runs / 1e3
    return wall, by_op, by_role, {op: n // runs for op, n in nodes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--past", type=int, default=127)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--roles", type=int, default=12, help="rows of the per-role table")
    args = parser.parse_args()
    for folder in args.folders:
        wall, by_op, by_role, nodes = profile(folder, args.past, args.steps)
        total = sum(by_op.values())
        print(f"\n{folder}: {wall:.2f} ms per step (wall, profiling on), kernels {total:.2f} ms")
        print(table(["op type", "nodes", "ms", "share"],
                    [[op, nodes[op], f"{ms:.3f}", f"{ms / total:.1%}"]
                     for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:10]]))
        print(table(["role (all layers)", "ms", "share"],
                    [[role, f"{ms:.3f}", f"{ms / total:.1%}"]
                     for role, ms in sorted(by_role.items(), key=lambda kv: -kv[1])[:args.roles]]))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
