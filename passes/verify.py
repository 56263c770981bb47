"""verify: run the original and the rewritten model in onnxruntime and compare every output.

Inputs come from ``--calib data.npz`` or are synthesised from the input signature. Reported per
output: max |Δ|, max |Δ| / max |reference| and per-sample cosine similarity. With ``max_error``
set, a larger relative error fails the pipeline (and so no output file is written).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lrqgraph import calib
from lrqgraph.config import VerifyConfig, with_fields
from lrqgraph.errors import LrqError, VerificationError
from lrqgraph.io import save_model, tensor_bytes
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass
from lrqgraph.runtime import session

log = logging.getLogger(__name__)

# Small models are handed to onnxruntime as bytes; larger ones go through a temporary file.
_IN_MEMORY_LIMIT = 1 << 30


def run_model(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray],
              proto: onnx.ModelProto) -> list[np.ndarray]:
    """Outputs of ``model`` over all samples in ``feeds`` (batched as the model allows)."""
    with tempfile.TemporaryDirectory(prefix="lrqgraph-verify-") as tmp:
        if isinstance(model, onnx.ModelProto):
            if tensor_bytes(model) < _IN_MEMORY_LIMIT:
                source = model.SerializeToString()
            else:
                source = save_model(model, Path(tmp) / "model.onnx", external_data=True)
        else:
            source = model
        sess = session(source)
        names = [o.name for o in sess.get_outputs()]
        runs = [sess.run(names, feed) for feed in calib.batches(proto, feeds)]
    return [np.concatenate([r[i] for r in runs], axis=0) if runs[0][i].ndim else runs[0][i]
            for i in range(len(names))]


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max |Δ|, max |Δ| / max |ref| and per-sample cosine, over the elements finite in both."""
    ref = reference.astype(np.float64).reshape(reference.shape[0] if reference.ndim > 1 else 1, -1)
    cand = candidate.astype(np.float64).reshape(ref.shape)
    finite = np.isfinite(ref) & np.isfinite(cand)
    ref, cand = np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)
    diff = np.abs(ref - cand)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = np.where(norms > 0, (ref * cand).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs,
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "non_finite": int((~finite).sum())}


def compare_outputs(original, rewritten, signature: onnx.ModelProto, graph, cfg: VerifyConfig) -> dict[str, Any]:
    """Run both models (paths or ModelProtos) on the same inputs; metrics per output.

    Raises VerificationError when ``cfg.max_error`` is set and exceeded.
    """
    if cfg.calib:
        feeds, source = calib.load_npz(cfg.calib, signature), f"calibration file {cfg.calib}"
    else:
        feeds, source = calib.synthesize(signature, graph, cfg.samples, cfg.seed), "synthetic inputs"
    reference = run_model(original, feeds, signature)
    candidate = run_model(rewritten, feeds, signature)
    names = [o.name for o in signature.graph.output]
    if len(reference) != len(candidate):
        raise LrqError(f"the models have different outputs ({len(reference)} vs {len(candidate)})")
    outputs = {}
    for name, ref, cand in zip(names, reference, candidate):
        if ref.shape != cand.shape:
            raise LrqError(f"output '{name}' differs in shape: {ref.shape} vs {cand.shape}")
        if ref.dtype.kind == "f":
            outputs[name] = compare(ref, cand)
        else:
            outputs[name] = {"mismatches": int((ref != cand).sum())}
    worst = max((o.get("max_rel", 0.0) for o in outputs.values()), default=0.0)
    report = {"inputs": source, "samples": int(next(iter(feeds.values())).shape[0]) if feeds else 0,
              "outputs": outputs, "max_rel": worst}
    log.info("verify: max relative error %.3g over %d output(s) (%s)", worst, len(outputs), source)
    if cfg.max_error is not None and worst > cfg.max_error:
        bad = max(outputs, key=lambda n: outputs[n].get("max_rel", 0.0))
        raise VerificationError(f"verification failed: max relative error {worst:.4g} on output '{bad}' "
                                f"exceeds --max-error {cfg.max_error:g}")
    return report


@register_pass
class Verify(Pass):
    """Compare original and rewritten outputs; options override VerifyConfig (samples, calib, max_error)."""

    name = "verify"

    def run(self, ctx: Context) -> PassResult:
        cfg = with_fields(ctx.config.verify, self.params)
        if ctx.original is None:
            raise LrqError("verify needs the original model (run it through lrqgraph.run or optimize)")
        # The rewrite keeps the graph's inputs, so the rewritten model describes the signature.
        rewritten = ctx.model.to_onnx()
        ctx.report["verify"] = compare_outputs(ctx.original, rewritten, rewritten, ctx.model.graph, cfg)
        return PassResult(modified=False)
