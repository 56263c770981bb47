"""Human-readable tables and the JSON report of a run, assembled from the pipeline's typed results."""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
import onnx

from .io import constant_bytes


def layer_entries(ctx) -> list[dict[str, Any]]:
    """One entry per discovered layer: its verdict, the plan made for it and what was emitted."""
    entries = []
    for layer in ctx.discovered:
        e = {"name": layer.name, "op": layer.op, "weight": layer.weight, "shape": list(layer.shape),
             "params": layer.params, "nodes": len(layer.nodes), "action": "rewrite" if layer.rewrite else "keep",
             "reason": layer.reason}
        plan = ctx.plans.get(layer.weight) if layer.rewrite else None
        if plan is not None:
            e.update(action="rewrite" if plan.rewrite else "keep", reason=plan.reason, **plan.settings)
            if plan.allocation:
                e.update(plan.allocation)
            if plan.rewrite:
                e.update(info=plan.rep.info, bpw=round(plan.rep.bits_per_weight(), 4), rel_error=plan.rel_error,
                         act_error=plan.act_error, seconds=plan.seconds)
        lowered = ctx.lowered.get(layer.weight) if layer.rewrite else None
        if lowered is not None:
            e.update(stored_bytes=lowered.stored_bytes, stored_bpw=round(lowered.stored_bytes * 8 / layer.params, 4))
        entries.append(e)
    return entries


def _float_params(model: onnx.ModelProto) -> int:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats)


def summarize(before: onnx.ModelProto, after: onnx.ModelProto, layers: list[dict]) -> dict[str, Any]:
    rewritten = [e for e in layers if e.get("action") == "rewrite" and "stored_bytes" in e]
    params = sum(e["params"] for e in rewritten)
    stored = sum(e["stored_bytes"] for e in rewritten)
    original_params = _float_params(before)
    out = {
        "weight_bytes_before": constant_bytes(before),
        "weight_bytes_after": constant_bytes(after),
        "layers_rewritten": len(rewritten),
        "params_rewritten": params,
        # every stored byte of the rewritten layers' codes, scales and zero points
        "rewritten_bpw": round(stored * 8 / params, 4) if params else None,
        # all constant bytes of the output over the float parameters of the input
        "model_bpw": round(constant_bytes(after) * 8 / original_params, 4) if original_params else None,
    }
    if not rewritten:
        reasons = Counter(e.get("reason") or "not selected" for e in layers)
        out["why_none"] = ("the model has no MatMul / Gemm layers" if not layers else
                           "; ".join(f"{why} ({count})" for why, count in reasons.most_common()))
    return out


def build_report(ctx, before: onnx.ModelProto, after: onnx.ModelProto, **extra: Any) -> dict[str, Any]:
    layers = layer_entries(ctx)
    report: dict[str, Any] = {"layers": layers, "model": summarize(before, after, layers), **extra,
                              "passes": [{"pass": t.name, "seconds": t.seconds, "modified": t.modified}
                                         for t in ctx.timings],
                              "executor": ctx.executor.describe(),
                              "calibration": (ctx.calibration.describe() if ctx.calibration is not None else
                                              f"H = XᵀX from {ctx.config.calib}" if ctx.config.calib else
                                              "none: all methods ran data-free")}
    if ctx.allocation is not None:
        report["allocation"] = dataclasses.asdict(ctx.allocation)
    if ctx.verification is not None:
        report["verify"] = ctx.verification.as_report()
    return report


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in rows if r[i]) for i in range(len(headers))]

    def fmt(values: Sequence[str]) -> str:
        cells = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(cells).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _shape(entry: dict) -> str:
    return "x".join(map(str, entry.get("shape") or [])) or "-"


def layer_table(layers: list[dict], width: int = 60) -> str:
    rows = []
    for e in layers:
        if e.get("action") == "rewrite":
            what = e.get("choice", e.get("method", "rewrite"))  # an allocation's candidate, and its family
            what += f" [{e['family']}]" if e.get("family") else ""
            detail = [e.get("rank"), e.get("bits"), e.get("block"), e.get("stored_bpw", e.get("bpw")),
                      _fmt(e.get("rel_error")), _fmt(e.get("seconds"))]
        else:
            what = "keep: " + e.get("reason", "")
            detail = [None] * 6
        rows.append([_short(e["name"], width), e.get("op", ""), _shape(e), *detail, what])
    return table(["layer", "op", "shape", "rank", "bits", "block", "bpw", "rel.err", "s", "action"], rows)


def _fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.4g}"


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


SHOWN_OUTPUTS = 4  # outputs the summary shows one by one; more get one line together


