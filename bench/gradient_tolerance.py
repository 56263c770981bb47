"""Gradient tolerance on a real labelled task: predicted vs measured task-loss change per layer.

    python bench/gradient_tolerance.py [--seed 0] [--out gradient_tolerance.md]

Model: MiniLM (torch, lrqgraph.testing.minilm) with the logistic-regression sentiment head of
bench/lossless_text.py, trained on a seeded half of Pang & Lee's 200 labelled sentences; the task
loss is the head's cross-entropy on the other 100. For every one of MiniLM's 36 nn.Linear weights
and each candidate (data-free round-to-nearest at 4, 3 and 2 bits, block 32, the ONNX path's
numerics), lrqgraph.torch.sensitivity predicts the loss change from one backward per labelled
sentence (ΔL ≈ g·Δ + ½ F·Δ²) and measures it by running the model with that layer replaced.
The table gives, per candidate, the Spearman rank correlation over the 36 layers of predicted
against measured, and the same over all 108 (layer, candidate) points.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lossless_text import polarity  # noqa: E402
from common import publish  # noqa: E402

from lrqgraph.config import FactorizeConfig  # noqa: E402
from lrqgraph.passes.factorize import factorize_weight  # noqa: E402
from lrqgraph.passes.tolerance import spearman  # noqa: E402
from lrqgraph.testing import minilm  # noqa: E402

CANDIDATES = [("rtn 4-bit b32", dict(bits=4)), ("rtn 3-bit b32", dict(bits=3)), ("rtn 2-bit b32", dict(bits=2))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="split of the sentences (as lossless_text.py's seeds)")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    import torch
    from sklearn.linear_model import LogisticRegression

    from lrqgraph.torch.sensitivity import gradient_stats, measured_loss_change

    torch.manual_seed(0)
    sentences, labels = polarity()
    feeds = minilm.encode(sentences)
    names = list(minilm.INPUT_NAMES)
    tensors = {n: torch.from_numpy(feeds[n]) for n in names}
    order = np.random.default_rng(100 + args.seed).permutation(len(labels))
    train, task = order[:len(order) // 2], order[len(order) // 2:]
    encoder = minilm.torch_module()
    with torch.no_grad():
        embeddings = encoder(*(tensors[n] for n in names)).numpy()
    fitted = LogisticRegression(C=10.0, max_iter=2000).fit(embeddings[train], labels[train])
    head = torch.nn.Linear(384, 2)
    with torch.no_grad():  # a binary head's one score z as the two logits (-z/2, z/2)
        head.weight.copy_(torch.from_numpy(np.vstack([-fitted.coef_, fitted.coef_]) / 2))
        head.bias.copy_(torch.from_numpy(np.concatenate([-fitted.intercept_, fitted.intercept_]) / 2))
    model = torch.nn.ModuleDict({"encoder": encoder, "head": head}).eval()

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *inputs):
            return self.inner["head"](self.inner["encoder"](*inputs))

    net = Classifier().eval()
    loss = torch.nn.functional.cross_entropy
    targets = torch.from_numpy(labels[task])
    rows_of = {n: tensors[n][task] for n in names}
    # one sentence at a time, cut to its own length (padding changes nothing but the cost)
    samples = []
    for i in range(len(task)):
        length = int(rows_of["attention_mask"][i].sum())
        samples.append((tuple(rows_of[n][i:i + 1, :length] for n in names), targets[i:i + 1]))
    batch = [(tuple(rows_of[n] for n in names), targets)]
    weights = [name for name, module in net.named_modules() if isinstance(module, torch.nn.Linear)
               and name.startswith("inner.encoder") and ".pooler" not in name]  # BERT's pooler is unused
    weights = [f"{name}.weight" for name in weights]
    start = time.perf_counter()
    stats = gradient_stats(net, loss, samples, weights)
    print(f"gradient statistics of {len(weights)} weights from {len(samples)} sentences in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    params = dict(net.named_parameters())
    predicted = {label: [] for label, _ in CANDIDATES}
    measured = {label: [] for label, _ in CANDIDATES}
    for name in weights:
        w = params[name].detach().numpy()
        for label, fields in CANDIDATES:
            rep, why = factorize_weight(np.ascontiguousarray(w.T), FactorizeConfig("rtn", block_size=32, **fields))
            if rep is None:
                raise SystemExit(f"{name}: {why}")
            w_hat = rep.dequantize().T
            predicted[label].append(sum(stats[name].predict(w_hat - w)))
            measured[label].append(measured_loss_change(net, loss, batch, name, w_hat))
        print(name, {label: (f"{predicted[label][-1]:+.3g}", f"{measured[label][-1]:+.3g}") for label, _ in CANDIDATES},
              flush=True)
    rows = []
    for label, _ in CANDIDATES:
        p, m = np.array(predicted[label]), np.array(measured[label])
        rows.append([label, str(len(p)), f"{spearman(list(p), list(m)):.3f}", f"{np.median(np.abs(m)):.3g}",
                     f"{np.max(m):.3g}", f"{np.median(np.abs(p - m) / np.maximum(np.abs(m), 1e-12)):.2f}"])
    every_p = [v for label, _ in CANDIDATES for v in predicted[label]]
    every_m = [v for label, _ in CANDIDATES for v in measured[label]]
    rows.append(["all candidates", str(len(every_p)), f"{spearman(every_p, every_m):.3f}", "", "", ""])
    publish(f"MiniLM + logistic-regression head · split seed {args.seed}: 100 sentences train the head, the task "
            f"loss is its cross-entropy on the other 100 · {len(weights)} nn.Linear weights",
            ["candidate", "layers", "Spearman (predicted vs measured ΔL)", "median |measured ΔL|",
             "largest measured ΔL", "median |relative error|"], rows, args.out)


if __name__ == "__main__":
    main()
