"""The allocation's latency budget: candidates whose lowered form would run slower than the budget
allows are dropped before the knapsack (allocate), from the measured cost table (lrqgraph.latency).

The budget is per layer, at two row counts (``rows_for``: one calibration sample's rows and eight
samples'; a decoder's one-token step and a 128-token prefill): a candidate stays when its form is
no slower than the layer written as onnxruntime's own quantizer writes it (MatMulNBits, 4-bit,
block 32, at the run's accuracy level) and, with ``max_latency``, no slower than that ratio of the
float layer. Per-layer limits bound the sum, so the rewritten layers together stay within the
reference whatever the knapsack picks; keeping a layer in float is always allowed (it is the
original). A convolution keeps its one-grid candidates, which run as the original convolution
(lower rule 7), and drops the others (conv_screen); embedding tables at their fixed grid are
outside the budget.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from lrqgraph import kvcache
from lrqgraph.latency import CostTable, Form, float_form, form_of, last_level_cache_bytes
from lrqgraph.numerics import QuantizedTensor, Representation
from lrqgraph.passmanager import Context

from .lower import FOLD, RULES, layer_model, layer_target
from .tolerance import LayerTolerance

log = logging.getLogger(__name__)

REFERENCE = "onnxruntime's 4-bit RTN (MatMulNBits block 32)"
# a form within this fraction above the limit still passes: repeated tables time one form a few %
# apart on this 2-core VM (lrqgraph.latency.QUANTILE), and two forms within it are not told apart
SLACK = 0.05
# a one-layer timing of a compute-bound form misses its time inside the model by up to 10-20%
# (MiniLM's FFN MatMulNBits: 0.93-1.02x the float layer alone, 1.2x in the model): the target's
# kernels replace the float MatMul only where they are faster by more than that
SPREAD = 0.1
DECODER_ROWS = (1, 128)  # a decoder's one-token step and a 128-token prefill


@dataclasses.dataclass
class LatencyBudget:
    """What the budget allowed and what the choice is estimated to cost (the report's "latency")."""

    rows: tuple[int, ...]
    reference: str
    max_latency: float | None
    dropped: dict[str, int]                # candidates dropped, by family
    layers: list[tuple[Form, Form] | None]  # per layer: its (float, reference) forms; None: not timed
    table: CostTable = dataclasses.field(repr=False)
    forms: dict[tuple[int, str], Form] = dataclasses.field(default_factory=dict, repr=False)

    def estimate(self, tols: list[LayerTolerance], choice: list[int]) -> dict[str, dict[str, float]]:
        """Per row count: the timed layers' total ms in float, as the reference, and as chosen."""
        out = {}
        for m in self.rows:
            total = {"float": 0.0, "reference": 0.0, "chosen": 0.0}
            for i, (t, c) in enumerate(zip(tols, choice)):
                if (i, t.candidates[c].label) not in self.forms:
                    continue
                fp32, reference = self.layers[i][:2]
                total["float"] += self.table.ms(fp32, m)
                total["reference"] += self.table.ms(reference, m)
                total["chosen"] += self.table.ms(self.forms[i, t.candidates[c].label], m)
            out[str(m)] = {k: round(v, 4) for k, v in total.items()}
        return out


def rows_for(ctx: Context) -> tuple[int, ...]:
    """The row counts the budget holds at: a decoder's (DECODER_ROWS), else one calibration sample's
    rows (the median over the matrix products, rounded up to a power of two) and eight samples'."""
    if kvcache.past_inputs(ctx.model.graph):
        return DECODER_ROWS
    data = ctx.analysis("calib_data")
    parts = ctx.analysis("hessian_parts") if data is not None else []
    # matrix products only: a convolution's rows are its pixels
    timed = {layer.weight for layer in ctx.analysis("layers") if layer.matmuls and not layer.kernel}
    per_layer = [sum(p.rows.get(w, 0) or 0 for p in parts) / max(data.samples, 1)
                 for w in (parts[0].rows if parts else ()) if w in timed]
    one = int(2 ** np.ceil(np.log2(max(np.median(per_layer), 1.0)))) if per_layer else 1
    return (one, 8 * one)


def reference_rep(k: int, n: int) -> Representation:
    """The layer as onnxruntime's quantizer writes it: symmetric 4-bit codes, blocks of 32, float16
    scales (random values: time does not depend on them)."""
    rng = np.random.default_rng(0)
    q = QuantizedTensor(codes=rng.integers(0, 16, (k, n), dtype=np.uint8),
                        scales=(rng.random((-(-k // 32), n)) * 0.01).astype(np.float16), zero_points=None,
                        bits=4, block_size=32)
    return Representation(((q,),), "rtn")


def screen(ctx: Context, cfg, tols: list[LayerTolerance]) -> tuple[list[LayerTolerance], LatencyBudget | None]:
    """``tols`` without the candidates the budget drops, and the budget (None when it is off)."""
    if not cfg.latency_budget:
        return tols, None
    target, level = ctx.config.lowering, ctx.config.accuracy_level
    rows = tuple(cfg.latency_rows) or rows_for(ctx)
    # a model larger than the last-level cache reads each layer's weights from memory: time them so
    table = CostTable(cold=ctx.model.constant_bytes() > last_level_cache_bytes())
    builders, forms, layers = {}, {}, {}
    for i, t in enumerate(tols):
        if not t.budgeted or t.layer.kernel or not t.layer.matmuls:  # (convolutions: see conv_screen)
            continue
        dtype = str(np.dtype(t.layer.dtype))
        k, n = t.layer.shape
        reference = reference_rep(k, n)
        layers[i] = (float_form(k, n, dtype), form_of(reference, "ort", level, dtype))
        builders[layers[i][1]] = lambda r=reference, d=dtype: layer_model(r, "ort", level, d)
        for c in t.candidates:
            if c.rep is None:
                forms[i, c.label] = layers[i][0]
                continue
            lowering = layer_target(t.layer, target, c.rep)
            forms[i, c.label] = form_of(c.rep, lowering, level, dtype)
            builders.setdefault(forms[i, c.label], lambda r=c.rep, low=lowering, d=dtype: layer_model(r, low, level, d))
    todo = table.missing(builders, rows)
    if todo:
        log.info("allocate: timing %d new layer forms at %s rows (cached in %s)", len(todo),
                 " and ".join(map(str, rows)), table.path)
        table.measure(builders, rows)
    dropped: dict[str, int] = {}
    screened = []
    for i, t in enumerate(tols):
        if t.budgeted and t.layer.kernel:
            screened.append(conv_screen(t, dropped))
            continue
        if i not in layers:
            screened.append(t)
            continue
        fp32, reference = layers[i]
        cap = cfg.max_latency if cfg.max_latency is not None else float("inf")
        limits = {m: min(table.ratio(reference, m), cap) * (1 + SLACK) for m in rows}
        kept = []
        for c in t.candidates:
            if c.rep is None:
                kept.append(c)
                continue
            # the weight rebuilt in float when the session loads (the float MatMul's own time,
            # lower.FOLD) where it fits the budget, unless the target's kernels fit and are faster
            # by more than the timings' spread
            form = forms[i, c.label]
            fits = {f: all(table.ratio(f, m) <= limits[m] for m in rows) for f in (form, fp32)}
            faster = sum(table.ratio(form, m) for m in rows) <= (1 - SPREAD) * len(rows)
            foldable = (c.rep.form, FOLD) in RULES and not t.layer.gathers
            if foldable and fits[fp32] and not (faster and fits[form]):
                forms[i, c.label] = fp32
                kept.append(dataclasses.replace(c, lowering=FOLD))
            elif fits[form]:
                kept.append(c)
            else:
                dropped[c.family] = dropped.get(c.family, 0) + 1
        screened.append(dataclasses.replace(t, candidates=kept))
    budget = LatencyBudget(rows, REFERENCE, cfg.max_latency, dropped,
                           [layers.get(i) for i in range(len(tols))], table, forms)
    log.info("allocate: latency budget (no slower than %s%s at %s rows) drops %d candidates (%s)", REFERENCE,
             f", at most {cfg.max_latency:g}x float" if cfg.max_latency is not None else "",
             " and ".join(map(str, rows)), sum(dropped.values()),
             ", ".join(f"{f} {n}" for f, n in sorted(dropped.items())) or "none")
    return screened, budget


def conv_screen(t: LayerTolerance, dropped: dict[str, int]) -> LayerTolerance:
    """A convolution's one-grid candidates run as the original convolution once the session has
    folded their codes (lower rule 7): the same run time. Candidates of two or more factors add
    convolutions, and their time depends on the input's size, which is not timed: they are dropped.
    (EfficientNet-Lite0 at --target-bpw 4 with them: 1.39x the float model at batch 1.)"""
    kept = []
    for c in t.candidates:
        if c.rep is None or c.rep.form == "dense":
            kept.append(c)
        else:
            dropped[c.family] = dropped.get(c.family, 0) + 1
    return dataclasses.replace(t, candidates=kept)
