"""Speed-aware planning against brute force under a fixed synthetic latency table: no plan keeps a factored
layer slower than its dense form, the latency-budget knapsack (pifa.speed_plan) equals the brute-force optimum
on small cases, and the density bisection behind the parameter-budget `speedup` plan is never better than it."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pifa.allocation import _density_for_speedup, _predicted
from pifa.budget import cap_to_break_even, layer_parameters
from pifa.latency import LatencyTable, device_key
from pifa.sensitivity import choose_ranks
from pifa.speed_plan import choose_ranks_for_speedup

SHAPES = {"a": (8, 6), "b": (6, 8), "c": (8, 8), "d": (6, 6)}
DENSE = {"a": 6, "b": 6, "c": 8, "d": 6}  # whole time units: the knapsack is exact
# measured KL at three ranks (not convex), interpolated in between
MEASURED = {"a": [(1, 0.9), (2, 0.3), (4, 0.05)], "b": [(1, 0.5), (3, 0.45), (5, 0.02)],
            "c": [(2, 0.8), (4, 0.2), (6, 0.1)], "d": [(1, 0.3), (2, 0.28), (3, 0.01)]}


def _table(step: dict[str, int]) -> LatencyTable:
    """Dense ``DENSE`` units; PIFA at rank r: 2 + step * r units (slower than dense past some rank)."""
    table = LatencyTable(device_key("cpu", torch.float32))
    for name, (m, n) in SHAPES.items():
        table.dense[f"{m}x{n}"] = (float(DENSE[name]), float(DENSE[name]))
        table.factored.setdefault("pifa", {})[f"{m}x{n}"] = [
            (r, 2.0 + step[name] * r, 2.0 + step[name] * r) for r in range(1, min(m, n) + 1)]
    return table


TABLES = [_table({"a": 1, "b": 1, "c": 1, "d": 1}), _table({"a": 2, "b": 1, "c": 1, "d": 3})]


def _options(names=SHAPES):
    return {n: [(r, layer_parameters(*SHAPES[n], r, "pifa"), kl) for r, kl in MEASURED[n]] for n in names}


def _kl(name: str, rank: int) -> float:
    if rank >= min(SHAPES[name]):
        return 0.0
    rows = MEASURED[name]
    return float(np.interp(rank, [r for r, _ in rows], [k for _, k in rows]))


def _time(table: LatencyTable, name: str, rank: int) -> float:
    m, n = SHAPES[name]
    return table.time(m, n, "pifa", None if rank >= min(m, n) else rank)


def _brute_force(table: LatencyTable, names, budget: float, ceilings=None) -> float:
    """The least summed KL over every allowed rank (measured range, interpolated) or dense, within ``budget``."""
    choices = []
    for name in names:
        low, high = MEASURED[name][0][0], MEASURED[name][-1][0]
        top = high if ceilings is None else min(high, ceilings[name])
        choices.append([*range(low, top + 1), min(SHAPES[name])])
    best = math.inf
    for combo in itertools.product(*choices):
        if sum(_time(table, n, r) for n, r in zip(names, combo)) <= budget:
            best = min(best, sum(_kl(n, r) for n, r in zip(names, combo)))
    return best


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("names", [("a", "b", "c"), ("a", "b", "c", "d")])
@pytest.mark.parametrize("use_ceilings", [False, True])
@pytest.mark.parametrize("rest", [0.0, 4.0])
def test_latency_knapsack_equals_brute_force(table, names, use_ceilings, rest):
    """``rest``: the decode step's time outside these linears (the target is then the whole step's speed-up)."""
    dense = sum(DENSE[n] for n in names)
    ceilings = {n: table.break_even(*SHAPES[n], "pifa") for n in names} if use_ceilings else None
    checked = 0
    for budget in range(math.ceil(dense / 3), dense):  # every whole-unit budget of the linears below dense time
        speedup = (dense + rest) / (budget + rest)
        best = _brute_force(table, names, budget, ceilings)
        if not math.isfinite(best):
            with pytest.raises(ValueError, match="out of reach"):
                choose_ranks_for_speedup(_options(names), SHAPES, table, speedup, ceilings=ceilings, bins=budget,
                                         rest=rest)
            continue
        ranks, scores = choose_ranks_for_speedup(_options(names), SHAPES, table, speedup, ceilings=ceilings,
                                                 bins=budget, rest=rest)
        assert sum(_time(table, n, r) for n, r in ranks.items()) <= budget + 1e-9
        assert sum(scores.values()) == pytest.approx(best, abs=1e-12)
        assert all(_time(table, n, r) <= DENSE[n] for n, r in ranks.items())  # nothing slower than dense
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("density", [0.3, 0.45, 0.6, 0.75, 0.9])
def test_parameter_plans_never_keep_a_layer_slower_than_dense(table, density):
    """The parameter-budget sensitivity knapsack with break-even ceilings, then cap_to_break_even."""
    ceilings = {n: table.break_even(*SHAPES[n], "pifa") for n in SHAPES}
    densities, pools = {n: density for n in SHAPES}, {n: "all" for n in SHAPES}
    try:
        ranks, _ = choose_ranks(_options(), SHAPES, densities, pools, "pifa", ceilings=ceilings)
        ranks = cap_to_break_even(ranks, SHAPES, ceilings, densities, pools)
    except ValueError as exc:  # a density only slower layers could reach is refused, never planned
        assert "out of reach" in str(exc)
        return
    for name, rank in ranks.items():
        assert rank >= min(SHAPES[name]) or _time(table, name, rank) <= DENSE[name], (name, rank)


@pytest.mark.parametrize("table", TABLES)
def test_density_bisection_is_never_better_than_the_latency_knapsack(table, capsys):
    """The `speedup` plan made by bisecting the density of the parameter-budget plan reaches the speed-up, but
    its KL is only an upper bound of the latency knapsack's optimum; the gaps are printed (pytest -s)."""
    ceilings = {n: table.break_even(*SHAPES[n], "pifa") for n in SHAPES}
    pools = {n: "all" for n in SHAPES}

    def ranks_at(density):
        densities = {n: density for n in SHAPES}
        ranks, scores = choose_ranks(_options(), SHAPES, densities, pools, "pifa", ceilings=ceilings)
        return cap_to_break_even(ranks, SHAPES, ceilings, densities, pools), scores

    dense = sum(DENSE.values())
    gaps = []
    for speedup in (1.1, 1.2, 1.3, 1.5):
        try:
            density = _density_for_speedup(SimpleNamespace(speedup=speedup), table, SimpleNamespace(shapes=SHAPES, rest=None),
                                           ranks_at)
        except ValueError:
            continue
        ranks = ranks_at(density)[0]
        assert _predicted(table, SHAPES, ranks)["decode"] >= speedup
        bisection = sum(_kl(n, r) for n, r in ranks.items())
        best = _brute_force(table, list(SHAPES), dense / speedup, ceilings)
        assert bisection >= best - 1e-12
        gaps.append((speedup, round(bisection, 4), round(best, 4)))
    assert gaps
    print("speedup, bisection KL, knapsack optimum KL:", gaps)


