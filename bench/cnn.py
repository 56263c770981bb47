"""EfficientNet-Lite0 on real photos: lrqgraph's Conv rewrites against onnxruntime's static int8 QDQ.

    python bench/cnn.py [--calib-crops 16] [--eval-crops 8] [--runs 30] [--lossless-seeds 5] [--out cnn.md]

Calibration: random 224 crops of scikit-image's five colour photos (astronaut, chelsea, coffee,
rocket, cat). Evaluation: crops of twelve other photos (scikit-learn's china and flower,
scikit-image's motorcycle, Hubble field, immunohistochemistry, retina, colour wheel, camera,
coins, brick, grass, gravel): top-1 agreement with fp32 and KL of the class softmax against fp32.
Rows: fp32; onnxruntime's static QDQ (int8 weights per channel, uint8 activations, its own
calibration on the same crops); lrqgraph data-free (the default), with --calib, and allocated at
--target-bpw 4 and 3. "bits/weight" counts every constant of the file (Conv, depthwise, classifier,
biases) over the fp32 parameters. Latency: median of interleaved runs (models take turns), at batch 1
and 8, as ratios to fp32.

Second table, the lossless goal (--labels): a labelled task from real photos, each crop labelled
with the class fp32 gives its photo's centre crop (so the original itself misses crops that show
something else); 16 other random crops of each of the twelve other photos, split by each seed into
the search half and the validation half; lrqgraph --labels with --calib on the five calibration
photos. Columns: file bits per weight and MB, top-1 accuracy of the original and of the result on
both halves; then the mean and spread over the seeds.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lrqgraph  # noqa: E402
from lrqgraph import AllocateConfig, OptimizeConfig  # noqa: E402
from lrqgraph.report import table  # noqa: E402
from lrqgraph.runtime import interleaved_latency_ms, session, session_options  # noqa: E402
from lrqgraph.testing import efficientnet  # noqa: E402

from common import file_bits_per_param, lossless_rows  # noqa: E402

SETTINGS = [  # (label, OptimizeConfig fields, calibrated)
    ("lrqgraph default, data-free (rtn 4-bit b32)", {}, False),
    ("lrqgraph --calib (gptq 4-bit b32)", {}, True),
    ("lrqgraph --target-bpw 4 --calib", {"allocate": AllocateConfig(target_bpw=4.0)}, True),
    # below 4 bits a convolution needs two factors (its one-grid menu holds 4 and 8 bits), whose
    # extra convolution the latency budget drops
    ("lrqgraph --target-bpw 3 --calib --latency-budget off",
     {"allocate": AllocateConfig(target_bpw=3.0, latency_budget=False)}, True),
]


def ort_static_qdq(fp32: Path, out: Path, photos: np.ndarray) -> None:
    """onnxruntime's own static quantization: QDQ, int8 weights per channel, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"image": photos[i:i + 1]} for i in range(len(photos))])

        def get_next(self):
            return next(self.feeds, None)

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def labelled_photos(crops: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the other photos, each labelled with fp32's top-1 on its photo's centre crop."""
    sess = session(str(efficientnet.onnx_path()), session_options(threads=2))
    images, labels = [], []
    for photo in efficientnet.OTHER_PHOTOS:
        centre = efficientnet.photo_batch(1, photos=(photo,))
        label = int(sess.run(None, {"image": centre})[0].argmax())
        batch = efficientnet.photo_batch(crops + 1, seed=seed, photos=(photo,))[1:]  # random crops only
        images.append(batch)
        labels += [label] * len(batch)
    return np.concatenate(images), np.array(labels)


def lossless_table(tmp: Path, calib: np.ndarray, seeds: int) -> str:
    fp32 = efficientnet.onnx_path()
    images, labels = labelled_photos(16, seed=3)
    np.savez(tmp / "labels.npz", image=images, labels=labels)
    configs = ((seed, OptimizeConfig(calib=str(tmp / "photos.npz"), calib_samples=len(calib),
                                     allocate=AllocateConfig(labels=str(tmp / "labels.npz"), labels_seed=seed)), None)
               for seed in range(seeds))
    headers, rows = lossless_rows(fp32, tmp, configs)
    head = (f"lossless goal: {len(labels)} labelled crops of 12 photos (label: fp32's top-1 on the photo's centre "
            f"crop), halves by seed; fp32 file {fp32.stat().st_size / 1e6:.2f} MB")
    return head + "\n" + table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-crops", type=int, default=16, help="random crops per calibration photo")
    parser.add_argument("--eval-crops", type=int, default=8, help="crops per evaluation photo (12 photos)")
    parser.add_argument("--runs", type=int, default=30, help="interleaved latency runs")
    parser.add_argument("--lossless-seeds", type=int, default=5, help="seeds of the lossless table (0: skip it)")
    parser.add_argument("--skip-main", action="store_true", help="only the lossless table")
    parser.add_argument("--out", help="also write the tables (markdown) here")
    args = parser.parse_args()
    calib = efficientnet.photo_batch(args.calib_crops, seed=1)
    printed = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "photos.npz", image=calib)
        if not args.skip_main:
            printed.append(main_table(tmp, calib, args))
            print(printed[-1], flush=True)
        if args.lossless_seeds:
            printed.append(lossless_table(tmp, calib, args.lossless_seeds))
            print(printed[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n\n".join(printed) + "\n")


def main_table(tmp: Path, calib: np.ndarray, args) -> str:
    fp32 = efficientnet.onnx_path()
    evaluation = efficientnet.photo_batch(args.eval_crops, seed=2, photos=efficientnet.OTHER_PHOTOS)
    rows = [("fp32", fp32, 0.0)]
    start = time.perf_counter()
    ort_static_qdq(fp32, tmp / "ort_qdq.onnx", calib)
    rows.append(("onnxruntime static QDQ int8 per channel", tmp / "ort_qdq.onnx", time.perf_counter() - start))
    for i, (label, fields, calibrated) in enumerate(SETTINGS):
        out, start = tmp / f"lrq{i}.onnx", time.perf_counter()
        config = OptimizeConfig(**fields, calib=str(tmp / "photos.npz") if calibrated else None,
                                calib_samples=len(calib))
        result = lrqgraph.run(fp32, config)
        lrqgraph.save_model(result.model, out)
        rows.append((label, out, time.perf_counter() - start))
        print(f"built {label} in {rows[-1][2]:.0f} s", flush=True)
    paths = [str(path) for _, path, _ in rows]
    ms1 = interleaved_latency_ms(paths, {"image": evaluation[:1]}, args.runs)
    ms8 = interleaved_latency_ms(paths, {"image": evaluation[:8]}, max(5, args.runs // 3))
    reference = None
    printed = []
    for (label, path, seconds), t1, t8 in zip(rows, ms1, ms8):
        sess = session(str(path), session_options(threads=2))
        logits = np.concatenate([sess.run(None, {"image": evaluation[i:i + 8]})[0]
                                 for i in range(0, len(evaluation), 8)])
        p = softmax(logits)
        reference = p if reference is None else reference
        top1 = float((p.argmax(1) == reference.argmax(1)).mean())
        kl = float((reference * (np.log(reference + 1e-30) - np.log(p + 1e-30))).sum(1).mean())
        printed.append([label, f"{file_bits_per_param(path, fp32):.3f}", f"{path.stat().st_size / 1e6:.2f}",
                        f"{seconds:.0f}" if seconds else "", f"{top1:.4f}", f"{kl:.4f}",
                        f"{t1:.2f}", f"{t1 / ms1[0]:.2f}", f"{t8:.2f}", f"{t8 / ms8[0]:.2f}"])
        print(printed[-1], flush=True)
    headers = ["model", "bits/weight (file)", "MB", "build s", "top-1 agree", "KL", "ms b1", "x fp32", "ms b8",
               "x fp32"]
    head = (f"{datetime.date.today()} · {platform.machine()} · EfficientNet-Lite0 · calibration "
            f"{len(calib)} crops of 5 photos · evaluation {len(evaluation)} crops of 12 other photos")
    return head + "\n" + table(headers, printed)


if __name__ == "__main__":
    main()
