"""The parameter budget: what each layer kind costs, the rank for a density, and where the density goes
(uniform, attention/MLP split, OWL) down to per-module ranks. Pure maths over shapes and tensors."""

from __future__ import annotations

import math
from typing import Literal

import torch

from .validate import check_positive_int

RankKind = Literal["pifa", "lowrank"]


def check_density(density: float, name: str = "density") -> None:
    """Raise ``ValueError`` unless 0 < density <= 1."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"{name} {density!r} is outside (0, 1]")


def rank_kind(kind: str) -> RankKind:
    """The cost model of a layer kind: "pifa" (also the file format's "pivot") or "lowrank"."""
    if kind in ("pifa", "pivot"):
        return "pifa"
    if kind == "lowrank":
        return "lowrank"
    raise ValueError(f"unknown layer kind {kind!r}; choose 'pifa' or 'lowrank'")


def layer_parameters(out_features: int, in_features: int, rank: int, kind: str) -> int:
    """Weight parameters of a rank-``rank`` layer: r (m + n) for low-rank, r (m + n - r) for PIFA."""
    if rank_kind(kind) == "lowrank":
        return rank * (out_features + in_features)
    return rank * (out_features + in_features - rank)


def exact_rank(out_features: int, in_features: int, budget: float, kind: str) -> float:
    """The real rank whose ``kind`` layer costs exactly ``budget`` parameters (the one rank formula).

    low-rank: budget / (m + n); PIFA: the smaller root of r (m + n - r) = budget.
    """
    total = out_features + in_features
    if rank_kind(kind) == "lowrank":
        return budget / total
    return (total - math.sqrt(max(total * total - 4 * budget, 0.0))) / 2


def rank_for_density(
    out_features: int, in_features: int, density: float, kind: str = "pifa", multiple_of: int = 1
) -> int:
    """Largest rank whose ``kind`` layer keeps at most ``density`` of the m x n weights.

    low-rank: r = floor(rho m n / (m + n)); PIFA: the smaller root of r (m + n - r) = rho m n.
    With ``multiple_of`` > 1 the rank is rounded down to a multiple of it.
    Raises ``ValueError`` when not even one such rank fits.
    """
    check_density(density)
    if out_features < 1 or in_features < 1:
        raise ValueError(f"layer shape ({out_features}, {in_features}) must be positive")
    check_positive_int(multiple_of, "multiple_of")
    kind = rank_kind(kind)
    m, n = out_features, in_features
    budget = density * m * n
    rank = min(math.floor(exact_rank(m, n, budget, kind)), m, n)
    # Guard against floating-point floor errors at exact boundaries.
    while rank > 0 and layer_parameters(m, n, rank, kind) > budget * (1 + 1e-12):
        rank -= 1
    while rank < min(m, n) and layer_parameters(m, n, rank + 1, kind) <= budget * (1 + 1e-12):
        rank += 1
    rank -= rank % multiple_of
    if rank < 1:
        raise ValueError(
            f"density {density} is too small for a {m} x {n} layer: no {kind} rank"
            + (f" that is a multiple of {multiple_of}" if multiple_of > 1 else "")
            + " fits"
        )
    return rank


Shape = tuple[int, int]


def split_densities(
    shapes: dict[str, Shape], attention: dict[str, bool], density: float, attn_density: float | None
) -> dict[str, float]:
    """Per-module densities: uniform, or attention at ``attn_density`` with the MLP density solved.

    Raises ``ValueError`` naming both densities when the solved MLP density leaves (0, 1].
    """
    if attn_density is None:
        return {name: density for name in shapes}
    attn = sum(m * n for name, (m, n) in shapes.items() if attention[name])
    mlp = sum(m * n for name, (m, n) in shapes.items() if not attention[name])
    if mlp == 0 or attn == 0:
        raise ValueError("attn_density needs both attention and MLP linears among the targets")
    mlp_density = (density * (attn + mlp) - attn_density * attn) / mlp
    if not 0 < mlp_density <= 1:
        raise ValueError(
            f"attn_density {attn_density} with density {density} forces the MLP density to "
            f"{mlp_density:.4f}, outside (0, 1]"
        )
    return {name: attn_density if attention[name] else mlp_density for name in shapes}


def outlier_ratio(weights: list[torch.Tensor], input_norms: list[torch.Tensor], threshold: float) -> float:
    """OWL's D for one block: the fraction of scores |W_ij| ||X_j|| above ``threshold`` x their mean."""
    above, total = 0, 0
    for weight, norms in zip(weights, input_norms):
        score = weight.abs().float() * norms.float()[None, :]
        above += int((score > threshold * score.mean()).sum())
        total += score.numel()
    return above / max(total, 1)


def owl_block_densities(ratios: list[float], params: list[int], density: float, spread: float) -> list[float]:
    """Densities in [density - spread, density + spread], rising with the outlier ratio,
    parameter-weighted mean held at ``density`` (then clipped into (0, 1])."""
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0 or spread == 0:
        return [density] * len(ratios)
    raw = [spread * (2 * (d - lo) / (hi - lo) - 1) for d in ratios]
    shift = sum(p * r for p, r in zip(params, raw)) / sum(params)
    return [min(1.0, max(1e-3, density + r - shift)) for r in raw]


def allocate_ranks(
    shapes: dict[str, Shape], densities: dict[str, float], kind: RankKind, multiple_of: int = 1
) -> dict[str, int]:
    """Ranks whose total parameters come as close as possible to sum(density m n) without exceeding it.

    Each module starts at its floor rank (``rank_for_density``); the leftover budget then
    raises ranks one step at a time, largest fractional remainder first.
    """
    ranks = {name: rank_for_density(m, n, densities[name], kind, multiple_of) for name, (m, n) in shapes.items()}
    budget = sum(densities[name] * m * n for name, (m, n) in shapes.items())
    used = sum(layer_parameters(m, n, ranks[name], kind) for name, (m, n) in shapes.items())
    order = sorted(shapes, key=lambda name: -_fraction(shapes[name], densities[name], kind, ranks[name]))
    for name in order:
        m, n = shapes[name]
        step = ranks[name] + multiple_of
        if step > min(m, n):
            continue
        extra = layer_parameters(m, n, step, kind) - layer_parameters(m, n, ranks[name], kind)
        if used + extra <= budget:
            ranks[name], used = step, used + extra
    return ranks


def _fraction(shape: Shape, density: float, kind: RankKind, rank: int) -> float:
    m, n = shape
    return exact_rank(m, n, density * m * n, kind) - rank


def cap_to_break_even(ranks: dict[str, int], shapes: dict[str, Shape], ceilings: dict[str, int],
                      densities: dict[str, float], pools: dict[str, str]) -> dict[str, int]:
    """PIFA ranks none of which decodes slower than its dense layer (``ceilings``: each linear's break-even
    rank, see :mod:`pifa.latency`; full rank means the linear stays dense). A rank above its ceiling drops to
    it (to full rank when no rank is faster than dense); the parameters this frees then make capped linears
    dense again, the cheapest first, while their pool's budget sum(density m n) allows."""
    capped = dict(ranks)
    for name, rank in ranks.items():
        full = min(shapes[name])
        if ceilings[name] < rank < full:
            capped[name] = ceilings[name] if ceilings[name] >= 1 else full
    for pool in sorted(set(pools.values())):
        members = sorted(name for name in ranks if pools[name] == pool)
        budget = sum(densities[name] * shapes[name][0] * shapes[name][1] for name in members)
        spent = sum(layer_parameters(*shapes[name], capped[name], "pifa") for name in members)

        def extra(name: str) -> int:
            m, n = shapes[name]
            return m * n - layer_parameters(m, n, capped[name], "pifa")

        if spent > budget:
            raise ValueError(out_of_reach(sum(ceilings[n] < 1 for n in members), len(members)))
        for name in sorted((n for n in members if capped[n] < ranks[n]), key=lambda n: (extra(n), n)):
            if spent + extra(name) <= budget:
                spent += extra(name)
                capped[name] = min(shapes[name])
    return capped


def out_of_reach(dense: int, total: int) -> str:
    """The refusal of a density that only layers slower than their dense form could reach."""
    return (f"the density is out of reach with no linear slower than its dense form: {dense} of {total} linears "
            "have no PIFA rank that decodes faster than dense on this machine and stay dense; ask for a higher "
            "density")
