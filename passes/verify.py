"""verify: run the original and the rewritten model in onnxruntime and compare every output.

Inputs come from ``--calib`` (see lrqgraph.calib) or are synthesised from the input signature. Reported per
output: max |Δ|, max |Δ| / max |reference| and per-sample cosine similarity. With ``max_error``
set, a larger relative error fails the pipeline (and so no output file is written).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

import lrqgraph.calib as calib
from lrqgraph import external, kvcache
from lrqgraph.blocks import run_blocks, split_blocks
from lrqgraph.config import VerifyConfig, with_fields
from lrqgraph.errors import LrqError, VerificationError
from lrqgraph.evaluate import cosines, open_session, per_sample
from lrqgraph.latency import models_latency_ms
from lrqgraph.passmanager import Context, Pass, PassResult, register_pass
from lrqgraph.results import Verification

log = logging.getLogger(__name__)

class OutputComparison:
    """Max |Δ|, max |Δ| / max |ref| and per-sample cosine of one output, on elements finite in
    both, accumulated batch by batch (an LLM's logits over the calibration set would not fit in
    memory at once); integer outputs count mismatching elements."""

    def __init__(self, name: str):
        self.name, self.shape = name, None
        self.max_abs = self.scale = 0.0
        self.cos: list[np.ndarray] = []
        self.non_finite = self.mismatches = 0
        self.floating = True

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise LrqError(f"output '{self.name}' differs in shape: {reference.shape} vs {candidate.shape}")
        self.floating = reference.dtype.kind == "f"
        if not self.floating:
            self.mismatches += int((reference != candidate).sum())
            return
        ref, cand = per_sample(reference), per_sample(candidate)
        finite = np.isfinite(ref) & np.isfinite(cand)
        self.non_finite += int((~finite).sum())
        ref, cand = np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)
        if ref.size:
            self.max_abs = max(self.max_abs, float(np.abs(ref - cand).max()))
            self.scale = max(self.scale, float(np.abs(ref).max()))
        self.cos.append(cosines(ref, cand))

    def result(self) -> dict[str, float]:
        if not self.floating:
            return {"mismatches": self.mismatches}
        cos = np.concatenate(self.cos)
        return {"max_abs": self.max_abs, "max_rel": self.max_abs / self.scale if self.scale > 0 else self.max_abs,
                "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "non_finite": self.non_finite}


def _single_samples(runs: list[dict[str, np.ndarray]], signature: onnx.ModelProto):
    """One sample per run where the batch axis is free: memory stays at one sample's outputs and
    activations (a decoder's logits are 1 GB per 8 windows of 128 tokens), whatever the batch."""
    if any(s.batch_fixed is not None for s in calib.input_specs(signature)):
        yield from runs
        return
    for feed in runs:
        rows = max((len(v) for v in feed.values() if np.ndim(v) > 0), default=1)
        for i in range(rows):
            yield {k: v[i:i + 1] if np.ndim(v) > 0 else v for k, v in feed.items()}


def _session_pairs(original, rewritten, feeds: list[dict]):
    ref_session, cand_session = open_session(original), open_session(rewritten)
    names = [o.name for o in ref_session.get_outputs()]
    if len(names) != len(cand_session.get_outputs()):
        raise LrqError(f"the models have different outputs ({len(names)} vs {len(cand_session.get_outputs())})")
    return ((ref_session.run(None, feed), cand_session.run(None, feed)) for feed in feeds), names


# Bytes of the original's block outputs kept to compare the rewritten model's with
BOUNDARY_BYTES = 256 << 20


def _blockwise_pairs(original, rewritten: onnx.ModelProto, feeds: list[dict], boundaries: dict):
    """Both models run block by block (lrqgraph.blocks): neither is ever loaded whole. The tensors
    where the original's blocks meet (a decoder's residual stream) are compared too, into
    ``boundaries`` (tensor name -> OutputComparison), as far as BOUNDARY_BYTES of them allow."""
    if not isinstance(original, onnx.ModelProto):
        original = external.absolutize(onnx.load(str(original), load_external_data=False), Path(original).parent)
    names = [o.name for o in original.graph.output]
    if len(names) != len(rewritten.graph.output):
        raise LrqError(f"the models have different outputs ({len(names)} vs {len(rewritten.graph.output)})")
    theirs = {o for n in rewritten.graph.node for o in n.output}
    cuts = [o for b in split_blocks(original)[:-1] for o in b.outputs if o in theirs and o not in names]
    kept: dict[tuple[int, str], np.ndarray] = {}
    budget = [BOUNDARY_BYTES]

    def keep(i: int, name: str, value: np.ndarray) -> None:
        if value.dtype.kind == "f" and value.ndim >= 2 and value.nbytes <= budget[0]:
            kept[i, name] = value
            budget[0] -= value.nbytes

    def compare(i: int, name: str, value: np.ndarray) -> None:
        reference = kept.pop((i, name), None)
        if reference is not None:
            boundaries.setdefault(name, OutputComparison(name)).add(reference, value)

    refs = run_blocks(original, feeds, what="verify: original", taps=cuts, on_tap=keep)
    cands = run_blocks(rewritten, feeds, what="verify: rewritten", taps=cuts, on_tap=compare)
    return (([r[n] for n in names], [c[n] for n in names]) for r, c in zip(refs, cands)), names


def compare_outputs(original, rewritten, signature: onnx.ModelProto, graph, cfg: VerifyConfig,
                    data: calib.CalibData | None = None, streamed: bool = False) -> Verification:
    """Run both models (paths or ModelProtos) on the same inputs, batch by batch; metrics per output.
    ``streamed``: run them block by block instead of as whole sessions.

    Inputs: ``data`` if given, else ``cfg.calib``, else synthesised from the signature. Raises
    VerificationError when ``cfg.max_error`` is set and exceeded.
    """
    if data is None and cfg.calib:
        data = calib.load_calibration(cfg.calib, signature, cfg.tokenizer, cfg.calib_samples, graph=graph)
    if data is not None:
        runs = calib.split_runs(data.batches, cfg.calib_verify_samples)[0]
        samples = calib.count_samples(runs)
        source = f"{samples} of {data.samples} samples of calibration data {data.source}"
    else:
        feeds = calib.synthesize(signature, graph, cfg.samples, cfg.seed)
        runs, samples, source = list(calib.batches(signature, feeds)), cfg.samples, "synthetic inputs"
    feeds = list(_single_samples(runs, signature))
    boundaries: dict[str, OutputComparison] = {}
    pairs, names = _blockwise_pairs(original, rewritten, feeds, boundaries) if streamed else \
        _session_pairs(original, rewritten, feeds)
    comparisons = [OutputComparison(name) for name in names]
    presents = kvcache.present_outputs(graph)
    for feed, (refs, cands) in zip(feeds, pairs):
        for comparison, ref, cand in zip(comparisons, refs, cands):
            if comparison.name in presents:  # a KV cache: the positions this run wrote
                ref, cand = kvcache.filled(ref, feed), kvcache.filled(cand, feed)
            comparison.add(ref, cand)
    outputs = {c.name: c.result() for c in comparisons}
    worst = max((o.get("max_rel", 0.0) for o in outputs.values()), default=0.0)
    blocks = {name: c.result() for name, c in boundaries.items()} or None  # streamed: where the error grows
    latency = time_both(original, rewritten, feeds[0], runs[0], cfg.time_seconds) \
        if cfg.time_seconds > 0 and not streamed else None
    log.info("verify: max relative error %.3g over %d output(s) (%s)", worst, len(outputs), source)
    if cfg.max_error is not None and worst > cfg.max_error:
        bad = max(outputs, key=lambda n: outputs[n].get("max_rel", 0.0))
        raise VerificationError(f"verification failed: max relative error {worst:.4g} on output '{bad}' "
                                f"exceeds --max-error {cfg.max_error:g}")
    return Verification(source, samples, outputs, worst, blocks, latency)


def time_both(original, rewritten, one: dict, batch: dict, seconds: float) -> dict[str, dict[str, float]]:
    """Original and rewritten timed in turns on one sample and on one calibration batch (when it
    holds more than one): ms each and their ratio."""
    out = {}
    sizes = {"batch 1": one}
    rows = max((len(v) for v in batch.values() if np.ndim(v) > 0), default=1)
    if rows > 1:
        sizes[f"batch {rows}"] = batch
    for label, feed in sizes.items():
        before, after = models_latency_ms([original, rewritten], feed, seconds)
        out[label] = {"original_ms": float(f"{before:.4g}"), "rewritten_ms": float(f"{after:.4g}"),
                      "ratio": round(after / before, 3)}
        log.info("verify: %s: %.3g ms, %.3fx the original's %.3g ms", label, after, after / before, before)
    return out


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
        ctx.verification = compare_outputs(ctx.original, rewritten, rewritten, ctx.model.graph, cfg, data,
                                           streamed=ctx.model.streaming)
        return PassResult(modified=False)
