"""``pifa.allocation``: where the density goes. One table, :data:`PLANNERS`, maps each allocation name to what
it measures (a dense pass over the calibration data, KL measurements of the whole causal LM) and how it
chooses per-linear ranks (low-rank methods) or densities (sparse methods); the engine asks :func:`make_plan`
and never tests allocation names. A latency table (``pifa.latency``) caps every allocation's ranks at each
linear's break-even rank, and a speed-up target picks the density: a target for the whole model's decode step
where that step can be timed here (an in-memory causal LM on the compression device, one process), else for
the targeted linears alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, solver
from .budget import (
    allocate_ranks,
    cap_to_break_even,
    layer_parameters,
    outlier_ratio,
    owl_block_densities,
    split_densities,
)
from .capture import capture_block_inputs, record_inputs
from .config import ALLOCATIONS, CompressionConfig
from .latency import LatencyTable, load_or_measure, predicted_speedup, time_decode_step
from .model import is_attention, linear_shape, linear_weight, on_device
from .rank_search import spectrum_ranks
from .sensitivity import MEASURE_TOKENS, MEASURE_VOCAB, SensitivityCache, SensitivityProbe, output_head
from .speed_plan import choose_ranks_for_speedup, speedup_scope
from .streams import Streams, checked_hidden, finite_weight

logger = logging.getLogger(__name__)

Ranks = tuple[dict[str, int], dict[str, float]]  # per-linear ranks, and what chose each (a score)


@dataclass(frozen=True)
class Plan:
    """Where the density goes: per-module ranks for low-rank methods, densities for sparse ones."""

    ranks: dict[str, int] = field(default_factory=dict)
    densities: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # what chose each rank (spectrum: discarded energy)
    cost: dict[str, float] = field(default_factory=dict)  # what a measured allocation cost (seconds, passes)
    # with a latency table: predicted speed-up of the linears (decode, prefill) and of the model's decode step
    # (decode_model, where that step was timed)
    speedup: dict[str, float] = field(default_factory=dict)
    density: float | None = None  # the density planned for (a speedup target chooses it)


@dataclass
class Context:
    """What a planner may look at: the run's config, model, blocks, targeted linears and calibration."""

    config: CompressionConfig
    model: nn.Module
    blocks: nn.ModuleList
    targets: list[dict[str, nn.Module]]
    streams: Streams
    device: torch.device
    batches: list[torch.Tensor]
    sensitivity_cache: SensitivityCache | None
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    pools: dict[str, str] = field(default_factory=dict)
    ceilings: dict[str, int] | None = None
    rest: float | None = None  # seconds of a decode step outside the targeted linears (None: not timed)
    cost: dict[str, float] = field(default_factory=dict)
    # a measured allocation's plan under a latency budget: (table, speedup) -> ranks (None: bisect the density)
    speed_chooser: Callable[[LatencyTable, float], Ranks] | None = None


@dataclass(frozen=True)
class Planner:
    """An allocation: ``scale`` (optional) measures per-linear density multipliers (OWL: outlier-aware, per
    block); ``chooser`` (low-rank methods) measures what it needs, then returns a function from per-linear
    densities to ranks."""

    chooser: Callable[[Context], Callable[[dict[str, float]], Ranks]]
    scale: Callable[[Context], dict[str, float]] | None = None
    low_rank_only: bool = False


def _uniform(ctx: Context) -> Callable[[dict[str, float]], Ranks]:
    """Every linear at the density it is given (the attention/MLP split aside)."""
    def choose(densities: dict[str, float]) -> Ranks:
        return allocate_ranks(ctx.shapes, densities, ctx.config.layer_kind, ctx.config.rank_multiple_of), {}
    return choose


def _spectrum(ctx: Context) -> Callable[[dict[str, float]], Ranks]:
    """Ranks that minimise the summed discarded whitened energy (one dense pass for the spectra)."""
    spectra = _dense_spectra(ctx)

    def choose(densities: dict[str, float]) -> Ranks:
        return spectrum_ranks(ctx.shapes, spectra, densities, ctx.config.layer_kind, ctx.config.rank_multiple_of,
                              pools=ctx.pools)
    return choose


