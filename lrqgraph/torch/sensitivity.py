"""Gradient tolerance: the task loss's change under a weight perturbation, predicted from gradients.

For a layer whose weight W is replaced by Ŵ = W + Δ, the task loss L (a mean over samples) moves by

    ΔL ≈ Σ g ⊙ Δ + ½ Σ F ⊙ Δ²

with g the gradient of L at W and F the diagonal of the empirical Fisher, the mean over samples of
each sample's squared gradient (a positive stand-in for the Hessian near a trained optimum; the
joint low-rank paper's first- and second-order terms). Both come from one pass over labelled data
with one backward per sample; any candidate Ŵ of any family is then scored without running the
model. :func:`measured_loss_change` runs the model with Ŵ in place, to check the prediction.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GradientStats:
    """g (mean gradient) and F (mean squared per-sample gradient) of one weight, in its torch layout."""
    gradient: np.ndarray
    fisher: np.ndarray

    def predict(self, delta: np.ndarray) -> tuple[float, float]:
        """(first-order, second-order) loss change for a perturbation Δ of the weight."""
        delta = np.asarray(delta, np.float64)
        return float((self.gradient * delta).sum()), float(0.5 * (self.fisher * delta * delta).sum())


def gradient_stats(module: nn.Module, loss_fn: LossFn, samples: Iterable[tuple[tuple, torch.Tensor]],
                   weights: list[str]) -> dict[str, GradientStats]:
    """g and F for each named parameter in ``weights`` (e.g. "fc1.weight"), from ``samples`` of
    (inputs tuple, target), one sample each (a leading batch axis of 1)."""
    params = dict(module.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise KeyError(f"no parameter named {missing}")
    chosen = [params[w] for w in weights]
    first = [torch.zeros_like(p, dtype=torch.float64) for p in chosen]
    second = [torch.zeros_like(p, dtype=torch.float64) for p in chosen]
    count = 0
    was_training = module.training
    module.eval()
    try:
        for inputs, target in samples:
            grads = torch.autograd.grad(loss_fn(module(*inputs), target), chosen)
            for f, s, g in zip(first, second, grads):
                g = g.detach().to(torch.float64)
                f += g
                s += g * g
            count += 1
    finally:
        module.train(was_training)
    if not count:
        raise ValueError("gradient_stats needs at least one sample")
    return {w: GradientStats((f / count).cpu().numpy(), (s / count).cpu().numpy())
            for w, f, s in zip(weights, first, second)}


def measured_loss_change(module: nn.Module, loss_fn: LossFn, batches: list[tuple[tuple, torch.Tensor]],
                         weight: str, replacement: np.ndarray) -> float:
    """Mean loss over ``batches`` with ``weight`` replaced (a copy of the module), minus the original's."""
    changed = copy.deepcopy(module).eval()
    target = dict(changed.named_parameters())[weight]
    with torch.no_grad():
        target.copy_(torch.from_numpy(np.asarray(replacement, np.float32)).reshape(target.shape))
    return _mean_loss(changed, loss_fn, batches) - _mean_loss(module, loss_fn, batches)


def _mean_loss(module: nn.Module, loss_fn: LossFn, batches: list[tuple[tuple, torch.Tensor]]) -> float:
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, target in batches:
            n = len(target)
            total += float(loss_fn(module(*inputs), target)) * n
            count += n
    module.train(was_training)
    return total / count
