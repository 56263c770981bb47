"""The multiple-choice knapsack behind `allocate`, against brute force on problems with a known optimum."""
import itertools

import numpy as np
import pytest

from lrqgraph.numerics.allocation import frontier, within_budget, within_loss


def problem(seed, layers=5, options=4):
    rng = np.random.default_rng(seed)
    costs = [np.sort(rng.integers(1, 20, options)).astype(float) for _ in range(layers)]
    # more bits, less loss, with layer-specific sensitivity (as real layers)
    losses = [np.sort(rng.random(options))[::-1] * rng.uniform(0.1, 10) for _ in range(layers)]
    return costs, losses


def brute_force(costs, losses, budget=None, max_loss=None):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[i] for c, i in zip(costs, choice))
        loss = sum(v[i] for v, i in zip(losses, choice))
        if budget is not None and cost <= budget and (best is None or loss < best[1] - 1e-12):
            best = (cost, loss)
        if max_loss is not None and loss <= max_loss and (best is None or cost < best[0]):
            best = (cost, loss)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_budget_mode_finds_the_least_loss(seed):
    costs, losses = problem(seed)
    budget = float(sum(c.min() for c in costs) + 17)
    got = within_budget(costs, losses, budget, units=int(budget))  # one unit = one bit: exact
    cost, loss = brute_force(costs, losses, budget=budget)
    assert got.cost <= budget and got.loss == pytest.approx(loss)


@pytest.mark.parametrize("seed", range(8))
def test_loss_mode_finds_the_least_cost(seed):
    costs, losses = problem(seed)
    max_loss = float(sum(v.min() for v in losses) * 1.5 + 0.5)
    top = int(sum(c.max() for c in costs))
    got = within_loss(costs, losses, max_loss, units=top)
    cost, _ = brute_force(costs, losses, max_loss=max_loss)
    assert got.loss <= max_loss and got.cost == cost


def test_fractional_costs_never_exceed_the_budget_and_stay_near_the_optimum():
    rng = np.random.default_rng(0)
    costs = [rng.uniform(1, 9, 5) for _ in range(6)]
    losses = [np.sort(rng.random(5))[::-1] for _ in range(6)]
    budget = float(sum(c.mean() for c in costs))
    got = within_budget(costs, losses, budget)
    _, loss = brute_force(costs, losses, budget=budget)
    assert got.cost <= budget and got.loss <= loss + 0.05


def test_the_budget_rounding_leaves_is_spent_on_upgrades():
    """300 layers, each 100 bits or 101 bits at a lower loss, and a budget for every upgrade: with
    costs rounded up to 1/4096 of the budget (7.4 bits) the table affords no upgrade at all; the
    greedy fill after it upgrades every layer."""
    costs = [np.array([100.0, 101.0])] * 300
    losses = [np.array([1.0, 0.5])] * 300
    got = within_budget(costs, losses, 300 * 101.0)
    assert got.cost == 300 * 101.0 and got.loss == pytest.approx(150.0)
    # the fill takes the most loss per bit first: with room for one upgrade of two, the cheaper-per-gain one
    got = within_budget([np.array([10.0, 12.0]), np.array([10.0, 11.0])],
                        [np.array([1.0, 0.0]), np.array([1.0, 0.6])], 22.0, units=1)
    assert list(got.choice) == [1, 0] and got.cost == 22.0


def test_infeasible_goals_say_so():
    costs, losses = problem(1)
    assert within_budget(costs, losses, float(sum(c.min() for c in costs)) - 1) is None
    assert within_loss(costs, losses, float(sum(v.min() for v in losses)) * 0.5) is None


def test_frontier_is_monotone():
    costs, losses = problem(2)
    curve = frontier(costs, losses)
    assert all(b[0] > a[0] and b[1] <= a[1] + 1e-12 for a, b in zip(curve, curve[1:]))
    assert curve[-1][1] == pytest.approx(sum(v.min() for v in losses))


def test_lower_hull_drops_dominated_points_and_points_above_a_chord():
    from lrqgraph.numerics.allocation import lower_hull
    costs = [1, 2, 3, 4, 2.5, 2, 5]
    losses = [10, 5, 4, 0, 8, 6, 0]  # 3 lies above the chord 1 -> 4; 4.5 and (2, 6) are dominated; 5 adds no gain
    assert lower_hull(costs, losses).tolist() == [0, 1, 3]
    assert lower_hull([1, 2, 3], [2, 1, 0]).tolist() == [0, 1, 2]  # points on a chord stay
