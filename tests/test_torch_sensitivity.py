"""Gradient tolerance: predicted loss changes follow measured ones on a real labelled task."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets", reason="needs the examples extra (scikit-learn)")

from lrqgraph.config import FactorizeConfig  # noqa: E402
from lrqgraph.passes.factorize import factorize_weight  # noqa: E402
from lrqgraph.torch.sensitivity import gradient_stats, measured_loss_change  # noqa: E402

LOSS = torch.nn.functional.cross_entropy
WEIGHTS = ["0.weight", "2.weight", "4.weight"]


@pytest.fixture(scope="module")
def digits_mlp():
    """An MLP trained on scikit-learn's handwritten digits (real 8x8 scans), and 300 held-out digits."""
    torch.manual_seed(0)
    d = datasets.load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    perm = torch.randperm(len(x))
    train, held = perm[:1200], perm[1200:1500]
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        i = train[torch.randint(0, len(train), (64,))]
        opt.zero_grad()
        LOSS(net(x[i]), y[i]).backward()
        opt.step()
    net.eval()
    assert float((net(x[held]).argmax(1) == y[held]).float().mean()) > 0.9  # a trained model, not a toy
    return net, x[held], y[held]


def _ranks(v):
    return np.argsort(np.argsort(v))


def test_small_perturbations_are_predicted_to_first_order(digits_mlp):
    net, x, y = digits_mlp
    stats = gradient_stats(net, LOSS, [((x[i:i + 1],), y[i:i + 1]) for i in range(len(x))], ["2.weight"])
    w = net[2].weight.detach().numpy()
    delta = 1e-3 * np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
    first, second = stats["2.weight"].predict(delta)
    measured = measured_loss_change(net, LOSS, [((x,), y)], "2.weight", w + delta)
    # Δ of 1e-3: the second-order term is negligible, the first carries the change (measured: 0.4% apart)
    assert abs(second) < 0.05 * abs(first)
    assert measured == pytest.approx(first + second, rel=0.1)


def test_predicted_loss_changes_rank_like_measured_ones_across_layers_and_families(digits_mlp):
    net, x, y = digits_mlp
    stats = gradient_stats(net, LOSS, [((x[i:i + 1],), y[i:i + 1]) for i in range(len(x))], WEIGHTS)
    predicted, measured = [], []
    for name in WEIGHTS:
        w = dict(net.named_parameters())[name].detach().numpy()
        for bits in (2, 3, 4):
            for method, extra in (("rtn", {"block_size": 32}), ("lplr", {"rank": 8})):
                rep, why = factorize_weight(np.ascontiguousarray(w.T), FactorizeConfig(method, bits=bits, **extra))
                assert rep is not None, why
                w_hat = rep.dequantize().T
                predicted.append(sum(stats[name].predict(w_hat - w)))
                measured.append(measured_loss_change(net, LOSS, [((x,), y)], name, w_hat))
    spearman = np.corrcoef(_ranks(predicted), _ranks(measured))[0, 1]
    assert spearman >= 0.8  # measured 0.89 over these 18 candidates (issue [8] asks ≥ 0.8)


def test_unknown_weights_are_refused(digits_mlp):
    net, x, y = digits_mlp
    with pytest.raises(KeyError, match="fc9.weight"):
        gradient_stats(net, LOSS, [((x[:1],), y[:1])], ["fc9.weight"])
