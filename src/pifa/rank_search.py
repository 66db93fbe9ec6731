"""Data-driven rank allocation: pure maths, no modules, hooks or I/O.

Rank r of an m x n layer costs r (m + n) parameters low-rank, r (m + n - r) PIFA (both rise
strictly for r <= min(m, n)). :func:`lagrangian_ranks` minimises sum_l w_l e_l(r_l), e_l from
:func:`discarded_energy`, subject to sum_l cost_l(r_l) <= budget.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from .budget import RankKind, Shape, layer_parameters, rank_for_density, rank_kind


def discarded_energy(singular_values: torch.Tensor) -> torch.Tensor:
    """Relative energy discarded when keeping the top r singular values, for every r.

    ``singular_values``: shape (k,), finite and non-negative (sorted descending here).
    Returns float64, shape (k + 1,): entry r = sum_{i >= r} s_i^2 / sum_i s_i^2, so entry 0
    is 1, entry k is 0 and the curve never increases. An all-zero (or empty) spectrum has
    nothing to discard: its curve is all zeros.
    """
    s = torch.as_tensor(singular_values).detach().to("cpu", torch.float64)
    if s.dim() != 1:
        raise ValueError(f"singular values must be 1-D, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("singular values must be finite and non-negative")
    top = float(s.max()) if len(s) else 0.0
    if top == 0.0:
        return torch.zeros(len(s) + 1, dtype=torch.float64)
    squares = (s.sort(descending=True).values / top).square()
    tail = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)])
    return torch.cummin(tail / tail[0], 0).values  # cummin only guards against rounding


@dataclass(frozen=True, eq=False)
class LayerBudget:
    """One layer to allocate. ``energy``: non-increasing discarded-energy curve, shape (k + 1,),
    k <= min(m, n) (as :func:`discarded_energy` returns). Ranks: min_rank..max_rank (default k)."""

    name: str
    out_features: int
    in_features: int
    energy: torch.Tensor
    kind: RankKind = "pifa"
    weight: float = 1.0
    min_rank: int = 1
    max_rank: int | None = None

    def __post_init__(self) -> None:
        energy = torch.as_tensor(self.energy).detach().to("cpu", torch.float64)
        object.__setattr__(self, "energy", energy)
        m, n, top = self.out_features, self.in_features, len(energy) - 1
        if self.kind not in ("pifa", "lowrank"):
            raise ValueError(f"{self.name}: unknown layer kind {self.kind!r}; choose 'pifa' or 'lowrank'")
        if min(m, n) < 1 or energy.dim() != 1 or not 0 <= top <= min(m, n):
            raise ValueError(f"{self.name}: needs m, n >= 1 and a 1-D curve of at most min(m, n) + 1 entries")
        if not bool(torch.isfinite(energy).all()) or bool((energy[1:] > energy[:-1]).any()):
            raise ValueError(f"{self.name}: the energy curve must be finite and non-increasing")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"{self.name}: weight {self.weight!r} must be finite and >= 0")
        high = top if self.max_rank is None else self.max_rank
        if not 0 <= self.min_rank <= high <= top:
            raise ValueError(f"{self.name}: need 0 <= min_rank <= max_rank <= {top}")

    def allowed_ranks(self, multiple_of: int = 1) -> torch.Tensor:
        """Ascending int64 ranks in [min_rank, max_rank] that are multiples of ``multiple_of``."""
        high = len(self.energy) - 1 if self.max_rank is None else self.max_rank
        start = -(-self.min_rank // multiple_of) * multiple_of
        return torch.arange(start, max(start, high + 1), multiple_of, dtype=torch.int64)

    def cost(self, rank: int | torch.Tensor | np.ndarray) -> int | torch.Tensor | np.ndarray:
        """Parameters at ``rank`` (:func:`pifa.budget.layer_parameters`, also elementwise on arrays)."""
        return layer_parameters(self.out_features, self.in_features, rank, self.kind)


class _Tables(NamedTuple):
    """Name-sorted layers as padded (L, K) tables; pad entries have objective +inf."""

    names: list[str]
    objective: np.ndarray  # float64, w * e(rank)
    cost: np.ndarray  # int64 parameters
    rank: np.ndarray  # int64
    counts: list[int]  # allowed ranks per layer

    def ranks(self, index: list[int]) -> dict[str, int]:
        return {name: int(self.rank[i, k]) for i, (name, k) in enumerate(zip(self.names, index))}


def _tables(layers: Sequence[LayerBudget], multiple_of: int, budget: float) -> tuple[_Tables, int]:
    """The padded tables and the cost of every layer's smallest allowed rank (which must fit)."""
    if not math.isfinite(budget):
        raise ValueError(f"budget {budget!r} must be finite")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of {multiple_of!r} must be a positive integer")
    ordered = sorted(layers, key=lambda layer: layer.name)
    names = [layer.name for layer in ordered]
    if not names or len(set(names)) != len(names):
        raise ValueError("layers must be non-empty with unique names")
    rows = [layer.allowed_ranks(multiple_of).numpy() for layer in ordered]
    for layer in (layer for layer, ranks in zip(ordered, rows) if len(ranks) == 0):
        raise ValueError(f"{layer.name}: no rank in [min_rank, max_rank] is a multiple of {multiple_of}")
    width = max(len(ranks) for ranks in rows)
    objective = np.full((len(rows), width), math.inf)
    cost = np.zeros((len(rows), width), dtype=np.int64)
    rank = np.zeros((len(rows), width), dtype=np.int64)
    for i, (layer, ranks) in enumerate(zip(ordered, rows)):
        objective[i, : len(ranks)] = layer.weight * layer.energy.numpy()[ranks]
        cost[i, : len(ranks)] = layer.cost(ranks)
        rank[i, : len(ranks)] = ranks
    floor = int(cost[:, 0].sum())
    if floor > budget:
        raise ValueError(f"budget {budget:g} < {floor} parameters, the cost of every layer's smallest allowed rank")
    return _Tables(names, objective, cost, rank, [len(ranks) for ranks in rows]), floor


