"""onnxruntime's GPTQ weight-only quantizer, checked layer by layer on MiniLM's 36 MatMul weights.

For each weight this calls the two functions that onnxruntime's ``gptq_quantize`` applies to it
(``neural_compressor.weight_only.gptq``, which returns the fake-quantized weight GPTQ chose, then
``quant_tensor``, which derives the stored codes, scales and zero points from that result), with
H = XᵀX of the layer's input over the same 128 calibration verses as bench/e2e.py (padding
positions included, as onnxruntime's quantizer does). Per configuration it prints the mean over
layers of act.err = sqrt(tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)) for plain RTN (``quant_tensor`` on W itself),
for GPTQ's own result and for what is stored, and how many layers' GPTQ result equals RTN's
(to 1e-7). Then it runs the whole quantizer (bench/common.py's ort_weight_only) at its default
grid, 4-bit block 128 asymmetric, for GPTQ and k-quant, and prints whether each succeeds.

    python bench/ort_gptq_check.py
"""
from __future__ import annotations

import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from common import batches, ort_weight_only  # noqa: E402

from lrqgraph.report import table  # noqa: E402
from lrqgraph.testing import data, minilm  # noqa: E402

CONFIGS = [("sym", 32, False), ("sym", 32, True), ("asym", 64, False), ("asym", 64, True)]


def dequant(w_t: np.ndarray, bits: int, group: int, scheme: str) -> np.ndarray:
    """quant_tensor's stored grid for W (given transposed, [N, K]), dequantized back to [K, N]."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor
    q, scale, zero = quant_tensor(w_t.copy(), bits, group, scheme, "uint")
    return ((q - zero) * scale).reshape(w_t.shape).T


def main() -> None:
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    model = onnx.load(str(minilm.onnx_path()))
    inits = {t.name: t for t in model.graph.initializer}
    layers = [n for n in model.graph.node
              if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    inputs = sorted({n.input[0] for n in layers})
    for name in inputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = minilm.encode(data.kjv_sentences(128, start=1), pad_to=64)
    hessians = {name: 0.0 for name in inputs}
    for i in range(0, 128, 16):
        outs = sess.run(inputs, {k: v[i:i + 16] for k, v in feeds.items()})
        for name, x in zip(inputs, outs):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            hessians[name] = hessians[name] + x.T @ x

    rows = []
    for scheme, group, actorder in CONFIGS:
        errs = {"rtn": [], "gptq": [], "stored": []}
        same = 0
        for node in layers:
            w = numpy_helper.to_array(inits[node.input[1]]).copy()  # float32 [K, N], as onnxruntime reads it
            h = hessians[node.input[0]]
            w64 = w.astype(np.float64)

            def act_err(wq):
                d = wq - w64
                return float(np.sqrt(np.trace(d.T @ h @ d) / np.trace(w64.T @ h @ w64)))

            rtn = dequant(w.T, 4, group, scheme)
            chosen = gptq(w.copy(), h.copy(), num_bits=4, group_size=group, scheme=scheme, actorder=actorder)
            stored = dequant(np.asarray(chosen).T, 4, group, scheme)
            errs["rtn"].append(act_err(rtn))
            errs["gptq"].append(act_err(chosen))
            errs["stored"].append(act_err(stored))
            same += bool(np.allclose(chosen, rtn, rtol=0, atol=1e-7))
        rows.append([f"4-bit b{group} {scheme}" + (", act-order" if actorder else ""),
                     f"{np.mean(errs['rtn']):.4f}", f"{np.mean(errs['gptq']):.4f}", f"{np.mean(errs['stored']):.4f}",
                     f"{same}/{len(layers)}"])
    print(f"{datetime.date.today()} · onnxruntime {ort.__version__} · MiniLM, {len(layers)} MatMul weights · "
          f"H from 128 KJV verses (padded to 64 tokens)")
    print(table(["onnxruntime GPTQ", "act.err RTN", "act.err GPTQ result", "act.err stored",
                 "layers where GPTQ result = RTN"], rows))
    tmp = Path(tempfile.mkdtemp(prefix="lrqgraph-ortcheck-"))
    for method in ("gptq", "k_quant"):
        try:
            ort_weight_only(minilm.onnx_path(), tmp / f"{method}.onnx", method=method, block=128, symmetric=False,
                            calib_feeds=batches(feeds, 16))
            outcome = "ok"
        except Exception as exc:  # noqa: BLE001 - the point is to report it
            outcome = f"fails: {type(exc).__name__}: {exc}"
        print(f"onnxruntime {method} 4-bit b128 asym (its default grid) on MiniLM: {outcome}")


if __name__ == "__main__":
    main()
