"""Input statistics of weight layers from real data: H = XᵀX of every MatMul/Gemm input.

The model is run in onnxruntime with the layers' input tensors exposed as extra outputs; each
batch's activations are folded into the running sums right away, so only H (K×K per layer) is
kept, never the activations. Features are the last axis, except for 4-D (NCHW) inputs of
convolutions, whose channels are the features and whose pixels are the rows. Rows where the mask
input is 0 (padding tokens) are left out.
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import onnx

from .runtime import session


def collect_hessians(model_path: str | os.PathLike, inputs: dict[str, str],
                     batches: Iterable[dict[str, np.ndarray]], mask_input: str | None = None) -> dict[str, np.ndarray]:
    """H per weight for ``inputs`` = {weight name: activation tensor name}, summed over ``batches``.

    ``mask_input`` names a [batch, seq] feed whose zeros mark rows to ignore (e.g. an attention mask).
    """
    model = onnx.load(str(model_path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    for tensor in sorted(set(inputs.values()) - known):
        model.graph.output.append(onnx.helper.make_value_info(tensor, onnx.TypeProto()))
    folder = os.path.dirname(os.path.abspath(model_path))
    path = os.path.join(folder, f".lrqgraph-hessian-{os.getpid()}.onnx")
    onnx.save(model, path)  # beside the original so external data paths still resolve
    try:
        sess = session(path)
    finally:
        os.remove(path)
    names = sorted(set(inputs.values()))
    sums: dict[str, np.ndarray] = {}
    for feed in batches:
        acts = dict(zip(names, sess.run(names, feed)))
        keep = None if mask_input is None else feed[mask_input].reshape(-1).astype(bool)
        for tensor, x in acts.items():
            if x.ndim == 4:  # NCHW: pixels are samples of a C-dimensional input
                x = x.transpose(0, 2, 3, 1)
            rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
            if keep is not None and len(keep) == len(rows):
                rows = rows[keep]
            sums[tensor] = sums.get(tensor, 0) + rows.T @ rows
    return {weight: sums[tensor] for weight, tensor in inputs.items()}
