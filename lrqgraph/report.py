"""Human-readable tables and the JSON report of a run."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence


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
            what = e.get("method", "rewrite")
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


def summary(report: dict) -> str:
    m = report.get("model", {})
    lines = []
    if m:
        before, after = m["weight_bytes_before"], m["weight_bytes_after"]
        lines.append(f"weights: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({after / before:.1%}); "
                     f"{m['layers_rewritten']} layers rewritten at {m['rewritten_bpw']} bits per weight "
                     f"(codes + scales + zero points); whole model {m['model_bpw']} bits per parameter")
    v = report.get("verify")
    if v:
        for name, o in v["outputs"].items():
            if "cosine_mean" in o:
                lines.append(f"verify '{name}': max |Δ| {o['max_abs']:.3g}, max rel {o['max_rel']:.3g}, "
                             f"cosine mean {o['cosine_mean']:.5f} min {o['cosine_min']:.5f} "
                             f"({v['samples']} samples, {v['inputs']})")
            else:
                lines.append(f"verify '{name}': {o['mismatches']} mismatching elements")
    a = report.get("allocation")
    if a:
        goal = ", ".join(f"{k} {v}" for k, v in a["goal"].items())
        lines.append(f"allocate ({a['mode']}, {goal}): {a['bpw']:.3f} bits per weight over the selected layers; "
                     f"{a['metric']} degradation predicted {a['predicted']:.4g}, measured {a['measured']:.4g}"
                     f"{'' if a['met'] else ' - GOAL MISSED'}; {a['repairs']} repairs; "
                     f"Spearman predicted/measured {a['spearman'] if a['spearman'] is None else round(a['spearman'], 3)}")
    if report.get("calibration"):
        lines.append(f"calibration: {report['calibration']}")
    return "\n".join(lines)


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write the report atomically."""
    write_text(json.dumps(report, indent=2, default=str) + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a file atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".lrqgraph-report-", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
