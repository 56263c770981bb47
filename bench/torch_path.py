"""The torch way in against the ONNX way in, on real models at one budget.

    python bench/torch_path.py [--target-bpw 4] [--skip-minilm] [--skip-cnn] [--out torch.md]

For each model: the ONNX path (``lrqgraph.run`` on the model's cached ONNX export with --calib and
--target-bpw) and the torch path (``lrqgraph.torch.compress`` on the torch module with the same
calibration inputs and budget, then ``lrqgraph.torch.export`` with the ort lowering). Columns:
bits per weight of the file (every constant over the fp32 parameters), build seconds, quality
against fp32 on data of another domain than the calibration (EfficientNet-Lite0: top-1 agreement
on 96 crops of 12 photos the calibration never saw, calibrated on 80 crops of 5 others; MiniLM:
embedding cosine on 200 movie-review sentences, calibrated on 128 KJV verses), and the torch
module against its own export run in onnxruntime (max |difference| over max |output|), as exported
by default and with float activations (``accuracy_level=0``). Named torch_path.py: a bench/torch.py
would shadow torch itself, the bench folder being on sys.path.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lrqgraph  # noqa: E402
import lrqgraph.torch as lt  # noqa: E402
from lrqgraph import AllocateConfig, OptimizeConfig  # noqa: E402
from lrqgraph.runtime import session  # noqa: E402
from lrqgraph.testing import data, efficientnet, minilm  # noqa: E402

from common import file_bits_per_param, movie_review_sentences, publish  # noqa: E402

HEADER = ["model", "path", "bits/weight (file)", "build s", "quality vs fp32", "torch vs its export",
          "same, float activations"]


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output; feeds by name, or in order when the export named its inputs after
    the forward's arguments (EfficientNet's ``inputs`` for the ONNX file's ``image``)."""
    sess = session(str(path))
    names = [i.name for i in sess.get_inputs()]
    if not set(names) <= set(feeds):
        feeds = dict(zip(names, feeds.values()))
    return sess.run(None, {k: feeds[k] for k in names})[0]


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _both_paths(tmp: Path, name: str, module: torch.nn.Module, onnx_fp32: Path, example: tuple,
                calib_feeds: list[dict[str, np.ndarray]], eval_feeds: dict[str, np.ndarray], quality,
                target_bpw: float, dynamic_shapes=None) -> list[list[str]]:
    """Rows for the ONNX path and the torch path of one model."""
    rows = []
    calib_dir = tmp / f"{name}-calib"
    calib_dir.mkdir()
    for i, feed in enumerate(calib_feeds):
        np.savez(calib_dir / f"{i:04d}.npz", **feed)
    reference = _run(onnx_fp32, eval_feeds)

    t = time.perf_counter()
    cfg = OptimizeConfig(calib=str(calib_dir), allocate=AllocateConfig(target_bpw=target_bpw))
    onnx_out = tmp / f"{name}-onnx.onnx"
    lrqgraph.save_model(lrqgraph.run(onnx_fp32, cfg).model, onnx_out)
    seconds = time.perf_counter() - t
    rows.append([name, "ONNX: lrqgraph.run", f"{file_bits_per_param(onnx_out, onnx_fp32):.3f}", f"{seconds:.0f}",
                 quality(_run(onnx_out, eval_feeds), reference), "", ""])
    print(rows[-1], flush=True)

    order = list(calib_feeds[0])
    t = time.perf_counter()
    small = lt.compress(module, example, target_bpw=target_bpw, dynamic_shapes=dynamic_shapes,
                        calib=[tuple(torch.from_numpy(f[k]) for k in order) for f in calib_feeds])
    torch_out = lt.export(small, example, tmp / f"{name}-torch.onnx", dynamic_shapes=dynamic_shapes)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        mine = small(*(torch.from_numpy(eval_feeds[k]) for k in order)).numpy()
    # the ort lowering's default runs 8-bit codes with int8 activations (accuracy_level 4); level 0 keeps them float
    exact = lt.export(small, example, tmp / f"{name}-torch-float.onnx", dynamic_shapes=dynamic_shapes, accuracy_level=0)
    rows.append([name, "torch: compress + export", f"{file_bits_per_param(torch_out, onnx_fp32):.3f}",
                 f"{seconds:.0f}", quality(mine, reference), f"{_max_rel(_run(torch_out, eval_feeds), mine):.2e}",
                 f"{_max_rel(_run(exact, eval_feeds), mine):.2e}"])
    print(rows[-1], flush=True)
    return rows


def cnn_rows(tmp: Path, target_bpw: float) -> list[list[str]]:
    calib = efficientnet.photo_batch(16, seed=1)
    evaluation = efficientnet.photo_batch(8, seed=2, photos=efficientnet.OTHER_PHOTOS)

    def top1(got, want):
        return f"top-1 agree {float((got.argmax(1) == want.argmax(1)).mean()):.4f}"
    return _both_paths(tmp, "EfficientNet-Lite0", efficientnet.torch_module(), efficientnet.onnx_path(),
                       (torch.from_numpy(calib[:2]),), [{"image": calib[i:i + 8]} for i in range(0, len(calib), 8)],
                       {"image": evaluation}, top1, target_bpw)


def minilm_rows(tmp: Path, target_bpw: float) -> list[list[str]]:
    feeds = minilm.encode(data.kjv_sentences(128, start=1), pad_to=64)
    reviews = minilm.encode(movie_review_sentences(200))
    calib = [{k: v[i:i + 8] for k, v in feeds.items()} for i in range(0, 128, 8)]
    example = tuple(torch.from_numpy(calib[0][k][:2]) for k in minilm.INPUT_NAMES)

    def cosine(got, want):
        return f"cosine {float(minilm.cosines(want, got).mean()):.4f}"
    axes = tuple({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for _ in minilm.INPUT_NAMES)
    return _both_paths(tmp, "MiniLM-L6", minilm.torch_module(), minilm.onnx_path(), example,
                       [{k: f[k] for k in minilm.INPUT_NAMES} for f in calib], reviews, cosine, target_bpw, axes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-bpw", type=float, default=4.0)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cnn:
            rows += cnn_rows(Path(tmp), args.target_bpw)
        if not args.skip_minilm:
            rows += minilm_rows(Path(tmp), args.target_bpw)
    publish(f"--target-bpw {args.target_bpw} · torch {torch.__version__}", HEADER, rows, args.out)


if __name__ == "__main__":
    main()