def _bisect(tables: _Tables, budget: float, iterations: int = 100) -> tuple[list[int], float]:
    """Per-layer argmin of w e(r) + lam cost(r) at the smallest lam (log-space bisection) that fits."""
    objective, cost = tables.objective, tables.cost
    relative = (cost - cost[:, :1]).astype(np.float64)  # same argmin, smaller magnitudes
    scratch = np.empty_like(objective)  # numpy: its argmin is several times faster than torch's here

    def pick(lam: float) -> tuple[np.ndarray, int]:
        np.add(objective, np.multiply(relative, lam, out=scratch), out=scratch)
        index = scratch.argmin(1)  # first minimum: the smallest rank on ties
        return index, int(np.take_along_axis(cost, index[:, None], 1).sum())

    best, spent = pick(0.0)
    if spent <= budget:
        return best.tolist(), 0.0
    finite = objective[np.isfinite(objective)]
    lam = 2.0 * float(finite.max() - finite.min()) + 1.0  # above every slope: all floors
    best, _ = pick(lam)
    low, high = math.log(lam) - 140.0, math.log(lam)
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if not low < mid < high:
            break
        index, spent = pick(math.exp(mid))
        if spent <= budget:
            high, best, lam = mid, index, math.exp(mid)
        else:
            low = mid
    return best.tolist(), lam


