"""Budget parsing and the budget solver (pure: no torch models, no graphs)."""

import itertools
import random

import pytest

from sketchpass.budget import Budget, Candidate, InfeasibleBudgetError, solve


def test_budget_parsing_and_validation():
    assert Budget.parse("params=0.5") == Budget(params=0.5)
    assert Budget.parse(" params=0.5 , flops=0.7 ") == Budget(params=0.5, flops=0.7)
    assert Budget.parse("flops=60%") == Budget(flops=0.6)
    assert Budget.parse("params=2e6").params == 2e6
    assert Budget(params=0.5).limits({"params": 1000, "flops": 10}) == {"params": 500}
    assert Budget(params=300, flops=0.5).limits({"params": 1000, "flops": 10}) == {"params": 300, "flops": 5}
    for bad, msg in [("params", "expected KEY=VALUE"), ("size=0.5", "unknown key 'size'"),
                     ("params=abc", "'abc' is not a number"), ("", "is empty"),
                     ("params=0.5,params=0.4", "given twice"), ("params=-1", "must be > 0")]:
        with pytest.raises(ValueError, match=msg):
            Budget.parse(bad)
    with pytest.raises(ValueError, match="at least one limit"):
        Budget()
    with pytest.raises(TypeError, match="must be a number"):
        Budget(params="0.5")


def _convex_layer(rng, dense_cost, n_forms=6, flops_ratio=None):
    """Dense (loss 0) plus factored forms with a convex decreasing error curve, like real layers."""
    cands = [Candidate({"params": dense_cost, "flops": dense_cost * (flops_ratio or 1.0)}, 0.0)]
    scale = rng.uniform(0.1, 10)
    decay = rng.uniform(1.0, 4.0)
    for i in range(1, n_forms + 1):
        frac = i / (n_forms + 1)
        cost = dense_cost * frac
        loss = scale * (1 - frac) ** decay
        cands.append(Candidate({"params": cost, "flops": cost * rng.uniform(0.5, 2.0) * (flops_ratio or 1.0)}, loss))
    return cands


def _brute_force(layers, limits, fixed):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in layers]):
        if all(fixed.get(u, 0) + sum(layers[i][c].cost[u] for i, c in enumerate(choice)) <= limits[u] + 1e-9
               for u in limits):
            loss = sum(layers[i][c].loss for i, c in enumerate(choice))
            if best is None or loss < best:
                best = loss
    return best


@pytest.mark.parametrize("two_units", [False, True])
def test_solver_is_feasible_and_near_optimal_against_brute_force(two_units):
    rng = random.Random(0)
    gaps = []
    for _trial in range(40):
        layers = [_convex_layer(rng, rng.choice([100, 200, 400]), n_forms=4) for _ in range(5)]
        total = sum(c[0].cost["params"] for c in layers)
        limits = {"params": rng.uniform(0.3, 0.8) * total + 50}
        fixed = {"params": 50.0, "flops": 50.0}
        if two_units:
            total_f = sum(c[0].cost["flops"] for c in layers)
            limits["flops"] = rng.uniform(0.4, 0.9) * total_f + 50
        opt = _brute_force(layers, limits, fixed)
        if opt is None:
            with pytest.raises(InfeasibleBudgetError):
                solve(layers, limits, fixed)
            continue
        choice = solve(layers, limits, fixed)
        for u in limits:
            assert fixed[u] + sum(layers[i][c].cost[u] for i, c in enumerate(choice)) <= limits[u] + 1e-9
        loss = sum(layers[i][c].loss for i, c in enumerate(choice))
        assert loss >= opt - 1e-12
        gaps.append(loss - opt)
        assert loss <= opt * 1.5 + 0.05 * max(c.loss for layer in layers for c in layer)
    # optimal in most instances: the Lagrangian + greedy fill alone found 28/40 and 32/40 here; the
    # pairwise swap search lifts that to 35/40 and 36/40
    assert sum(g < 1e-9 for g in gaps) >= 0.85 * len(gaps)


def test_solver_prefers_cheap_error_where_it_is_cheap():
    # layer A: compressing costs little loss; layer B: a lot.  A budget for one of them must pick A.
    A = [Candidate({"params": 100}, 0.0), Candidate({"params": 10}, 0.01)]
    B = [Candidate({"params": 100}, 0.0), Candidate({"params": 10}, 5.0)]
    assert solve([A, B], {"params": 120}) == [1, 0]
    assert solve([B, A], {"params": 120}) == [0, 1]


def test_solver_fills_slack_with_upgrades():
    layers = [[Candidate({"params": 100}, 0.0), Candidate({"params": 50}, 1.0), Candidate({"params": 10}, 3.0)]
              for _ in range(3)]
    choice = solve(layers, {"params": 200})
    used = sum(layers[i][c].cost["params"] for i, c in enumerate(choice))
    assert used <= 200 and used >= 160  # greedy fill spends what it can


def test_infeasible_budget_states_the_smallest_achievable_value():
    layers = [[Candidate({"params": 100}, 0.0), Candidate({"params": 40}, 1.0)] for _ in range(2)]
    with pytest.raises(InfeasibleBudgetError, match=r"smallest achievable is 110 .*outside the factorable layers: 30"):
        solve(layers, {"params": 100}, {"params": 30})