def _sensitivity(ctx: Context) -> Callable[[dict[str, float]], Ranks]:
    """Ranks that minimise the summed measured output KL (a dense pass, and KL measurements per candidate)."""
    config = ctx.config
    probe = _sensitivity_probe(ctx)
    densities = _split(ctx, config.density)

    def visit(index: int, linears: dict[str, nn.Module], grams: dict[str, torch.Tensor]) -> None:
        probe.measure_block(index, linears, grams, ctx.shapes, densities, config.layer_kind, config.spec.whiten,
                            config.damping, config.rank_multiple_of)

    dense_pass(ctx, visit)

    def choose(densities: dict[str, float]) -> Ranks:
        return probe.choose(ctx.shapes, densities, ctx.pools, config.rank_multiple_of, ctx.ceilings)[:2]

    def for_speedup(table: LatencyTable, speedup: float) -> Ranks:
        return choose_ranks_for_speedup(probe.options, ctx.shapes, table, speedup, probe.kind,
                                        config.rank_multiple_of, ctx.ceilings, rest=ctx.rest or 0.0)

    ctx.speed_chooser = for_speedup

    measured = probe.cost()
    ctx.cost.update({"seconds": measured.seconds, "forward_passes": measured.forward_passes,
                     "reused_measurements": measured.reused})
    logger.info("sensitivity allocation: %.1f s, %d block forward passes, %d measurements reused (KL over the "
                "%s, %.1f %% of the dense probability)", measured.seconds, measured.forward_passes,
                measured.reused, "whole vocabulary" if probe.coverage == 1.0 else
                f"{MEASURE_VOCAB} most probable tokens", 100 * probe.coverage)
    return choose


PLANNERS: dict[str, Planner] = {
    "uniform": Planner(_uniform),
    "owl": Planner(_uniform, scale=lambda ctx: _owl_scales(ctx)),
    "spectrum": Planner(_spectrum, low_rank_only=True),
    "sensitivity": Planner(_sensitivity, low_rank_only=True),
}
assert set(PLANNERS) == set(ALLOCATIONS), "every allocation name has a planner"


def _split(ctx: Context, density: float, scale: dict[str, float] | None = None) -> dict[str, float]:
    """Per-linear densities for a total ``density`` (attention/MLP split; times a planner's scale)."""
    attention = {n: is_attention(n) for n in ctx.shapes}
    split = split_densities(ctx.shapes, attention, density, ctx.config.attn_density)
    return split if scale is None else {name: min(1.0, d * scale[name]) for name, d in split.items()}


def make_plan(ctx: Context) -> Plan:
    """Per module: its rank (low-rank methods) or its density (sparse methods)."""
    config = ctx.config
    ctx.shapes = {name: linear_shape(m) for t in ctx.targets for name, m in t.items()}
    if config.nm is not None:
        return Plan(densities={name: config.density for name in ctx.shapes})
    planner = PLANNERS[config.allocation]
    scale = planner.scale(ctx) if planner.scale is not None else None
    if not config.spec.low_rank:
        return Plan(densities=_split(ctx, config.density, scale))
    ctx.pools = {n: ("attention" if is_attention(n) else "mlp") if config.attn_density is not None else "all"
                 for n in ctx.shapes}
    table, ctx.ceilings = _latency(ctx)
    choose = planner.chooser(ctx)

    def ranks_at(density: float) -> Ranks:
        densities = _split(ctx, density, scale)
        ranks, scores = choose(densities)
        if ctx.ceilings is not None:
            ranks = cap_to_break_even(ranks, ctx.shapes, ctx.ceilings, densities, ctx.pools)
        return ranks, scores

    if config.speedup is not None and ctx.speed_chooser is not None:  # the KL knapsack with latency as the cost
        ranks, scores = ctx.speed_chooser(table, config.speedup)
        density = _planned_density(ctx.shapes, ranks)
    else:
        density = config.density if config.speedup is None else _density_for_speedup(config, table, ctx,
                                                                                       ranks_at)
        ranks, scores = ranks_at(density)
    return Plan(ranks=ranks, scores=scores, cost=ctx.cost,
                speedup=_predicted(table, ctx.shapes, ranks, ctx.rest) if table is not None else {}, density=density)


