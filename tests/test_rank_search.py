"""Rank allocation maths (pifa.rank_search): budgets, optimality against brute force, knapsack."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from pifa.rank_search import (
    LayerBudget,
    discarded_energy,
    discretise_costs,
    knapsack_choice,
    lagrangian_ranks,
    lagrangian_relaxation,
)

TOL = 1e-9


def cost(layer: LayerBudget, rank: int) -> int:
    """Independent restatement of the parameter count (not the module's)."""
    m, n = layer.out_features, layer.in_features
    return rank * (m + n - rank) if layer.kind == "pifa" else rank * (m + n)


def total_cost(layers, ranks) -> int:
    return sum(cost(layer, ranks[layer.name]) for layer in layers)


def objective(layers, ranks) -> float:
    return sum(layer.weight * float(layer.energy[ranks[layer.name]]) for layer in layers)


def allowed(layer: LayerBudget, multiple_of: int) -> list[int]:
    high = len(layer.energy) - 1 if layer.max_rank is None else layer.max_rank
    return [r for r in range(layer.min_rank, high + 1) if r % multiple_of == 0]


def brute_optimum(layers, budget: float, multiple_of: int = 1) -> float:
    """Minimal objective over every allowed allocation whose cost fits (inf if none)."""
    best = math.inf
    for ranks in itertools.product(*(allowed(layer, multiple_of) for layer in layers)):
        choice = {layer.name: r for layer, r in zip(layers, ranks)}
        if total_cost(layers, choice) <= budget:
            best = min(best, objective(layers, choice))
    return best


def lagrangian_pick(layers, lam: float) -> dict[str, int]:
    """Each layer's first (smallest) rank minimising w e(r) + lam cost(r), by plain enumeration."""
    return {
        layer.name: min(allowed(layer, 1), key=lambda r: layer.weight * float(layer.energy[r]) + lam * cost(layer, r))
        for layer in layers
    }


def assert_maximal(layers, ranks, budget: float, multiple_of: int) -> None:
    """No single layer can move to its next allowed rank without overflowing the budget."""
    spent = total_cost(layers, ranks)
    for layer in layers:
        higher = [r for r in allowed(layer, multiple_of) if r > ranks[layer.name]]
        if higher:
            assert spent - cost(layer, ranks[layer.name]) + cost(layer, higher[0]) > budget, layer.name


def random_layers(gen: torch.Generator, count: int, low: int, high: int, kinds=("pifa", "lowrank")):
    """Layers with random shapes in [low, high], random spectra (some steep, some nearly flat)."""
    layers = []
    for i in range(count):
        m, n = (int(v) for v in torch.randint(low, high + 1, (2,), generator=gen))
        power = float(torch.rand((), generator=gen)) * 6
        s = torch.rand(min(m, n), generator=gen, dtype=torch.float64) ** power
        kind = kinds[int(torch.randint(len(kinds), (), generator=gen))]
        weight = float(torch.rand((), generator=gen)) * 2 + 0.1
        min_rank = int(torch.randint(0, 2, (), generator=gen))
        layers.append(LayerBudget(f"layer{i:02d}", m, n, discarded_energy(s), kind, weight, min_rank))
    return layers


def random_budget(gen: torch.Generator, layers, multiple_of: int) -> float:
    floor = sum(cost(layer, allowed(layer, multiple_of)[0]) for layer in layers)
    top = sum(cost(layer, allowed(layer, multiple_of)[-1]) for layer in layers)
    return floor + float(torch.rand((), generator=gen)) * (top - floor) * 1.05


def test_discarded_energy_values():
    e = discarded_energy(torch.tensor([1.0, 2.0]))  # sorted internally
    assert e.dtype == torch.float64 and e.tolist() == pytest.approx([1.0, 0.2, 0.0], abs=1e-15)
    assert e[0] == 1.0 and e[-1] == 0.0
    assert discarded_energy(torch.zeros(3)).tolist() == [0.0] * 4
    s = torch.rand(50, dtype=torch.float64) * 1e150  # no overflow on squaring
    e = discarded_energy(s)
    assert len(e) == 51 and bool((e[1:] <= e[:-1]).all()) and e[0] == 1.0 and e[-1] == 0.0
    with pytest.raises(ValueError):
        discarded_energy(torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("multiple_of", [1, 8])
@pytest.mark.parametrize("exact_limit", [0, 4_000_000])
def test_never_exceeds_budget_and_is_maximal(multiple_of, exact_limit):
    gen = torch.Generator().manual_seed(100 + multiple_of)
    for _ in range(15):
        layers = random_layers(gen, int(torch.randint(1, 7, (), generator=gen)), 8, 40)
        budget = random_budget(gen, layers, multiple_of)
        ranks = lagrangian_ranks(layers, budget, multiple_of=multiple_of, exact_limit=exact_limit)
        assert set(ranks) == {layer.name for layer in layers}
        assert all(ranks[layer.name] in allowed(layer, multiple_of) for layer in layers)
        assert total_cost(layers, ranks) <= budget
        assert_maximal(layers, ranks, budget, multiple_of)


def test_lagrangian_theorem_and_gap_against_brute_force():
    """What is provably true of the Lagrangian path (exact_limit=0), checked by enumeration.

    (a) Everett's theorem: the pre-fill ranks x(lam) minimise the objective over every
        allocation costing at most cost(x) — so when cost(x) == budget they are optimal.
    (b) Weak duality: for any feasible y, f(y) >= f(x) - lam (budget - cost(x)); the fill never
        raises the objective (curves are non-increasing), so the final result is within
        lam (budget - cost(x)) of the brute-force optimum, and never worse than x itself.
    The exact path (default exact_limit, a knapsack DP here) must hit the optimum exactly.
    """
    gen = torch.Generator().manual_seed(7)
    hits = 0
    for case in range(60):
        layers = random_layers(gen, 2 + case % 2, 2, 7)
        budget = random_budget(gen, layers, 1)
        pre, lam = lagrangian_relaxation(layers, budget)
        spent = total_cost(layers, pre)
        assert spent <= budget and lam >= 0
        if lam > 0:  # the multiplier is the smallest that fits (to 1e-9 relative)
            assert total_cost(layers, lagrangian_pick(layers, lam * (1 - 1e-9))) > budget
        assert objective(layers, pre) <= brute_optimum(layers, spent) + TOL  # (a)
        optimum = brute_optimum(layers, budget)
        final = lagrangian_ranks(layers, budget, exact_limit=0)
        assert objective(layers, final) <= objective(layers, pre) + TOL  # (b)
        assert objective(layers, final) <= optimum + lam * (budget - spent) + TOL  # (b)
        if spent == math.floor(budget):
            hits += 1
            assert objective(layers, final) == pytest.approx(optimum, abs=TOL)
        exact = lagrangian_ranks(layers, budget)
        assert total_cost(layers, exact) <= budget
        assert objective(layers, exact) == pytest.approx(optimum, abs=TOL)
    assert hits > 0  # the cost(x) == budget branch was exercised


def test_exact_with_multiple_of_matches_brute_force():
    gen = torch.Generator().manual_seed(11)
    for _ in range(20):
        layers = random_layers(gen, 3, 4, 9)
        budget = random_budget(gen, layers, 2)
        ranks = lagrangian_ranks(layers, budget, multiple_of=2)
        assert objective(layers, ranks) == pytest.approx(brute_optimum(layers, budget, 2), abs=TOL)
        assert_maximal(layers, ranks, budget, 2)


@pytest.mark.parametrize("exact_limit", [0, 4_000_000])
def test_flat_spectrum_gets_more_rank_than_cliff(exact_limit):
    flat = discarded_energy(torch.ones(64))
    cliff = discarded_energy(torch.cat([torch.full((8,), 10.0), torch.full((56,), 1e-3)]))
    layers = [LayerBudget("a_cliff", 64, 64, cliff), LayerBudget("b_flat", 64, 64, flat)]
    budget = 2 * 32 * (128 - 32)
    ranks = lagrangian_ranks(layers, budget, exact_limit=exact_limit)
    assert ranks["b_flat"] > ranks["a_cliff"] >= 8


@pytest.mark.parametrize("exact_limit", [0, 4_000_000])
def test_fill_spends_leftover_on_best_drop_per_parameter(exact_limit):
    """Non-convex curves: the Lagrangian takes a's 0->2 jump, cannot afford another jump, and
    leaves one rank step (4 parameters) that the fill must give to the bigger drop (0.2 > 0.1)."""
    def layer(name, curve):
        return LayerBudget(name, 2, 2, torch.tensor(curve, dtype=torch.float64), "lowrank", min_rank=0)

    layers = [layer("a", [1.0, 0.9, 0.0]), layer("b_worse", [1.0, 0.9, 0.04]), layer("c_better", [1.0, 0.8, 0.05])]
    pre, _ = lagrangian_relaxation(layers, 12)
    assert pre == {"a": 2, "b_worse": 0, "c_better": 0}
    ranks = lagrangian_ranks(layers, 12, exact_limit=exact_limit)
    assert ranks == {"a": 2, "b_worse": 0, "c_better": 1}
    assert objective(layers, ranks) == pytest.approx(brute_optimum(layers, 12))


def test_deterministic_and_order_free():
    gen = torch.Generator().manual_seed(3)
    layers = random_layers(gen, 12, 16, 64)
    budget = random_budget(gen, layers, 1)
    shuffled = list(layers)
    random.Random(0).shuffle(shuffled)
    for limit in (0, 4_000_000):
        first = lagrangian_ranks(layers, budget, exact_limit=limit)
        assert lagrangian_ranks(layers, budget, exact_limit=limit) == first
        assert lagrangian_ranks(shuffled, budget, exact_limit=limit) == first
        assert lagrangian_ranks(layers[::-1], budget, exact_limit=limit) == first
    # identical flat low-rank twins: every split of 7 ranks ties exactly; both paths favour the first name
    twin = discarded_energy(torch.ones(8))
    twins = [LayerBudget(name, 8, 8, twin, "lowrank") for name in ("b", "a")]
    assert lagrangian_ranks(twins, 16 * 7, exact_limit=0) == {"a": 6, "b": 1}
    assert lagrangian_ranks(twins, 16 * 7) == {"a": 6, "b": 1}


def test_infeasible_and_invalid_inputs_raise():
    layer = LayerBudget("x", 16, 16, discarded_energy(torch.ones(16)), "lowrank", min_rank=4)
    with pytest.raises(ValueError, match="smallest allowed rank"):
        lagrangian_ranks([layer], 4 * 32 - 1)
    with pytest.raises(ValueError, match="smallest allowed rank"):
        lagrangian_relaxation([layer], 4 * 32 - 1)
    assert lagrangian_ranks([layer], 4 * 32) == {"x": 4}
    with pytest.raises(ValueError, match="multiple of"):
        lagrangian_ranks([LayerBudget("y", 4, 4, discarded_energy(torch.ones(4)), min_rank=1)], 100, multiple_of=8)
    with pytest.raises(ValueError, match="unique"):
        lagrangian_ranks([layer, layer], 1e6)
    with pytest.raises(ValueError, match="non-increasing"):
        LayerBudget("z", 4, 4, torch.tensor([0.5, 1.0, 0.0]))


def test_big_case_is_fast_and_feasible():
    """200 layers x 2048 ranks through the Lagrangian path (the DP would be far too large)."""
    gen = torch.Generator().manual_seed(5)
    spectra = torch.rand(200, 2048, generator=gen, dtype=torch.float64) ** 4
    kinds = ("pifa", "lowrank")
    layers = [
        LayerBudget(f"l{i:03d}", 2048, 2048 if i % 2 else 5504, discarded_energy(spectra[i]), kinds[i % 3 == 0])
        for i in range(200)
    ]
    budget = 0.5 * sum(2048 * layer.in_features for layer in layers)
    ranks = lagrangian_ranks(layers, budget)  # ~0.1-0.3 s here; no timing assert (shared CPUs)
    assert total_cost(layers, ranks) <= budget
    assert_maximal(layers, ranks, budget, 1)
    assert len(set(ranks.values())) > 10  # a real spread, not one rank for all


def brute_knapsack(options, budget):
    best, choice = math.inf, None
    for pick in itertools.product(*(range(len(item)) for item in options)):  # lexicographic
        if sum(options[i][j][0] for i, j in enumerate(pick)) <= budget:
            score = sum(options[i][j][1] for i, j in enumerate(pick))
            if score < best:
                best, choice = score, list(pick)
    return best, choice


@pytest.mark.parametrize("integer_scores", [True, False])
def test_knapsack_matches_brute_force(integer_scores):
    """Integer scores force exact ties: then the very index list (lexicographically first) must match."""
    rng = random.Random(1 + integer_scores)
    infeasible = 0
    for _ in range(300):
        def score() -> float:
            return float(rng.randint(0, 3)) if integer_scores else rng.uniform(-1, 1)

        options = [[(rng.randint(0, 6), score()) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 4))]
        budget = rng.randint(0, 14)
        best, expected = brute_knapsack(options, budget)
        if expected is None:
            infeasible += 1
            with pytest.raises(ValueError):
                knapsack_choice(options, budget)
            continue
        choice = knapsack_choice(options, budget)
        assert sum(options[i][j][0] for i, j in enumerate(choice)) <= budget
        assert sum(options[i][j][1] for i, j in enumerate(choice)) == pytest.approx(best, abs=1e-12)
        if integer_scores:
            assert choice == expected
    assert infeasible > 0
    assert knapsack_choice([], 0) == []
    with pytest.raises(ValueError):
        knapsack_choice([[(1.5, 0.0)]], 3)


def test_discretise_costs_keeps_feasibility():
    rng = random.Random(4)
    for _ in range(200):
        costs = [[rng.uniform(0, 10) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 4))]
        scores = [[rng.uniform(0, 1) for _ in row] for row in costs]
        budget, bins = rng.uniform(1, 25), rng.randint(1, 40)
        units, capacity = discretise_costs(costs, budget, bins)
        assert capacity == bins
        for row, unit_row in zip(costs, units):
            for c, u in zip(row, unit_row):  # rounded up, but by less than one unit
                assert Fraction(u - 1) * Fraction(budget) / bins < Fraction(c) <= Fraction(u) * Fraction(budget) / bins
        options = [list(zip(u, s)) for u, s in zip(units, scores)]
        try:
            choice = knapsack_choice(options, capacity)
        except ValueError:
            continue
        assert sum(Fraction(costs[i][j]) for i, j in enumerate(choice)) <= Fraction(budget)
    # exact boundaries: 2.5 of 10 in 4 bins is one unit; 0.1 of 0.3 in 3 bins is (in binary) a hair over one
    assert discretise_costs([[0.0, 2.5, 5.0, 5.000001]], 10.0, 4)[0] == [[0, 1, 2, 3]]
    assert discretise_costs([[0.1]], 0.3, 3)[0] == [[2]]
    # float arithmetic says 0.5 * 7 / 0.7 == 5.0 and 1.827222222222222 * 18 / 2.53 > 13; exactly it is > 5 and < 13
    assert discretise_costs([[0.5, 1.827222222222222]], 0.7, 7)[0][0][0] == 6
    assert discretise_costs([[1.827222222222222]], 2.53, 18)[0] == [[13]]
    with pytest.raises(ValueError):  # 0.5 + 0.2 > 0.7 in binary floating point: must not fit
        knapsack_choice([list(zip(u, [0.0])) for u in discretise_costs([[0.5], [0.2]], 0.7, 7)[0]], 7)
