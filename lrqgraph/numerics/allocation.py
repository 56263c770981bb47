"""Choosing one candidate per layer: a multiple-choice knapsack over (cost, loss) pairs.

Each layer l offers candidates c with a storage cost (bits) and a predicted loss (its share of the
end-to-end degradation, assumed additive over layers). Two questions:
  - ``within_budget``: the least total loss whose total cost fits a budget;
  - ``within_loss``: the least total cost whose total loss stays within a tolerance.
Both come from one dynamic programme over cost measured in ``units`` steps (costs rounded up, so
a solution never exceeds the budget it was given): f[u] = least loss for total cost ≤ u steps.
It is exact for integer costs when a step is one bit, and within one step per layer otherwise;
``within_budget`` then spends what the rounding left over on the upgrades that buy the most
loss per bit (127 layers rounded up to 1/4096 of the budget each leave up to 3% of it unused).
Work is O(layers × candidates × units), vectorised over units.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Allocation:
    choice: np.ndarray     # candidate index per layer
    cost: float            # total cost of the choice (unrounded)
    loss: float            # total loss of the choice


def _table(costs: list[np.ndarray], losses: list[np.ndarray], unit: float, units: int):
    best = np.zeros(units + 1)  # no layers yet: zero loss at any budget
    choices = np.zeros((len(costs), units + 1), np.int32)
    steps = []
    for layer, (cost, loss) in enumerate(zip(costs, losses)):
        step = np.ceil(np.asarray(cost, np.float64) / unit - 1e-9).astype(np.int64)
        steps.append(step)
        nxt = np.full(units + 1, np.inf)
        for c, (s, value) in enumerate(zip(step, loss)):
            if s > units:
                continue
            shifted = np.full(units + 1, np.inf)
            shifted[s:] = best[:units + 1 - s] + value
            better = shifted < nxt
            nxt[better] = shifted[better]
            choices[layer, better] = c
        best = nxt
    return best, choices, steps


def _trace(choices: np.ndarray, steps: list[np.ndarray], u: int) -> np.ndarray:
    picked = np.zeros(len(steps), np.int64)
    for layer in range(len(steps) - 1, -1, -1):
        c = choices[layer, u]
        picked[layer] = c
        u -= steps[layer][c]
    return picked


def _result(choice, costs, losses) -> Allocation:
    return Allocation(choice, float(sum(c[i] for c, i in zip(costs, choice))),
                      float(sum(v[i] for v, i in zip(losses, choice))))


def _check(costs, losses) -> None:
    if len(costs) != len(losses) or any(len(c) != len(v) or len(c) == 0 for c, v in zip(costs, losses)):
        raise ValueError("every layer needs at least one candidate, with one cost and one loss each")


def within_budget(costs: list[np.ndarray], losses: list[np.ndarray], budget: float,
                  units: int = 4096) -> Allocation | None:
    """Least total loss with total cost ≤ budget; None if even the cheapest choice does not fit."""
    _check(costs, losses)
    if sum(float(np.min(c)) for c in costs) > budget:
        return None
    best, choices, steps = _table(costs, losses, budget / units, units)
    if not np.isfinite(best[units]):
        # rounding costs up can lose a choice that fits exactly: then start from the cheapest per layer
        picked = np.array([int(np.argmin(c)) for c in costs])
    else:
        picked = _trace(choices, steps, units)
    return _result(_fill(picked, costs, losses, budget), costs, losses)


def _fill(picked: np.ndarray, costs: list[np.ndarray], losses: list[np.ndarray], budget: float) -> np.ndarray:
    """Greedy upgrades within the budget left over: each time, the one change of one layer's
    candidate that lowers the loss most per added bit and still fits."""
    picked = picked.copy()
    spent = sum(float(c[i]) for c, i in zip(costs, picked))
    while True:
        best, move = 0.0, None
        for layer, (cost, loss) in enumerate(zip(costs, losses)):
            added = cost - cost[picked[layer]]
            with np.errstate(invalid="ignore"):  # two priced-out (infinite-loss) candidates: no gain (nan)
                gain = loss[picked[layer]] - loss
            ok = (added <= budget - spent) & (gain > 0)
            if not ok.any():
                continue
            rate = np.where(ok, gain / np.maximum(added, 1e-12), 0.0)
            j = int(np.argmax(rate))
            if rate[j] > best:
                best, move = rate[j], (layer, j)
        if move is None:
            return picked
        layer, j = move
        spent += float(costs[layer][j] - costs[layer][picked[layer]])
        picked[layer] = j


def within_loss(costs: list[np.ndarray], losses: list[np.ndarray], max_loss: float,
                units: int = 4096) -> Allocation | None:
    """Least total cost with total loss ≤ max_loss; None if no choice is good enough."""
    _check(costs, losses)
    if sum(float(np.min(v)) for v in losses) > max_loss:
        return None
    unit = sum(float(np.max(c)) for c in costs) / units
    best, choices, steps = _table(costs, losses, unit, units + len(costs))
    fits = np.flatnonzero(best <= max_loss)
    return _result(_trace(choices, steps, int(fits[0])), costs, losses)


def frontier(costs: list[np.ndarray], losses: list[np.ndarray], points: int = 64,
             units: int = 4096) -> list[tuple[float, float]]:
    """(total cost, least total loss) at ``points`` budgets from the cheapest to the dearest choice."""
    _check(costs, losses)
    unit = sum(float(np.max(c)) for c in costs) / units
    slack = units + len(costs)  # rounding up adds at most one step per layer
    best, _, _ = _table(costs, losses, unit, slack)
    picks = np.unique(np.linspace(0, slack, points + 1).round().astype(int))
    return [(u * unit, float(best[u])) for u in picks if np.isfinite(best[u])]


def lower_hull(costs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Indices of the points on the lower convex hull of (cost, loss) from the cheapest point to
    the least loss: the points a knapsack's Lagrangian relaxation can pick, for any price of cost
    against loss (a point above the chord of two others is beaten by mixing them across layers)."""
    costs, losses = np.asarray(costs, np.float64), np.asarray(losses, np.float64)
    hull: list[int] = []
    for i in np.lexsort((losses, costs)):  # by cost, then loss
        if hull and losses[i] >= losses[hull[-1]]:
            continue  # no less loss for no less cost
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the chord from a to i: drop it (points on it stay)
            if (costs[b] - costs[a]) * (losses[i] - losses[a]) < (losses[b] - losses[a]) * (costs[i] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(int(i))
    return np.array(hull, np.int64)
