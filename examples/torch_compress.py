"""Compress a torch module with lrqgraph and deploy it with onnxruntime: EfficientNet-Lite0.

    python examples/torch_compress.py [--out out/torch] [--method gptq] [--target-bpw 4] [--crops 4]

1. ``lrqgraph.torch.compress``: the module's nn.Conv2d / nn.Linear are decided by the same rules
   and numerics as ``lrqgraph optimize`` (here GPTQ 4-bit from real photos, or an allocation with
   ``--target-bpw``); the result is a torch module computing with the packed codes.
2. ``lrqgraph.torch.export``: the compressed module as ONNX, its layers lowered as the ONNX path
   lowers them (onnxruntime's MatMulNBits, float kernels with folded dequantization).
3. Both against the float module on crops of photos the calibration never saw: top-1 agreement,
   and the torch module against its export run in onnxruntime.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import lrqgraph.torch as lt
from lrqgraph.runtime import session
from lrqgraph.testing import efficientnet


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/torch", help="folder for the exported model")
    parser.add_argument("--method", default="gptq", help="one method on every layer (ignored with --target-bpw)")
    parser.add_argument("--target-bpw", type=float, help="allocate within this many bits per weight")
    parser.add_argument("--crops", type=int, default=4, help="random crops per photo (calibration and evaluation)")
    args = parser.parse_args(argv)

    net = efficientnet.torch_module()
    calib = torch.from_numpy(efficientnet.photo_batch(args.crops, seed=1))
    other = torch.from_numpy(efficientnet.photo_batch(args.crops, seed=2, photos=efficientnet.OTHER_PHOTOS))
    goal = {"target_bpw": args.target_bpw} if args.target_bpw else {"method": args.method}
    small = lt.compress(net, (calib[:2],), calib=[(calib[i:i + 8],) for i in range(0, len(calib), 8)], **goal)
    compressed = [name for name, m in small.named_modules() if isinstance(m, lt.CompressedMatrix)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = lt.export(small, (calib[:2],), out / "efficientnet-lite0.onnx")

    with torch.no_grad():
        want, got = net(other).numpy(), small(other).numpy()
    sess = session(str(path))
    deployed = sess.run(None, {sess.get_inputs()[0].name: other.numpy()})[0]
    result = {
        "compressed_layers": len(compressed),
        "top1_agreement_torch": float((got.argmax(1) == want.argmax(1)).mean()),
        "top1_agreement_onnx": float((deployed.argmax(1) == want.argmax(1)).mean()),
        "torch_vs_onnx_max_rel": float(np.abs(deployed - got).max() / np.abs(got).max()),
        "megabytes": path.stat().st_size / 1e6,
    }
    print(f"{len(compressed)} layers compressed; {path} ({result['megabytes']:.2f} MB)")
    print(f"top-1 agreement with the float module on {len(other)} crops of other photos: torch "
          f"{result['top1_agreement_torch']:.4f}, onnxruntime {result['top1_agreement_onnx']:.4f}; "
          f"torch vs onnxruntime max relative difference {result['torch_vs_onnx_max_rel']:.2e}")
    return result


if __name__ == "__main__":
    main()