def test_sensitivity_speedup_plan_uses_the_latency_knapsack(tmp_path, monkeypatch):
    """`speedup` with sensitivity ranks: the plan reaches the speed-up with the knapsack's KL, no more than the
    density bisection's plan over the same measurements, and records the density it spends."""
    import json

    import pifa
    from helpers import tiny_model
    from pifa import allocation
    from pifa.compress import plan
    from pifa.sensitivity import _curve
    from test_latency import CALIB, _synthetic

    table_file = tmp_path / "latency.json"
    table_file.write_text(json.dumps(_synthetic().to_dict()))
    seen = {}

    def spy(options, shapes, *args, **kwargs):
        seen.update(options=options, shapes=shapes, ceilings=kwargs.get("ceilings", args[4] if len(args) > 4 else None))
        return choose_ranks_for_speedup(options, shapes, *args, **kwargs)

    monkeypatch.setattr(allocation, "choose_ranks_for_speedup", spy)
    config = pifa.CompressionConfig(method="mpifa", allocation="sensitivity", latency_table=str(table_file),
                                    speedup=1.3)
    chosen, shapes = plan(tiny_model("llama"), config, CALIB, batch_size=2)
    table = _synthetic()
    assert chosen.speedup["decode"] >= 1.3
    options, ceilings = seen["options"], seen["ceilings"]
    assert all(r >= min(shapes[n]) or table.time(*shapes[n], "pifa", r) <= 1.0 for n, r in chosen.ranks.items())
    kept = sum(m * n if chosen.ranks[k] >= min(m, n) else layer_parameters(m, n, chosen.ranks[k], "pifa")
               for k, (m, n) in shapes.items())
    assert chosen.density == pytest.approx(kept / sum(m * n for m, n in shapes.values()))

    def kl(ranks):
        return sum(0.0 if r >= min(shapes[n]) else float(np.interp(r, *_curve(options[n], 1))) for n, r in ranks.items())

    pools = {n: "all" for n in shapes}

    def ranks_at(density):
        densities = {n: density for n in shapes}
        ranks, scores = choose_ranks(options, shapes, densities, pools, "pifa", ceilings=ceilings)
        return cap_to_break_even(ranks, shapes, ceilings, densities, pools), scores

    bisected = ranks_at(_density_for_speedup(SimpleNamespace(speedup=1.3), table, SimpleNamespace(shapes=shapes, rest=None),
                                          ranks_at))[0]
    assert kl(chosen.ranks) == pytest.approx(sum(chosen.scores.values()), abs=1e-9)
    assert kl(chosen.ranks) <= kl(bisected) + 1e-9
    print(f"speedup 1.3 on tiny llama: knapsack KL {kl(chosen.ranks):.3e}, density bisection KL {kl(bisected):.3e}")
