"""Where the density goes: per-module densities (uniform, attention/MLP split, OWL) and ranks."""

from __future__ import annotations

import math

import torch

from .ranks import RankKind, layer_parameters, rank_for_density

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
    budget = density * m * n
    if kind == "lowrank":
        exact = budget / (m + n)
    else:
        exact = ((m + n) - math.sqrt(max((m + n) ** 2 - 4 * budget, 0.0))) / 2
    return exact - rank