def _planned_density(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> float:
    """Parameters of a PIFA plan (full rank: dense) over the dense parameters of its linears."""
    kept = sum(m * n if ranks[name] >= min(m, n) else layer_parameters(m, n, ranks[name], "pifa")
               for name, (m, n) in shapes.items())
    return kept / sum(m * n for m, n in shapes.values())


def _latency(ctx: Context) -> tuple[LatencyTable | None, dict[str, int] | None]:
    """With ``config.latency_table``: the table (measured here when the file lacks these shapes) and every
    linear's break-even rank; (None, None) without."""
    config, shapes, device = ctx.config, ctx.shapes, ctx.device
    if config.latency_table is None:
        return None, None
    dtype = next(linear_weight(m).dtype for t in ctx.targets for m in t.values())
    if distributed.active():  # ranks timing on their own could plan differently: measure once, beforehand
        table = load_or_measure(config.latency_table, set(shapes.values()), "pifa", device, dtype, measure=False)
    else:
        table = load_or_measure(config.latency_table, set(shapes.values()), "pifa", device, dtype)
        step = time_decode_step(ctx.model, device)
        if step is not None:
            ctx.rest = max(0.0, step - sum(table.time(m, n, "pifa", None) for m, n in shapes.values()))
            logger.info("decode step of the dense model: %.2f ms, %.2f ms of it outside the targeted linears",
                        1e3 * step, 1e3 * ctx.rest)
    return table, {name: table.break_even(m, n, "pifa") for name, (m, n) in shapes.items()}


def _predicted(table: LatencyTable, shapes: dict[str, tuple[int, int]], ranks: dict[str, int],
               rest: float | None = None) -> dict[str, float]:
    """Predicted speed-up of the targeted linears at decode and prefill (full rank: kept dense), and of the
    model's decode step (``decode_model``) when ``rest``, its seconds outside these linears, is known."""
    planned = {name: None if rank >= min(shapes[name]) else rank for name, rank in ranks.items()}
    speed = {kind: predicted_speedup(table, shapes, planned, "pifa", prefill=kind == "prefill")
             for kind in ("decode", "prefill")}
    if rest is not None:
        speed["decode_model"] = predicted_speedup(table, shapes, planned, "pifa", rest=rest)
    return speed


def _density_for_speedup(config: CompressionConfig, table: LatencyTable, ctx: Context,
                         ranks_at: Callable[[float], tuple[dict[str, int], dict[str, float]]]) -> float:
    """The largest density whose plan's predicted decode speed-up (of the model's decode step where it was
    timed, else of the linears) reaches ``config.speedup`` (bisection; the speed-up falls as the density grows)."""
    def reaches(density: float) -> tuple[bool, float]:
        planned = {n: None if r >= min(ctx.shapes[n]) else r for n, r in ranks_at(density)[0].items()}
        speed = predicted_speedup(table, ctx.shapes, planned, "pifa", rest=ctx.rest or 0.0)
        return speed >= config.speedup, speed

    low, high = 0.05, 1.0
    while True:  # the lowest density that has a plan (a measured allocation may not reach the smallest)
        try:
            ok, best = reaches(low)
            break
        except ValueError:
            if low >= 0.95:
                raise
            low += 0.05
    if not ok:
        raise ValueError(f"speedup {config.speedup} is out of reach on this machine: the largest predicted decode "
                         f"speed-up of {speedup_scope(ctx.rest)} is {best:.2f}x (at density {low:.2f})")
    for _ in range(20):
        middle = (low + high) / 2
        low, high = (middle, high) if reaches(middle)[0] else (low, middle)
    return low


def _dense_spectra(ctx: Context) -> dict[str, torch.Tensor]:
    """Every targeted linear's singular values of W L (L L^T = its dense input statistics; L = I without
    whitening), from one dense pass over the calibration data."""
    spectra: dict[str, torch.Tensor] = {}

    def visit(index: int, linears: dict[str, nn.Module], grams: dict[str, torch.Tensor]) -> None:
        for name, module in linears.items():
            chol = solver.whitening(grams[name], ctx.config.damping) if ctx.config.spec.whiten else None
            spectra[name] = solver.singular_values(finite_weight(module, name), chol)

    dense_pass(ctx, visit)
    return spectra


def dense_pass(ctx: Context, visit: Callable[[int, dict[str, nn.Module], dict[str, torch.Tensor]], None]) -> None:
    """One dense pass over the calibration data; after each block, ``visit(index, its targeted linears,
    their input statistics X X^T in float64)`` while the block is resident."""
    blocks, targets, streams, device = ctx.blocks, ctx.targets, ctx.streams, ctx.device
    hidden = list(streams.compressed)
    for index, (block, linears) in enumerate(tqdm(list(zip(blocks, targets)), desc="pifa allocate", unit="block")):
        with streams.resident(index, block), on_device(block, device):
            grams: dict[str, torch.Tensor] = {}
            outputs = []
            for inputs, h in zip(streams.inputs, hidden):
                with record_inputs(linears) as seen:
                    outputs.append(checked_hidden(inputs.call(index, block, h, device), index).to("cpu", h.dtype))
                for name, x in seen.items():
                    grams[name] = solver.add_gram(grams.get(name), x)
            hidden = outputs
            for name in linears:
                distributed.all_reduce_sum(grams[name])
            visit(index, linears, grams)


def _owl_scales(ctx: Context) -> dict[str, float]:
    """OWL: per-block density multipliers from the dense pass over the calibration data (each input channel's
    norm is the square root of the diagonal of the linear's input statistics X X^T)."""
    config = ctx.config
    ratios, params = [], []

    def visit(index: int, linears: dict[str, nn.Module], grams: dict[str, torch.Tensor]) -> None:
        weights = [linear_weight(m) for m in linears.values()]
        norms = [torch.diagonal(grams[name]).sqrt() for name in linears]
        ratios.append(outlier_ratio(weights, norms, config.owl_threshold))
        params.append(sum(w.numel() for w in weights))

    dense_pass(ctx, visit)
    block_density = owl_block_densities(ratios, params, config.density, config.owl_lambda)
    logger.info("OWL outlier ratios %s -> block densities %s", ratios, block_density)
    return {name: block_density[i] / config.density for i, t in enumerate(ctx.targets) for name in t}


def _sensitivity_probe(ctx: Context) -> SensitivityProbe:
    """The dense model's states and logits on the first ``sensitivity_samples`` calibration sequences
    (of all the batches, under torch.distributed too: every rank measures the same and chooses the same)."""
    config, model, blocks, streams, device, batches = (ctx.config, ctx.model, ctx.blocks, ctx.streams, ctx.device,
                                                       ctx.batches)
    if streams.residency.streamed:
        raise ValueError("allocation 'sensitivity' runs the whole model for every measurement: it cannot stream "
                         "(compress the model in memory, not streamed, or use allocation 'spectrum')")
    subset = torch.cat(batches)[: config.sensitivity_samples, :MEASURE_TOKENS]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    logits = getattr(model(input_ids=subset.to(device)), "logits", None) if head is not None else None
    if logits is None:
        raise ValueError("allocation 'sensitivity' measures next-token distributions: it needs a causal LM")
    inputs = capture_block_inputs(model, blocks, [subset], device)
    return SensitivityProbe(blocks, inputs, output_head(model, streams.prefix), [logits], device,
                            cache=ctx.sensitivity_cache, calibration=batches)
