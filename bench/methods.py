"""Every method on every MiniLM and EfficientNet-Lite0 weight matrix, with H from real inputs
(sentences; bundled photos), at fixed bit budgets.

For each budget (2.5, 3, 3.5, 4, 5 bits per weight, counting codes, scales, zero points and
codebooks) and each method, the best setting of that method within the budget is chosen per
budget (one setting for all layers) and the table prints the mean over the 36 layers of the
relative Frobenius error, the activation-aware error sqrt(tr(ΔWᵀHΔW)/tr(WᵀHW)) and the time. The
RTN frontier is the best RTN setting within each budget. A synthetic suite with known spectra
follows; the last lines are one SUMMARY line per budget.

    python bench/methods.py [--layers N] [--budgets 3,4] [--skip-synthetic] [--skip-efficientnet] [--skip-e2e]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))

import lrqgraph  # noqa: E402
from lrqgraph.hessian import collect_hessians  # noqa: E402
from lrqgraph.numerics import (HessianInfo, QuantSpec, activation_error, gptq_factorize,  # noqa: E402
                               lplr_factorize, qlr_factorize, relative_error, rtn_factorize, svd_factorize)
from lrqgraph.numerics.kashin import kashin_quantize  # noqa: E402
from lrqgraph.numerics.lowrank import rank_for_bpw  # noqa: E402
from lrqgraph.numerics.quant import spec_storage_bits  # noqa: E402
from lrqgraph.report import table  # noqa: E402
from lrqgraph.testing import data, minilm  # noqa: E402

BUDGETS = (2.5, 3.0, 3.5, 4.0, 5.0)


def rtn_specs():
    """Every RTN grid a budget may pick from (fp16 scales: the cheapest a runtime can take)."""
    for bits in (2, 3, 4, 5, 6, 8):
        for block in (16, 32, 64, 128, 0):
            for sym in (True, False):
                yield QuantSpec(bits, block, sym, clip_search=True, scale_dtype="float16")


def dense_specs_within(shapes: list[tuple[int, int]], budget: float) -> list[QuantSpec]:
    """Uniform grids whose storage over all the layers fits ``budget`` bits per weight."""
    total = sum(k * n for k, n in shapes)
    return [s for s in rtn_specs() if sum(spec_storage_bits(k, n, s) for k, n in shapes) <= budget * total]


def candidates(budget: float, k: int, n: int, dense: list[QuantSpec]):
    """(family, label, factorize callable) settings for a K×N weight: the dense grids that fit the
    budget over the whole model, and low-rank settings whose rank fills the budget per layer."""
    out = []
    # RTN frontier: every fitting grid (the table keeps the best); GPTQ on the widest-bits fits
    for s in dense:
        out.append(("rtn", f"rtn {s.bits}b g{s.block_size or 'ch'} {'sym' if s.symmetric else 'asym'}",
                    lambda w, h, s=s: rtn_factorize(w, s)))
    top = sorted(dense, key=lambda s: (s.bits, -s.block_size if s.block_size else -10**6))[-4:]
    for s in top:
        for sweeps in (0, 4):
            out.append(("gptq", f"gptq {s.bits}b g{s.block_size or 'ch'} {'sym' if s.symmetric else 'asym'}"
                                f"{f' +{sweeps} cd' if sweeps else ''}",
                        lambda w, h, s=s, sw=sweeps: gptq_factorize(w, s, h, sw)))
    # Q + L·R: a coarser Q (GPTQ with H) and the rest of the budget as low-rank factors
    for qbits in sorted({min(max(int(budget) - 1, 2), 4), min(int(budget), 4)}):
        for block in (32, 64):
            qspec = QuantSpec(qbits, block, True, True, "float16")
            for lr_bits in (4, 8):
                lr = QuantSpec(lr_bits, 64, False, False, "float16")
                rank = rank_for_bpw(k, n, budget, lr, lr, fixed_bits=spec_storage_bits(k, n, qspec))
                if rank:
                    out.append(("qlr", f"qlr q{qbits}b g{block} +4 cd + {lr_bits}b factors",
                                lambda w, h, q=qspec, r=rank, lr=lr: qlr_factorize(
                                    w, r, q, lr, h=h, iters=3, sweeps=4, per_iter_sweeps=True)))
    for bits in (4, 8):
        spec = QuantSpec(bits, 64, False, False, "float16")
        rank = rank_for_bpw(k, n, budget, spec, spec)
        if rank:
            out.append(("svd", f"svd {bits}b factors", lambda w, h, r=rank, s=spec: svd_factorize(w, r, s, s)))
            out.append(("lplr", f"lplr {bits}b factors", lambda w, h, r=rank, s=spec: lplr_factorize(w, r, s, s)))
            out.append(("lplr-aw", f"lplr-svd+aw {bits}b factors refit2",
                        lambda w, h, r=rank, s=spec: lplr_factorize(w, r, s, s, h=h, init="svd", refits=2)))
    kbits = int(np.floor(budget))
    if 2 <= kbits <= 6:
        out.append(("kashin", f"kashin {kbits}b hadamard", lambda w, h, b=kbits: kashin_quantize(w, b, "hadamard")))
    return out


def minilm_layers(limit: int | None):
    fp32 = minilm.onnx_path()
    layers = [entry for entry in lrqgraph.run(fp32, passes="discover").report["layers"] if entry["action"] == "rewrite"]
    model = onnx.load(str(fp32))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    inputs = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            inputs[node.input[1]] = node.input[0]
    layers = layers[:limit] if limit else layers
    sentences = data.kjv_sentences(128, start=1)  # calibration set, disjoint from evaluation verses
    batches = (minilm.encode(sentences[i:i + 16]) for i in range(0, len(sentences), 16))
    hs = collect_hessians(fp32, {e["weight"]: inputs[e["weight"]] for e in layers}, batches,
                          mask_input="attention_mask")
    return fp32, [(e["name"], weights[e["weight"]], hs[e["weight"]], e["weight"]) for e in layers]


def efficientnet_layers(limit: int | None):
    """Pointwise (1x1, group 1) convolutions and the classifier Gemm of EfficientNet-Lite0, as
    MatMul-layout matrices [C_in, C_out], with H from real photos (8 crops of 5 photos)."""
    from lrqgraph.testing import efficientnet

    path = efficientnet.onnx_path()
    model = onnx.load(str(path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    layers, inputs = [], {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            continue
        if node.op_type == "Conv" and attrs.get("group", 1) == 1 and w.shape[2:] == (1, 1):
            matrix = w[:, :, 0, 0].T
        elif node.op_type == "Gemm":
            matrix = w.T if attrs.get("transB", 0) else w
        else:
            continue
        if matrix.size >= 4096:
            layers.append((node.name, np.ascontiguousarray(matrix, np.float32), node.input[1]))
            inputs[node.input[1]] = node.input[0]
    layers = layers[:limit] if limit else layers
    photos = efficientnet.photo_batch(crops_per_photo=8)
    hs = collect_hessians(path, {w: inputs[w] for _, _, w in layers},
                          ({"image": photos[i:i + 8]} for i in range(0, len(photos), 8)))
    return [(name, m, hs[w], w) for name, m, w in layers]


def run_suite(name: str, layers, budgets, record=None):
    """Prints one table per budget; returns {budget: {method: (mean aerr, mean rerr, label, bpw, s)}}.

    bpw is the mean over layers; dense grids fit the budget over the model as a whole.
    """
    results = {}
    for budget in budgets:
        stats = {}  # label -> lists
        dense = dense_specs_within([w.shape for _, w, _, _ in layers], budget)
        for lname, w, h, _ in layers:
            info = HessianInfo(h)
            for family, label, fn in candidates(budget, *w.shape, dense):
                start = time.perf_counter()
                rep = fn(w, info)
                seconds = time.perf_counter() - start
                approx = rep.dequantize()
                s = stats.setdefault((family, label), {"aerr": [], "rerr": [], "s": [], "bpw": []})
                s["aerr"].append(activation_error(w, approx, h))
                s["rerr"].append(relative_error(w, approx))
                s["s"].append(seconds)
                s["bpw"].append(rep.bits_per_weight())
                if record is not None:
                    record.setdefault((budget, label), {})[lname] = approx
        # complete settings only (a setting that does not fit some layer is dropped)
        full = {k: v for k, v in stats.items() if len(v["aerr"]) == len(layers)}
        best = {}
        for (family, label), v in full.items():
            aerr = float(np.mean(v["aerr"]))
            if family not in best or aerr < best[family][0]:
                best[family] = (aerr, float(np.mean(v["rerr"])), label, float(np.mean(v["bpw"])), float(np.sum(v["s"])))
        frontier = best["rtn"][0]
        rows = [[fam, lab, f"{bpw:.3f}", f"{rerr:.4f}", f"{aerr:.4f}", f"{aerr / frontier:.3f}", f"{sec:.2f}"]
                for fam, (aerr, rerr, lab, bpw, sec) in sorted(best.items(), key=lambda kv: kv[1][0])]
        print(f"\n{name} - budget {budget} bits per weight ({len(layers)} layers; best setting of each method)")
        print(table(["method", "setting", "bpw", "rel.err", "act.err", "vs RTN", "seconds"], rows))
        results[budget] = best
    return results


def synthetic_layers(seed: int = 0):
    rng = np.random.default_rng(seed)
    k, n = 512, 512
    x = rng.standard_normal((2048, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    h = x.T @ x
    u, _ = np.linalg.qr(rng.standard_normal((k, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    idx = np.arange(min(k, n))
    fast = (u * np.exp(-idx / 20)) @ v.T
    slow = (u * (1 + idx) ** -0.5) @ v.T
    heavy = rng.standard_t(3, (k, n))
    return [(name, m.astype(np.float32), h, name) for name, m in
            [("fast decay", fast), ("slow decay", slow), ("heavy tails", heavy)]]


def embed_cosine(fp32, approx_by_weight: dict[str, np.ndarray]) -> tuple[float, float]:
    """End-to-end embedding cosine with the weights replaced by their approximations."""
    model = onnx.load(str(fp32))
    for t in model.graph.initializer:
        if t.name in approx_by_weight:
            t.CopyFrom(onnx.numpy_helper.from_array(approx_by_weight[t.name].astype(np.float32), t.name))
    sentences = data.kjv_sentences(200, start=0)
    ref = minilm.embed(str(fp32), sentences)
    cos = minilm.cosines(ref, minilm.embed(model.SerializeToString(), sentences))
    return float(cos.mean()), float(cos.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help="only the first N MiniLM layers (quick runs)")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-efficientnet", action="store_true")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    if not args.skip_synthetic:
        for layer in synthetic_layers():
            run_suite(f"synthetic 512x512, {layer[0]}", [layer], budgets)
    if not args.skip_efficientnet:
        run_suite("EfficientNet-Lite0 (1x1 convs + classifier)", efficientnet_layers(args.layers), budgets)
    fp32, layers = minilm_layers(args.layers)
    record: dict = {}
    results = run_suite("MiniLM", layers, budgets, record)
    summaries = []
    print()
    for budget in budgets:
        best = results[budget]
        family = min((f for f in best if f != "rtn"), key=lambda f: best[f][0])
        aerr, _, label, _, _ = best[family]
        frontier = best["rtn"][0]
        if not args.skip_e2e and len(layers) == 36:
            approx = {weight: record[(budget, label)][lname] for lname, _, _, weight in layers}
            rtn_approx = {weight: record[(budget, best["rtn"][2])][lname] for lname, _, _, weight in layers}
            cm, cmin = embed_cosine(fp32, approx)
            rm, rmin = embed_cosine(fp32, rtn_approx)
            print(f"E2E budget={budget:g} setting='{label}' cosine mean/min {cm:.4f}/{cmin:.4f}; "
                  f"RTN frontier '{best['rtn'][2]}' {rm:.4f}/{rmin:.4f} (200 KJV verses)")
        summaries.append(f"SUMMARY budget={budget:g} best={family} aerr={aerr:.4f} rtn_frontier={frontier:.4f} "
                         f"ratio={aerr / frontier:.3f}")
    print("\n".join(summaries))


if __name__ == "__main__":
    main()
