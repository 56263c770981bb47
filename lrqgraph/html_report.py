"""A self-contained HTML page of a run's report: tables plus matplotlib plots inlined as PNG.

Plots (when the run allocated per layer): bits per weight and choice of every layer; predicted
against measured one-layer degradation (log-log, with the Spearman rank correlation); the
quality-vs-size curve (the allocator's predicted frontier, the uniform menu entries measured end
to end, and the chosen allocation measured).
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

from .errors import LrqError


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LrqError("--report-html needs matplotlib: pip install 'lrqgraph[report]'") from None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plots(report: dict[str, Any]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alloc = report.get("allocation")
    layers = [e for e in report["layers"] if "choice" in e]
    if not alloc or not layers:
        return []
    out = []
    fig, ax = plt.subplots(figsize=(10, 3.2))
    bpw = [e.get("bpw") or 32.0 for e in layers]
    ax.bar(range(len(layers)), bpw, color=["#999" if e["action"] == "keep" else "#3572a5" for e in layers])
    ax.set_xticks(range(len(layers)), [str(i) for i in range(len(layers))], fontsize=7)
    ax.set_xlabel("layer (order as in the table)")
    ax.set_ylabel("bits per weight")
    ax.set_title("chosen representation per layer (grey: kept in float)")
    out.append(_png(fig))
    plt.close(fig)

    checks = [e["check"] for e in layers if e.get("check")]
    if checks:
        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        pred = [max(c[1], 1e-12) for c in checks]
        meas = [max(c[2], 1e-12) for c in checks]
        ax.loglog(pred, meas, "o", ms=4)
        lo, hi = min(pred + meas), max(pred + meas)
        ax.loglog([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"predicted {alloc['metric']} degradation (from the probe)")
        ax.set_ylabel("measured, one layer at a time")
        rho = alloc.get("spearman")
        ax.set_title(f"per-layer degradation, Spearman {rho:.3f}" if rho is not None else "per-layer degradation")
        out.append(_png(fig))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    front = [(b, loss) for b, loss in alloc["frontier"] if loss > 0]
    if front:
        ax.semilogy(*zip(*front), "-", color="#3572a5", lw=2, label="joint allocation frontier (predicted)")
    for family, info in alloc.get("families", {}).items():
        own = [(b, loss) for b, loss in info["frontier"] if 0 < loss < float("inf")]
        if own:
            ax.semilogy(*zip(*own), "--", lw=1, label=f"{family} alone (predicted)")
    uniform = [(u["bpw"], max(u["measured"], 1e-12)) for u in alloc["uniform"]]
    ax.semilogy(*zip(*uniform), "s", color="#c0392b", label="one grid for all layers (GPTQ, measured)")
    for u in alloc["uniform"]:
        ax.annotate(u["label"], (u["bpw"], max(u["measured"], 1e-12)), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.semilogy([alloc["bpw"]], [max(alloc["measured"], 1e-12)], "*", ms=14, color="#27ae60",
                label="chosen allocation (measured)")
    ax.set_xlabel("bits per weight over the selected layers")
    ax.set_ylabel(f"{alloc['metric']} degradation" + (" (1 - cosine)" if alloc["metric"] == "cosine" else ""))
    ax.legend(fontsize=8)
    ax.set_title("quality vs size")
    out.append(_png(fig))
    plt.close(fig)
    return out


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(report: dict[str, Any]) -> str:
    model = report.get("model", {})
    alloc = report.get("allocation")
    parts = ["<h1>lrqgraph report</h1>",
             f"<p>pipeline <code>{html.escape(str(report.get('pipeline', '')))}</code>; "
             f"calibration: {html.escape(str(report.get('calibration', '')))}</p>",
             _table(["quantity", "value"], [[k, v] for k, v in model.items()])]
    if alloc:
        summary = {k: v for k, v in alloc.items() if k not in ("frontier", "uniform", "families")}
        parts += ["<h2>allocation</h2>", _table(["quantity", "value"], [[k, v] for k, v in summary.items()])]
        parts += _plots(report)
        families = alloc.get("families", {})
        if families:
            parts += ["<h3>representation families: the joint choice against each family alone at the same goal</h3>",
                      _table(["family", "layers in the joint choice", "alone: bits per weight",
                              "alone: predicted", "alone: measured"],
                             [[f, v["layers"], *(("no allocation of this family alone meets the goal", "", "")
                                                  if v["alone"] is None else
                                                  (f"{v['alone']['bpw']:.3f}", f"{v['alone']['predicted']:.5g}",
                                                   f"{v['alone']['measured']:.5g}"))]
                              for f, v in families.items()])]
        parts += ["<h3>one grid for all layers (GPTQ without coordinate descent), measured</h3>",
                  _table(["grid", "bits per weight", f"{alloc['metric']} degradation"],
                         [[u["label"], f"{u['bpw']:.3f}", f"{u['measured']:.5g}"] for u in alloc["uniform"]])]
    rows = []
    for i, e in enumerate(report.get("layers", [])):
        check = e.get("check") or (None, None, None)
        rows.append([i, e.get("name"), "x".join(map(str, e.get("shape") or [])), e.get("action"),
                     e.get("choice") or e.get("method"), e.get("family"), e.get("bpw"), e.get("act_error"),
                     None if e.get("predicted") is None else f"{e['predicted']:.3g}",
                     None if check[2] is None else f"{check[0]}: {check[1]:.3g} / {check[2]:.3g}",
                     e.get("reason")])
    parts += ["<h2>layers</h2>", _table(["#", "layer", "shape", "action", "choice", "family", "bpw", "act.err",
                                         "predicted", "check: predicted / measured", "why"], rows)]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:left}img{margin:0.5em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lrqgraph report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
