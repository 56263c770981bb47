"""lrqgraph as a post-export pass in torch.onnx's dynamo flow (onnx_ir): EfficientNet-Lite0.

    python examples/onnx_ir_pass.py [--out out/onnx_ir] [--crops 4]

``torch.onnx.export(..., dynamo=True)`` returns an ``ONNXProgram`` whose ``.model`` is an
``onnx_ir.Model``. ``lrqgraph.ir.OptimizePass`` is an ``onnx_ir`` pass: put it in an
``onnx_ir.passes.PassManager`` (beside onnx_ir's own passes), run it on ``program.model``, give the
result back to the program and save. Calibration inputs are written as an .npz keyed by the
exported input's name; the pass's report says what it did per layer.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from lrqgraph import OptimizeConfig
from lrqgraph.ir import OptimizePass
from lrqgraph.runtime import session
from lrqgraph.testing import efficientnet


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/onnx_ir", help="folder for the model and calibration data")
    parser.add_argument("--crops", type=int, default=4, help="random crops per photo (calibration and evaluation)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    net = efficientnet.torch_module()
    calib = efficientnet.photo_batch(args.crops, seed=1)
    with torch.no_grad():
        program = torch.onnx.export(net, (torch.from_numpy(calib[:2]),), dynamo=True,
                                    dynamic_shapes=({0: torch.export.Dim.AUTO},))
    np.savez(out / "calib.npz", **{program.model.graph.inputs[0].name: calib})

    lrq = OptimizePass(OptimizeConfig(calib=str(out / "calib.npz")))
    result = ir.passes.PassManager([lrq])(program.model)
    program.model = result.model
    path = out / "efficientnet-lite0.onnx"
    program.save(str(path))

    other = efficientnet.photo_batch(args.crops, seed=2, photos=efficientnet.OTHER_PHOTOS)
    with torch.no_grad():
        want = net(torch.from_numpy(other)).numpy()
    sess = session(str(path))
    got = sess.run(None, {sess.get_inputs()[0].name: other})[0]
    summary = lrq.report["model"]
    agreement = float((got.argmax(1) == want.argmax(1)).mean())
    print(f"{summary['layers_rewritten']} layers rewritten, {summary['model_bpw']} bits per parameter; "
          f"top-1 agreement with the float module on {len(other)} crops of other photos: {agreement:.4f}")
    return {"layers_rewritten": summary["layers_rewritten"], "top1_agreement": agreement}


if __name__ == "__main__":
    main()