def _fill(tables: _Tables, index: list[int], budget: float) -> list[int]:
    """Greedily raise ranks one allowed step, best objective drop per parameter first, while they fit."""
    objective, cost = tables.objective, tables.cost
    index = list(index)
    spent = sum(int(cost[i, k]) for i, k in enumerate(index))

    def entry(i: int) -> tuple[float, int]:
        k = index[i]
        return (float(objective[i, k + 1] - objective[i, k]) / float(cost[i, k + 1] - cost[i, k]), i)

    heap = [entry(i) for i in range(len(index)) if index[i] + 1 < tables.counts[i]]
    heapq.heapify(heap)  # key: (-drop per parameter, name order)
    while heap:
        _, i = heapq.heappop(heap)
        step = int(cost[i, index[i] + 1] - cost[i, index[i]])
        if spent + step > budget:
            continue  # the leftover only shrinks: this step never fits again
        spent, index[i] = spent + step, index[i] + 1
        if index[i] + 1 < tables.counts[i]:
            heapq.heappush(heap, entry(i))
    return index


def lagrangian_relaxation(
    layers: Sequence[LayerBudget], budget: float, multiple_of: int = 1
) -> tuple[dict[str, int], float]:
    """The Lagrangian solution alone (no fill) and its multiplier lam.

    Every layer picks argmin_r w e(r) + lam cost(r) over its allowed ranks (smallest rank on
    ties); lam is the smallest found by 100 log-space bisection steps whose total cost fits.
    The ranks are optimal for the budget they spend, and within lam * (budget - spent) of the
    optimum for ``budget``. Raises ``ValueError`` when the smallest allowed ranks overflow it.
    """
    tables, _ = _tables(layers, multiple_of, budget)
    index, lam = _bisect(tables, budget)
    return tables.ranks(index), lam


def lagrangian_ranks(
    layers: Sequence[LayerBudget], budget: float, multiple_of: int = 1, exact_limit: int = 4_000_000
) -> dict[str, int]:
    """Ranks minimising sum_l w_l e_l(r_l) with sum_l cost_l(r_l) <= ``budget``, keyed by name.

    Ranks are multiples of ``multiple_of`` within each layer's [min_rank, max_rank]. When the
    exact dynamic programme is small (allowed ranks summed over layers times spare parameters
    + 1 <= ``exact_limit``) it is solved exactly by :func:`knapsack_choice`; otherwise by
    :func:`lagrangian_relaxation`. Then a greedy fill spends the leftover, so no single layer
    can be raised one step within the budget. Deterministic; input order does not matter.
    Raises ``ValueError`` when even the smallest allowed ranks overflow the budget.
    """
    tables, floor = _tables(layers, multiple_of, budget)
    spare = math.floor(budget) - floor  # costs are integers
    if sum(tables.counts) * (spare + 1) <= exact_limit:
        objective, cost = tables.objective.tolist(), (tables.cost - tables.cost[:, :1]).tolist()
        options = [list(zip(cost[i][:k], objective[i][:k]))[::-1] for i, k in enumerate(tables.counts)]
        # descending ranks: on ties the earlier name gets the higher rank, as in the fill
        index = [k - 1 - j for k, j in zip(tables.counts, knapsack_choice(options, spare))]
    else:
        index, _ = _bisect(tables, budget)
    return tables.ranks(_fill(tables, index, budget))


