"""verify: run the original and the rewritten model in onnxruntime and compare every output.

Inputs come from ``--calib`` (see lrqgraph.calib) or are synthesised from the input signature. Reported per
output: max |Δ|, max |Δ| / max |reference| and per-sample cosine similarity. With ``max_error``
set, a larger relative error fails the pipeline (and so no output file is written).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx

import lrqgraph.calib as calib
from lrqgraph.config import VerifyConfig, with_fields
from lrqgraph.errors import LrqError, VerificationError
from lrqgraph.evaluate import cosines, per_sample, run_batches
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass

log = logging.getLogger(__name__)

def compare(references: list[np.ndarray], candidates: list[np.ndarray]) -> dict[str, float]:
    """Max |Δ|, max |Δ| / max |ref| and per-sample cosine over batches, on elements finite in both."""
    max_abs = scale = 0.0
    cos, non_finite = [], 0
    for reference, candidate in zip(references, candidates):
        ref, cand = per_sample(reference), per_sample(candidate)
        finite = np.isfinite(ref) & np.isfinite(cand)
        non_finite += int((~finite).sum())
        ref, cand = np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)
        if ref.size:
            max_abs = max(max_abs, float(np.abs(ref - cand).max()))
            scale = max(scale, float(np.abs(ref).max()))
        cos.append(cosines(ref, cand))
    cos = np.concatenate(cos)
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs,
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "non_finite": non_finite}


def compare_outputs(original, rewritten, signature: onnx.ModelProto, graph, cfg: VerifyConfig,
                    data: calib.CalibData | None = None) -> dict[str, Any]:
    """Run both models (paths or ModelProtos) on the same inputs; metrics per output.

    Inputs: ``data`` if given, else ``cfg.calib``, else synthesised from the signature. Raises
    VerificationError when ``cfg.max_error`` is set and exceeded.
    """
    if data is None and cfg.calib:
        data = calib.load_calibration(cfg.calib, signature, cfg.tokenizer, cfg.calib_samples)
    if data is not None:
        runs, samples, source = list(data.batches), data.samples, f"calibration data {data.source}"
    else:
        feeds = calib.synthesize(signature, graph, cfg.samples, cfg.seed)
        runs, samples, source = list(calib.batches(signature, feeds)), cfg.samples, "synthetic inputs"
    names, reference = run_batches(original, runs)
    _, candidate = run_batches(rewritten, runs)
    if len(reference[0]) != len(candidate[0]):
        raise LrqError(f"the models have different outputs ({len(reference[0])} vs {len(candidate[0])})")
    outputs = {}
    for i, name in enumerate(names):
        refs, cands = [r[i] for r in reference], [c[i] for c in candidate]
        if any(r.shape != c.shape for r, c in zip(refs, cands)):
            raise LrqError(f"output '{name}' differs in shape: {refs[0].shape} vs {cands[0].shape}")
        if refs[0].dtype.kind == "f":
            outputs[name] = compare(refs, cands)
        else:
            outputs[name] = {"mismatches": int(sum((r != c).sum() for r, c in zip(refs, cands)))}
    worst = max((o.get("max_rel", 0.0) for o in outputs.values()), default=0.0)
    report = {"inputs": source, "samples": samples,
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

    def validate(self) -> None:
        with_fields(VerifyConfig(), self.params)

    def run(self, ctx: Context) -> PassResult:
        cfg = with_fields(ctx.config.verify, self.params)
        if ctx.original is None:
            raise LrqError("verify needs the original model (run it through lrqgraph.run or optimize)")
        # The rewrite keeps the graph's inputs, so the rewritten model describes the signature.
        rewritten = ctx.model.to_onnx()
        data = ctx.analysis("calib_data") if cfg.calib in (None, ctx.config.calib) else None
        ctx.verification = compare_outputs(ctx.original, rewritten, rewritten, ctx.model.graph, cfg, data)
        return PassResult(modified=False)