def summary(report: dict) -> str:
    m = report.get("model", {})
    lines = []
    if m and not m["layers_rewritten"]:
        lines.append(f"no layer rewritten, the model is written unchanged: {m.get('why_none', '')}")
    elif m:
        before, after = m["weight_bytes_before"], m["weight_bytes_after"]
        ratio = f" ({after / before:.1%})" if before else ""
        lines.append(f"weights: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB{ratio}; "
                     f"{m['layers_rewritten']} layers rewritten at {m['rewritten_bpw']} bits per weight "
                     f"(codes + scales + zero points); whole model {m['model_bpw']} bits per parameter")
    v = report.get("verify")
    if v:
        outputs = list(v["outputs"].items())
        shown, rest = (outputs, []) if len(outputs) <= SHOWN_OUTPUTS else \
            (outputs[:SHOWN_OUTPUTS - 1], outputs[SHOWN_OUTPUTS - 1:])
        for name, o in shown:
            if "cosine_mean" in o:
                lines.append(f"verify '{name}': max |Δ| {o['max_abs']:.3g}, max rel {o['max_rel']:.3g}, "
                             f"cosine mean {o['cosine_mean']:.5f} min {o['cosine_min']:.5f} "
                             f"({v['samples']} samples, {v['inputs']})")
            else:
                lines.append(f"verify '{name}': {o['mismatches']} mismatching elements")
        if rest:  # a decoder's KV cache: dozens of present.* outputs, one line for all
            floating = [o for _, o in rest if "cosine_mean" in o]
            worst = (f": worst max rel {max(o['max_rel'] for o in floating):.3g}, worst cosine min "
                     f"{min(o['cosine_min'] for o in floating):.5f}") if floating else ""
            lines.append(f"verify {len(rest)} more outputs ('{rest[0][0]}' ... '{rest[-1][0]}'){worst} "
                         f"(every output in the JSON report)")
        timed = v.get("latency") or {}
        if timed:
            lines.append("latency (onnxruntime CPU, in turns): " + ", ".join(
                f"{t['ratio']:.2f}x the original at {label} ({t['rewritten_ms']:.3g} vs {t['original_ms']:.3g} ms)"
                for label, t in timed.items()))
    a = report.get("allocation")
    if a:
        goal = ", ".join(f"{k} {v}" for k, v in a["goal"].items())
        lines.append(f"allocate ({a['mode']}, {goal}): {a['bpw']:.3f} bits per weight over the selected layers; "
                     f"{a['metric']} degradation predicted {a['predicted']:.4g}, measured {a['measured']:.4g}"
                     f" (out of sample, before the final refit: {a['held_out']:.4g})"
                     f"{'' if a['met'] else ' - GOAL MISSED'}; {a['repairs']} repairs; "
                     f"Spearman predicted/measured {a['spearman'] if a['spearman'] is None else round(a['spearman'], 3)}")
        families = a.get("families") or {}
        if families:
            lines.append("families: " + "; ".join(
                f"{f} {v['layers']} layers (alone: " + ("does not meet the goal" if v["alone"] is None else
                                                         f"{v['alone']['bpw']:.3f} bpw, measured {v['alone']['measured']:.4g}")
                + ")" for f, v in families.items()))
            rho = {f: r for f, r in (a.get("spearman_by_family") or {}).items() if r is not None}
            if rho:
                lines.append("proxy check per family (Spearman predicted/measured one-layer degradation): "
                             + ", ".join(f"{f} {r:.3f}" for f, r in rho.items()))
        budget = a.get("latency")
        if budget:
            limit = f"{budget['reference']}" + (f" and {budget['max_latency']:g}x float" if budget["max_latency"] else "")
            dropped = budget["dropped"]
            estimate = "; ".join(
                f"{e['chosen'] / e['float']:.2f}x float at {rows} rows (reference {e['reference'] / e['float']:.2f}x)"
                for rows, e in budget["estimate_ms"].items() if e["float"] > 0)
            folded = budget.get("folded_layers") or 0
            lines.append(f"latency budget (no slower than {limit}): {sum(dropped.values())} candidates dropped"
                         + (f" ({', '.join(f'{f} {n}' for f, n in sorted(dropped.items()))})" if dropped else "")
                         + (f"; rewritten layers estimated {estimate}" if estimate else "")
                         + (f"; {folded} layers rebuilt in float when the session loads (their products are "
                            f"compute-bound: the file holds the codes, memory holds floats)" if folded else ""))
    if report.get("calibration"):
        lines.append(f"calibration: {report['calibration']}")
    return "\n".join(lines)
