"""Plans under a latency budget: the sensitivity knapsack with measured decode time as the cost.

``choose_ranks_for_speedup`` picks one candidate per linear (an allowed PIFA rank, or the dense layer)
minimising the summed measured KL subject to the predicted decode time being at most the dense time divided
by the requested speed-up: of the linears alone, or of the whole decode step when ``rest`` (the step's seconds
outside the targeted linears, which no plan changes) is given. Costs come from a :class:`pifa.latency.LatencyTable`; the
candidates are the measured ranks, ``GRID`` evenly spaced allowed ranks (at or below each linear's
break-even rank when ``ceilings`` are given) and dense, whose KL is 0. The times are rounded up to
``budget / bins`` units, so a plan never exceeds the budget; with times that are whole units (the
tests) the knapsack is exact over its candidates.
"""

from __future__ import annotations

import numpy as np

from .latency import LatencyTable
from .rank_search import discretise_costs, knapsack_choice
from .sensitivity import BINS, GRID, _below, _curve


def _candidates(rows: list[tuple[int, int, float]], full: int, multiple_of: int,
                ceiling: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, KL) of one linear's candidates, dense (full rank, KL 0) last."""
    curve = _curve(rows, multiple_of)
    if ceiling is not None:
        curve = _below(curve, ceiling, full)
    ranks = curve[0][curve[0] < full]
    if len(ranks):
        grid = ranks[np.unique(np.linspace(0, len(ranks) - 1, GRID).round().astype(np.int64))]
        ranks = np.union1d(grid, [r for r, _, _ in rows if r in set(ranks.tolist())])
    kl = np.interp(ranks, *curve) if len(ranks) else np.zeros(0)
    return np.append(ranks, full).astype(np.int64), np.append(kl, 0.0)


def choose_ranks_for_speedup(options: dict[str, list[tuple[int, int, float]]], shapes: dict[str, tuple[int, int]],
                             table: LatencyTable, speedup: float, kind: str = "pifa", multiple_of: int = 1,
                             ceilings: dict[str, int] | None = None, bins: int = BINS, rest: float = 0.0,
                             ) -> tuple[dict[str, int], dict[str, float]]:
    """Ranks (full rank: kept dense) minimising the summed KL with predicted decode time <= dense / ``speedup``
    (both plus ``rest``).

    ``options[name]``: (rank, parameters, KL) measured at ascending ranks, as for
    :func:`pifa.sensitivity.choose_ranks`. ``ValueError`` naming the largest reachable speed-up when none fits.
    """
    names = sorted(options)
    cands = {name: _candidates(options[name], min(shapes[name]), multiple_of,
                               None if ceilings is None else ceilings[name]) for name in names}

    def seconds(name: str, rank: int) -> float:
        m, n = shapes[name]
        return table.time(m, n, kind, None if rank >= min(m, n) else int(rank))

    dense = sum(seconds(name, min(shapes[name])) for name in names)
    costs = [[seconds(name, int(r)) for r in cands[name][0]] for name in names]
    budget = ((dense + rest) / speedup - rest) * (1 + 1e-9)  # a speed-up computed from a budget meets it
    fastest = sum(min(row) for row in costs)
    largest = (dense + rest) / (fastest + rest)
    if fastest > budget:
        raise ValueError(f"speedup {speedup} is out of reach on this machine: the largest predicted decode "
                         f"speed-up of {speedup_scope(rest)} is {largest:.2f}x")
    units, total = discretise_costs(costs, budget, bins)
    try:
        choice = knapsack_choice([list(zip(u, cands[name][1].tolist())) for u, name in zip(units, names)], total)
    except ValueError:  # feasible in real time, lost to the rounding of the units
        raise ValueError(f"speedup {speedup} is at the edge of reach (largest predicted {largest:.2f}x); "
                         "ask for a little less") from None
    ranks = {name: int(cands[name][0][j]) for name, j in zip(names, choice)}
    return ranks, {name: float(cands[name][1][j]) for name, j in zip(names, choice)}


def speedup_scope(rest: float | None) -> str:
    """What a predicted decode speed-up is of: the whole model once its decode step was timed, else the linears."""
    return "the model's decode step" if rest else "these linears"