def _option_arrays(options: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    arrays = []
    for item, candidates in enumerate(options):
        costs, scores = np.array([c for c, _ in candidates]), np.array([s for _, s in candidates], dtype=np.float64)
        if len(costs) == 0 or costs.dtype.kind not in "iu" or (costs < 0).any() or not np.isfinite(scores).all():
            raise ValueError(f"item {item}: needs candidates with integer costs >= 0 and finite scores")
        arrays.append((costs.astype(np.int64), scores))
    return arrays


def knapsack_choice(options: Sequence[Sequence[tuple[int, float]]], budget: int) -> list[int]:
    """Exact multiple-choice knapsack: one candidate index per item, summed score minimal.

    ``options[l]``: the (integer cost >= 0, finite score) candidates of item l; the summed cost
    must be <= ``budget`` (an integer >= 0). Dynamic programme over items, vectorised over
    candidates x budget: O(items x candidates x budget) time, O(items x budget) memory.
    Ties: the lexicographically smallest index list among exact optima. ``ValueError`` when
    no choice fits.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget {budget!r} must be an integer >= 0")
    arrays, budget = _option_arrays(options), int(budget)
    room = np.arange(budget + 1)
    best = [np.zeros(budget + 1)]  # best[-1][b]: minimal score of the remaining items within b
    for costs, scores in reversed(arrays):
        left = room[None, :] - costs[:, None]
        values = np.where(left >= 0, scores[:, None] + best[-1][np.maximum(left, 0)], np.inf)
        best.append(values.min(0))
    best.reverse()
    if not np.isfinite(best[0][budget]):
        raise ValueError(f"no choice of one candidate per item fits the budget {budget}")
    choice, left = [], budget
    for item, (costs, scores) in enumerate(arrays):
        fits = costs <= left
        values = np.where(fits, scores + best[item + 1][np.where(fits, left - costs, 0)], np.inf)
        j = int(np.flatnonzero(values == best[item][left])[0])  # same float ops: exact match
        choice.append(j)
        left -= int(costs[j])
    return choice


def discretise_costs(costs: Sequence[Sequence[float]], budget: float, bins: int) -> tuple[list[list[int]], int]:
    """Real costs in integer units of budget / bins for :func:`knapsack_choice`; returns (units, bins).

    Each unit count is ceil(cost * bins / budget) in exact rational arithmetic, so any choice
    whose units sum to <= bins has a real summed cost <= ``budget``. Coarser bins only lose
    feasible choices, never admit infeasible ones.
    """
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget {budget!r} must be finite and > 0")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins {bins!r} must be a positive integer")
    units: list[list[int]] = []
    for row in costs:
        real = np.asarray(row, dtype=np.float64)
        if not np.isfinite(real).all() or (real < 0).any():
            raise ValueError("costs must be finite and >= 0")
        quotient = real * bins / budget
        row_units = [int(u) for u in np.ceil(quotient)]
        near = np.abs(quotient - np.round(quotient)) <= 1e-9 * np.maximum(1.0, quotient)
        for j in np.flatnonzero(near):  # rounding could cross an integer here: decide exactly
            row_units[j] = math.ceil(Fraction(float(real[j])) * bins / Fraction(budget))
        units.append(row_units)
    return units, bins


def spectrum_ranks(
    shapes: dict[str, Shape], spectra: dict[str, torch.Tensor], densities: dict[str, float], kind: str,
    multiple_of: int = 1, min_density: float = 0.1, pools: dict[str, str] | None = None,
) -> tuple[dict[str, int], dict[str, float]]:
    """Ranks that minimise the summed relative discarded energy of the whitened spectra within budget.

    ``spectra`` are each linear's whitened singular values; the budget is sum(density m n) over
    each pool (``pools`` maps a name to its pool, e.g. attention / MLP when the split is fixed;
    one pool by default). Every layer keeps at least ``min_density`` (its rank at that density)
    and at most what a dense layer costs. Returns the ranks and each layer's discarded energy.
    """

    kind = rank_kind(kind)
    pools = pools or {name: "all" for name in shapes}
    ranks: dict[str, int] = {}
    for pool in sorted(set(pools.values())):
        names = [name for name in shapes if pools[name] == pool]
        layers = []
        for name in names:
            m, n = shapes[name]
            top = min(m, n) if kind == "pifa" else min(m, n, (m * n) // (m + n))
            floor = min(top, max(1, rank_for_density(m, n, min_density, kind, multiple_of)))
            layers.append(LayerBudget(name, m, n, discarded_energy(spectra[name])[: top + 1], kind,
                                      min_rank=floor, max_rank=top))
        budget = sum(densities[name] * shapes[name][0] * shapes[name][1] for name in names)
        ranks.update(lagrangian_ranks(layers, budget, multiple_of))
    scores = {name: float(discarded_energy(spectra[name])[ranks[name]]) for name in shapes}
    return {name: ranks[name] for name in shapes}, scores
