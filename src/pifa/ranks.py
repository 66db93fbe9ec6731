"""Rank for a target density: how many parameters each layer kind keeps."""

from __future__ import annotations

import math
from typing import Literal

RankKind = Literal["pifa", "lowrank"]


def check_density(density: float, name: str = "density") -> None:
    """Raise ``ValueError`` unless 0 < density <= 1."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"{name} {density!r} is outside (0, 1]")


def layer_parameters(out_features: int, in_features: int, rank: int, kind: RankKind) -> int:
    """Weight parameters of a rank-``rank`` layer: r (m + n) for low-rank, r (m + n - r) for PIFA."""
    if kind == "lowrank":
        return rank * (out_features + in_features)
    if kind == "pifa":
        return rank * (out_features + in_features - rank)
    raise ValueError(f"unknown layer kind {kind!r}; choose 'pifa' or 'lowrank'")


def rank_for_density(
    out_features: int, in_features: int, density: float, kind: RankKind = "pifa", multiple_of: int = 1
) -> int:
    """Largest rank whose ``kind`` layer keeps at most ``density`` of the m x n weights.

    low-rank: r = floor(rho m n / (m + n)); PIFA: the smaller root of r (m + n - r) = rho m n.
    With ``multiple_of`` > 1 the rank is rounded down to a multiple of it.
    Raises ``ValueError`` when not even one such rank fits.
    """
    check_density(density)
    if out_features < 1 or in_features < 1:
        raise ValueError(f"layer shape ({out_features}, {in_features}) must be positive")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of {multiple_of!r} must be a positive integer")
    m, n = out_features, in_features
    budget = density * m * n
    if kind == "lowrank":
        rank = math.floor(budget / (m + n))
    elif kind == "pifa":
        rank = math.floor(((m + n) - math.sqrt(max((m + n) ** 2 - 4 * budget, 0.0))) / 2)
    else:
        raise ValueError(f"unknown layer kind {kind!r}; choose 'pifa' or 'lowrank'")
    rank = min(rank, m, n)
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
