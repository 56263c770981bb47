"""Input statistics of weight layers from real data: H = XᵀX of every MatMul/Gemm input.

The model is run in onnxruntime with the layers' input tensors exposed as extra outputs; each
batch's activations are folded into the running sums right away, so only H (K×K per layer) is
kept, never the activations. Features are the last axis, except for 4-D (NCHW) inputs of
convolutions, whose channels are the features and whose pixels are the rows. Rows where the mask
input is 0 (padding tokens) are left out. Nothing is written beside the user's model: the session
is built from memory (or, for models past protobuf's limit, from a private temporary folder).
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import onnx

from .evaluate import open_session
from .io import load_model


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``tensors`` only (the input is not modified), so that
    onnxruntime drops what they do not need (a decoder's lm_head and its logits)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(onnx.helper.make_value_info(t, onnx.TypeProto()) for t in sorted(set(tensors)))
    return out


def collect_hessians(model: onnx.ModelProto | str | os.PathLike, inputs: dict[str, str],
                     batches: Iterable[dict[str, np.ndarray]], mask_input: str | None = None) -> dict[str, np.ndarray]:
    """H per weight for ``inputs`` = {weight name: activation tensor name}, summed over ``batches``.

    ``model`` is a ModelProto or a path (external data beside it is read). ``mask_input`` names a
    [batch, seq] feed whose zeros mark rows to ignore (e.g. an attention mask).
    """
    return collect_hessian_parts(model, inputs, [batches], mask_input)[0]


def collect_hessian_parts(model: onnx.ModelProto | str | os.PathLike, inputs: dict[str, str],
                          parts: list[Iterable[dict[str, np.ndarray]]],
                          mask_input: str | None = None) -> list[dict[str, np.ndarray]]:
    """:func:`collect_hessians` for each part of the batches, from one session and one pass (the
    allocator's held-out statistics); every part holds at least one batch."""
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    names = sorted(set(inputs.values()))
    sess = open_session(with_outputs(proto, names))
    out = []
    for batches in parts:
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
        out.append({weight: sums[tensor] for weight, tensor in inputs.items()})
    return out
