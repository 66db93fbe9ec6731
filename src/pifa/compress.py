"""``pifa.compress``: the block-by-block engine.

data -> capture every block's inputs (checked against the model's own forward) -> per block: infer
groups, collect statistics for each group, solve, swap layers -> propagate both streams -> next block.
Only the current block sits on the compute device; activations wait on the CPU.
What each method does comes from :data:`pifa.config.METHODS`; nothing here tests method names.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, solver, sparse
from .budget import (
    allocate_ranks,
    cap_to_break_even,
    layer_parameters,
    outlier_ratio,
    owl_block_densities,
    spectrum_ranks,
    split_densities,
)
from .capture import (
    BlockInputs,
    PausedForwards,
    capture_block_inputs,
    check_replay,
    group_by_input,
    infer_groups,
    layer_inputs,
    record_inputs,
    record_outputs,
)
from .checkpoint import Checkpoint
from .config import CompressionConfig
from .faults import crash_point
from .latency import LatencyTable, load_or_measure, predicted_speedup
from .layers import build_layer
from .model import (
    find_blocks,
    inference_state,
    is_attention,
    linear_shape,
    linear_weight,
    on_device,
    set_module,
    target_linears,
    write_weight,
)
from .report import CompressionReport, ModuleReport
from .sensitivity import MEASURE_TOKENS, MEASURE_VOCAB, SensitivityCache, SensitivityProbe, output_head
from .validate import all_finite, check_positive_int, parse_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Where the density goes: per-module ranks for low-rank methods, densities for sparse ones."""

    ranks: dict[str, int] = field(default_factory=dict)
    densities: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # what chose each rank (spectrum: discarded energy)
    cost: dict[str, float] = field(default_factory=dict)  # what a measured allocation cost (seconds, passes)
    speedup: dict[str, float] = field(default_factory=dict)  # with a latency table: predicted, decode / prefill
    density: float | None = None  # the density planned for (a speedup target chooses it)


class InMemory:
    """Where the engine finds block weights: in the model, all the time (see ``pifa.streaming`` for the
    streamed alternative, which loads each block when needed and writes it out when finished)."""

    @contextlib.contextmanager
    def resident(self, module: nn.Module, prefix: str) -> Iterator[None]:
        """The block's weights are present inside the ``with`` (here: always)."""
        yield

    def finished(self, module: nn.Module, prefix: str) -> None:
        """The block is compressed (or restored from the checkpoint) and will not change again."""

    def fingerprint(self) -> str | None:
        """The model's fingerprint for the checkpoint, or ``None`` to hash the model's own tensors."""
        return None


@dataclass
class _Streams:
    """Block inputs per batch: the compressed stream, and the dense one when M needs it;
    ``residency`` says how to reach each block's weights (whole model in memory, or streamed)."""

    inputs: list[BlockInputs]
    compressed: list[torch.Tensor]
    dense: list[torch.Tensor] | None
    residency: InMemory
    prefix: str  # the blocks' name in the model, e.g. "model.layers"

    @classmethod
    def start(cls, inputs: list[BlockInputs], two_streams: bool, residency: InMemory, prefix: str) -> _Streams:
        hidden = [i.hidden for i in inputs]
        return cls(inputs, hidden, list(hidden) if two_streams else None, residency, prefix)

    def resident(self, index: int, module: nn.Module) -> contextlib.AbstractContextManager[None]:
        return self.residency.resident(module, f"{self.prefix}.{index}")

    def advance_compressed(self, block: nn.Module, device: torch.device, index: int) -> None:
        self.compressed = [_checked(i.call(index, block, h, device), index).to("cpu", h.dtype)
                           for i, h in zip(self.inputs, self.compressed)]

    def advance_dense(self, block: nn.Module, device: torch.device, index: int, prefix: str,
                      linears: dict[str, nn.Module], groups: list[list[str]] | None
                      ) -> tuple[list[list[str]], dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """Run the dense block on the dense stream. Returns the groups of ``linears`` (``groups``, or when
        that is None inferred on the first batch, saving a pass) and, per batch, what M needs of the dense
        stream: the input of each group's first linear, or for a group whose outputs are narrower than
        its input (``_by_outputs``), the outputs of its linears."""
        inputs_seen: dict[str, list[torch.Tensor]] = {}
        outputs_seen: dict[str, list[torch.Tensor]] = {}
        narrow = {name: m for name, m in linears.items() if _narrow(m)}  # may be recorded by their outputs
        outputs = []
        for inputs, hidden in zip(self.inputs, self.dense or []):
            order: list[tuple[str, torch.Tensor]] | None = [] if groups is None else None
            if groups is None:
                record_in, record_out = linears, narrow
            else:
                record_in = {g[0]: linears[g[0]] for g in groups if not _by_outputs(linears, g)}
                record_out = {n: linears[n] for g in groups if _by_outputs(linears, g) for n in g}
            with record_inputs(record_in, order) as batch_inputs, record_outputs(record_out) as batch_outputs:
                output = inputs.call(index, block, hidden, device)
            if order is not None:
                groups = group_by_input(order)
                del order
            for group in groups or []:
                by_outputs = _by_outputs(linears, group)
                for name, seen, kept in ([(n, batch_outputs, outputs_seen) for n in group] if by_outputs
                                         else [(group[0], batch_inputs, inputs_seen)]):
                    if not all_finite(seen[name]):
                        side = "output" if by_outputs else "input"
                        raise ValueError(f"non-finite activations at the {side} of {prefix}.{name} in block {index}")
                    kept.setdefault(name, []).append(seen[name].to("cpu"))
            del batch_inputs, batch_outputs
            outputs.append(_checked(output, index).to("cpu", hidden.dtype))
        self.dense = outputs
        return groups or [], inputs_seen, outputs_seen


def _narrow(module: nn.Module) -> bool:
    """Outputs narrower than inputs, computed in float32 or float64 (a half-precision output is rounded
    after the product: W H from it would no longer equal W H from the inputs to round-off)."""
    weight = linear_weight(module)
    return weight.shape[0] < weight.shape[1] and weight.dtype in (torch.float32, torch.float64)


def _by_outputs(linears: dict[str, nn.Module], group: list[str]) -> bool:
    """Whether M's dense term W H of ``group`` is summed from the dense outputs (sum y x~^T, m x n per
    linear) rather than from its dense input (H = sum x x~^T, n x n): when the group's outputs together
    are narrower than its input, as for down_proj. Fewer flops and less memory, the same W H."""
    shapes = [linear_weight(linears[name]).shape for name in group]
    return all(_narrow(linears[name]) for name in group) and sum(m for m, _ in shapes) < shapes[0][1]


@dataclass
class _Block:
    """The block being compressed: its index, name prefix, targeted linears (by full name) and groups."""

    index: int
    prefix: str
    module: nn.Module
    linears: dict[str, nn.Module]
    groups: list[list[str]] = field(default_factory=list)
    dense_inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    dense_outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def local(self, full: str) -> str:
        return full.removeprefix(self.prefix + ".")


@dataclass
class _Run:
    """What every block of one ``compress`` call shares."""

    config: CompressionConfig
    plan: Plan
    streams: _Streams
    device: torch.device
    report: CompressionReport
    bar: tqdm


def _as_batches(calib: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    check_positive_int(batch_size, "batch_size")
    if calib is None:
        raise ValueError("calib must be a LongTensor [N, T] of token ids, got None")
    batches = list(calib.split(batch_size)) if isinstance(calib, torch.Tensor) else list(calib)
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in (torch.int64, torch.int32)
                          or b.numel() == 0 for b in batches):
        raise ValueError("calib must be a non-empty LongTensor [N, T] or an iterable of such batches")
    return batches


def _check_vocabulary(model: nn.Module, batches: list[torch.Tensor]) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    high = max(int(b.max()) for b in batches)
    low = min(int(b.min()) for b in batches)
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        raise ValueError(f"calibration token ids span [{low}, {high}], outside the model's vocabulary of {vocab}")


def _checked(hidden: torch.Tensor, index: int) -> torch.Tensor:
    if not all_finite(hidden):
        raise ValueError(f"non-finite activations at the output of block {index}")
    return hidden


def compress(
    model: nn.Module,
    config: CompressionConfig,
    calib: torch.Tensor | Iterable[torch.Tensor],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    checkpoint_dir: str | None = None,
    progress: bool = True,
    weights: InMemory | None = None,
    sensitivity_cache: SensitivityCache | None = None,
) -> CompressionReport:
    """Compress ``model`` in place; returns the per-module report.

    ``calib`` is a LongTensor [N, T] of token ids (or an iterable of such batches).
    With ``checkpoint_dir``, every finished block is saved there and a later call with the
    same arguments resumes after the last finished block, producing identical tensors.
    ``weights``: how block weights are reached (default: in ``model``; ``pifa.streaming`` passes
    its own). Under torch.distributed every rank calibrates on its share of the batches.
    ``sensitivity_cache``: allocation "sensitivity" reuses the measurements it holds from earlier
    calls on the same dense model (a density sweep; see :class:`pifa.sensitivity.SensitivityCache`).
    """
    start = time.perf_counter()
    weights = weights or InMemory()
    streamed = type(weights) is not InMemory
    batches, blocks_name, blocks, device, targets = _prepare(model, config, calib, device, batch_size)
    checkpoint = (Checkpoint.open(checkpoint_dir, config, batches, model, weights.fingerprint())
                  if checkpoint_dir else None)
    report = CompressionReport(config.to_dict(), calibration_tokens=sum(b.numel() for b in batches))
    report.stage_seconds["setup"] = time.perf_counter() - start  # checks and the checkpoint's fingerprint
    with inference_state(model):
        with report.stage("capture"):  # several processes: each calibrates on its share of the batches
            streams = _Streams.start(capture_block_inputs(model, blocks, distributed.shard(batches), device),
                                     config.spec.reconstruct, weights, blocks_name)
        with report.stage("guard"):  # one forward and one replay of a batch
            report.replay_difference = _guard(model, blocks, streams, device)
        with report.stage("allocate"):  # all the batches: every rank measures the same sensitivity subset
            plan = _plan(config, blocks, targets, streams, device, model, batches, sensitivity_cache)
        report.allocation_cost = plan.cost
        report.predicted_speedup = plan.speedup
        bar = tqdm(list(enumerate(blocks)), desc="pifa compress", unit="block", disable=not progress)
        run = _Run(config, plan, streams, device, report, bar)
        for index, module in bar:
            block = _Block(index, f"{blocks_name}.{index}", module, targets.pop(0))
            with contextlib.ExitStack() as resident:
                with _stage(report, "load", streamed):  # read the block from the safetensors files
                    resident.enter_context(streams.resident(index, module))
                with on_device(module, device):
                    _run_block(run, block, checkpoint)
                with _stage(report, "write", streamed):  # its shard of the output
                    weights.finished(module, block.prefix)
            del block  # the replaced linears go with it: nothing of a finished block stays referenced
    report.seconds = time.perf_counter() - start
    return report


def _guard(model: nn.Module, blocks: nn.ModuleList, streams: _Streams, device: torch.device) -> float:
    """The replay guard (``pifa.capture.check_replay``) on the first calibration batch: the engine's replay of
    the dense blocks must equal the model's own forward, or nothing is compressed. Returns the largest
    difference."""
    def resident(index: int, block: nn.Module) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(streams.resident(index, block))
        stack.enter_context(on_device(block, device))
        return stack

    first = streams.inputs[0]
    batch = first.ids
    difference = check_replay(model, blocks, batch, first, device, resident)
    logger.info("replay guard: the replayed dense blocks equal the model's own forward (largest difference %.3g)",
                difference)
    return difference


def _stage(report: CompressionReport, name: str, timed: bool) -> contextlib.AbstractContextManager[None]:
    """``report.stage(name)`` when ``timed``; stages that do not apply to a run stay out of its report."""
    return report.stage(name) if timed else contextlib.nullcontext()


def _prepare(model: nn.Module, config: CompressionConfig, calib: torch.Tensor | Iterable[torch.Tensor],
             device: torch.device | str | None, batch_size: int
             ) -> tuple[list[torch.Tensor], str, nn.ModuleList, torch.device, list[dict[str, nn.Module]]]:
    """Checked inputs: the calibration batches, the block list (name, modules), the device, each block's targets."""
    if not isinstance(config, CompressionConfig):
        raise ValueError(f"config must be a pifa.CompressionConfig, got {type(config).__name__}")
    batches = _as_batches(calib, batch_size)
    _check_vocabulary(model, batches)
    blocks_name, blocks = find_blocks(model)
    device = parse_device(device) if device is not None else next(model.parameters()).device
    targets = [target_linears(b, f"{blocks_name}.{i}", config.targets, config.ignore) for i, b in enumerate(blocks)]
    if not any(targets):
        raise ValueError(f"no linear in {blocks_name} matches targets {config.targets} minus ignore {config.ignore}")
    return batches, blocks_name, blocks, device, targets


def plan(model: nn.Module, config: CompressionConfig, calib: torch.Tensor | Iterable[torch.Tensor], *,
         device: torch.device | str | None = None, batch_size: int = 8, weights: InMemory | None = None,
         sensitivity_cache: SensitivityCache | None = None) -> tuple[Plan, dict[str, tuple[int, int]]]:
    """What ``compress`` would do, without compressing: the plan and every targeted linear's shape.

    Runs the capture and, for data-driven allocations (owl, spectrum), their dense statistics pass;
    the model is left unchanged.
    """
    batches, blocks_name, blocks, device, targets = _prepare(model, config, calib, device, batch_size)
    with inference_state(model):
        streams = _Streams.start(capture_block_inputs(model, blocks, distributed.shard(batches), device), False,
                                 weights or InMemory(), blocks_name)
        _guard(model, blocks, streams, device)
        shapes = {n: linear_shape(m) for t in targets for n, m in t.items()}
        return _plan(config, blocks, targets, streams, device, model, batches, sensitivity_cache), shapes


def _run_block(run: _Run, block: _Block, checkpoint: Checkpoint | None) -> None:
    """Compress (or restore) one block, then move both streams past it."""
    resumed = checkpoint is not None and checkpoint.has_block(block.index)
    if block.linears and not resumed:
        with run.report.stage("groups"):
            for name, module in block.linears.items():
                _finite_weight(module, name)
            if run.streams.dense is None:  # with two streams, the dense pass finds the groups on its way
                local = {block.local(n): m for n, m in block.linears.items()}
                block.groups = infer_groups(block.index, block.module, local, run.streams.inputs[0], run.device)
    if run.streams.dense is not None:
        run.bar.set_postfix(stage="dense stream")
        with run.report.stage("propagate"):
            dense = copy.deepcopy(block.module)
            linears = {} if resumed else {block.local(n): dense.get_submodule(block.local(n)) for n in block.linears}
            block.groups, block.dense_inputs, block.dense_outputs = run.streams.advance_dense(
                dense, run.device, block.index, block.prefix, linears, [] if resumed else None)
            del dense
    if resumed:
        with run.report.stage("checkpoint"):
            run.report.modules += checkpoint.restore_block(block.index, block.module, block.prefix)
        run.bar.set_postfix(stage="propagate")
        with run.report.stage("propagate"):
            run.streams.advance_compressed(block.module, run.device, block.index)
        return
    # the compressed stream runs through the block once per batch, paused at each group's input (no replays)
    local = {block.local(n): m for n, m in block.linears.items()}
    with PausedForwards(block.index, block.module, run.streams.inputs, run.streams.compressed, run.device,
                        local) as forwards:
        run.report.modules += _compress_block(run, block, forwards)
        with _stage(run.report, "broadcast", distributed.active()):
            distributed.broadcast_module(block.module)  # every rank keeps rank 0's layers, bit for bit
        if checkpoint is not None and distributed.is_main():
            with run.report.stage("checkpoint"):
                checkpoint.save_block(block.index, block.module, block.prefix, run.report.modules)
        run.bar.set_postfix(stage="propagate")
        with run.report.stage("propagate"):
            run.streams.compressed = [_checked(h, block.index).to("cpu", old.dtype)
                                      for h, old in zip(forwards.finish(), run.streams.compressed)]


def _plan(config: CompressionConfig, blocks: nn.ModuleList, targets: list[dict[str, nn.Module]],
          streams: _Streams, device: torch.device, model: nn.Module, batches: list[torch.Tensor],
          sensitivity_cache: SensitivityCache | None = None) -> Plan:
    """Per module: its rank (low-rank methods) or its density (sparse methods)."""
    shapes = {name: linear_shape(m) for t in targets for name, m in t.items()}
    if config.nm is not None:
        return Plan(densities={name: config.density for name in shapes})
    attention = {n: is_attention(n) for n in shapes}
    scale = _owl_scales(config, blocks, targets, streams, device) if config.allocation == "owl" else None

    def densities_at(density: float) -> dict[str, float]:
        split = split_densities(shapes, attention, density, config.attn_density)
        return split if scale is None else {name: min(1.0, d * scale[name]) for name, d in split.items()}

    if not config.spec.low_rank:
        return Plan(densities=densities_at(config.density))
    pools = {n: ("attention" if is_attention(n) else "mlp") if config.attn_density is not None else "all"
             for n in shapes}
    table, ceilings = _latency(config, shapes, targets, device)
    cost: dict[str, float] = {}
    if config.allocation == "spectrum":
        spectra = _dense_spectra(config, blocks, targets, streams, device)

        def choose(densities: dict[str, float]) -> tuple[dict[str, int], dict[str, float]]:
            return spectrum_ranks(shapes, spectra, densities, config.layer_kind, config.rank_multiple_of, pools=pools)
    elif config.allocation == "sensitivity":
        probe = _sensitivity_probe(config, model, blocks, streams, device, batches, sensitivity_cache)
        densities = densities_at(config.density)

        def visit(index: int, linears: dict[str, nn.Module], grams: dict[str, torch.Tensor]) -> None:
            probe.measure_block(index, linears, grams, shapes, densities, config.layer_kind, config.spec.whiten,
                                config.damping, config.rank_multiple_of)

        _dense_pass(blocks, targets, streams, device, visit)

        def choose(densities: dict[str, float]) -> tuple[dict[str, int], dict[str, float]]:
            return probe.choose(shapes, densities, pools, config.rank_multiple_of, ceilings)[:2]
        measured = probe.choose(shapes, densities, pools, config.rank_multiple_of, ceilings)[2]
        cost = {"seconds": measured.seconds, "forward_passes": measured.forward_passes,
                "reused_measurements": measured.reused}
        logger.info("sensitivity allocation: %.1f s, %d block forward passes, %d measurements reused (KL over the "
                    "%s, %.1f %% of the dense probability)", measured.seconds, measured.forward_passes,
                    measured.reused, "whole vocabulary" if probe.coverage == 1.0 else
                    f"{MEASURE_VOCAB} most probable tokens", 100 * probe.coverage)
    else:
        def choose(densities: dict[str, float]) -> tuple[dict[str, int], dict[str, float]]:
            return allocate_ranks(shapes, densities, config.layer_kind, config.rank_multiple_of), {}

    def ranks_at(density: float) -> tuple[dict[str, int], dict[str, float]]:
        densities = densities_at(density)
        ranks, scores = choose(densities)
        return (ranks if ceilings is None else cap_to_break_even(ranks, shapes, ceilings, densities, pools)), scores

    density = config.density if config.speedup is None else _density_for_speedup(config, table, shapes, ranks_at)
    ranks, scores = ranks_at(density)
    return Plan(ranks=ranks, scores=scores, cost=cost,
                speedup=_predicted(table, shapes, ranks) if table is not None else {},
                density=density)


def _latency(config: CompressionConfig, shapes: dict[str, tuple[int, int]], targets: list[dict[str, nn.Module]],
             device: torch.device) -> tuple[LatencyTable | None, dict[str, int] | None]:
    """With ``config.latency_table``: the table (measured here when the file lacks these shapes) and every
    linear's break-even rank; (None, None) without."""
    if config.latency_table is None:
        return None, None
    dtype = next(linear_weight(m).dtype for t in targets for m in t.values())
    if distributed.active():  # ranks timing on their own could plan differently: measure once, beforehand
        table = load_or_measure(config.latency_table, set(shapes.values()), "pifa", device, dtype, measure=False)
    else:
        table = load_or_measure(config.latency_table, set(shapes.values()), "pifa", device, dtype)
    return table, {name: table.break_even(m, n, "pifa") for name, (m, n) in shapes.items()}


def _predicted(table: LatencyTable, shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> dict[str, float]:
    """Predicted speed-up of the targeted linears at decode and prefill (full rank: kept dense)."""
    planned = {name: None if rank >= min(shapes[name]) else rank for name, rank in ranks.items()}
    return {kind: predicted_speedup(table, shapes, planned, "pifa", prefill=kind == "prefill")
            for kind in ("decode", "prefill")}


def _density_for_speedup(config: CompressionConfig, table: LatencyTable, shapes: dict[str, tuple[int, int]],
                         ranks_at: Callable[[float], tuple[dict[str, int], dict[str, float]]]) -> float:
    """The largest density whose plan's predicted decode speed-up of the linears reaches ``config.speedup``
    (bisection; the speed-up falls as the density grows)."""
    def reaches(density: float) -> tuple[bool, float]:
        speed = _predicted(table, shapes, ranks_at(density)[0])["decode"]
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
                         f"speed-up of these linears is {best:.2f}x (at density {low})")
    for _ in range(20):
        middle = (low + high) / 2
        low, high = (middle, high) if reaches(middle)[0] else (low, middle)
    return low


def _dense_spectra(config: CompressionConfig, blocks: nn.ModuleList, targets: list[dict[str, nn.Module]],
                   streams: _Streams, device: torch.device) -> dict[str, torch.Tensor]:
    """Every targeted linear's singular values of W L (L L^T = its dense input statistics; L = I without
    whitening), from one dense pass over the calibration data."""
    spectra: dict[str, torch.Tensor] = {}

    def visit(index: int, linears: dict[str, nn.Module], grams: dict[str, torch.Tensor]) -> None:
        for name, module in linears.items():
            chol = solver.whitening(grams[name], config.damping) if config.spec.whiten else None
            spectra[name] = solver.singular_values(_finite_weight(module, name), chol)

    _dense_pass(blocks, targets, streams, device, visit)
    return spectra


def _dense_pass(blocks: nn.ModuleList, targets: list[dict[str, nn.Module]], streams: _Streams, device: torch.device,
                visit: Callable[[int, dict[str, nn.Module], dict[str, torch.Tensor]], None]) -> None:
    """One dense pass over the calibration data; after each block, ``visit(index, its targeted linears,
    their input statistics X X^T in float64)`` while the block is resident."""
    hidden = list(streams.compressed)
    for index, (block, linears) in enumerate(tqdm(list(zip(blocks, targets)), desc="pifa allocate", unit="block")):
        with streams.resident(index, block), on_device(block, device):
            grams: dict[str, torch.Tensor] = {}
            outputs = []
            for inputs, h in zip(streams.inputs, hidden):
                with record_inputs(linears) as seen:
                    outputs.append(_checked(inputs.call(index, block, h, device), index).to("cpu", h.dtype))
                for name, x in seen.items():
                    grams[name] = solver.add_gram(grams.get(name), x)
            hidden = outputs
            for name in linears:
                distributed.all_reduce_sum(grams[name])
            visit(index, linears, grams)


def _owl_scales(config: CompressionConfig, blocks: nn.ModuleList, targets: list[dict[str, nn.Module]],
                streams: _Streams, device: torch.device) -> dict[str, float]:
    """OWL: per-block density multipliers from a dense pass over the calibration data."""
    hidden = list(streams.compressed)
    ratios, params = [], []
    for index, (block, linears) in enumerate(zip(blocks, targets)):
        with streams.resident(index, block), on_device(block, device):
            norms = {name: 0.0 for name in linears}
            for inputs, h in zip(streams.inputs, hidden):
                for name, module in linears.items():
                    x = layer_inputs(index, block, module, inputs, h, device).double()
                    norms[name] = norms[name] + x.square().sum(0)
            for name in linears:
                distributed.all_reduce_sum(norms[name])
            weights = [linear_weight(m) for m in linears.values()]
            ratios.append(outlier_ratio(weights, [norms[n].sqrt() for n in linears], config.owl_threshold))
            params.append(sum(w.numel() for w in weights))
            hidden = [_checked(i.call(index, block, h, device), index).to("cpu", h.dtype)
                      for i, h in zip(streams.inputs, hidden)]
    block_density = owl_block_densities(ratios, params, config.density, config.owl_lambda)
    logger.info("OWL outlier ratios %s -> block densities %s", ratios, block_density)
    return {name: block_density[i] / config.density for i, t in enumerate(targets) for name in t}


def _group_statistics(run: _Run, block: _Block, group: list[str], forwards: PausedForwards
                      ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """G = sum x~ x~^T (n, n) over the calibration tokens and, for M, either H = sum x x~^T (n, n) or,
    for a group recorded by its dense outputs y, W H = sum y x~^T (m, n) per linear; float64."""
    first = group[0]
    dense_inputs = block.dense_inputs.get(first)
    dense_outputs = {name: block.dense_outputs[name] for name in group if name in block.dense_outputs}
    g = h = None
    wh: dict[str, torch.Tensor] = {}
    for b, x_c in enumerate(forwards.inputs_of(first)):
        g = solver.add_gram(g, x_c)
        xf = x_c.float()
        if dense_inputs is not None:
            x_d = dense_inputs[b].to(run.device).float()
            h = _accumulate(h, x_d.T @ xf)
        for name, ys in dense_outputs.items():
            bias = getattr(block.module.get_submodule(name), "bias", None)  # y = W x + b: W x x~^T wanted
            y = ys[b].to(run.device).float() if bias is None else ys[b].to(run.device).float() - bias.float()
            wh[name] = _accumulate(wh.get(name), y.T @ xf)
    if not all_finite(torch.diagonal(g)):  # a NaN or Inf in x~ makes its column's sum of squares so
        raise ValueError(f"non-finite activations at the input of {block.prefix}.{first} in block {block.index}")
    for total in (g, h, *wh.values()):  # several processes: the sums over every rank's tokens
        if total is not None:
            distributed.all_reduce_sum(total)
    return g, h, wh


def _accumulate(total: torch.Tensor | None, product: torch.Tensor) -> torch.Tensor:
    """total + product in float64 (the first product becomes the total)."""
    return product.double() if total is None else total.add_(product)


def _compress_block(run: _Run, block: _Block, forwards: PausedForwards) -> list[ModuleReport]:
    reports: list[ModuleReport] = []
    spec = run.config.spec
    for group in block.groups:
        run.bar.set_postfix(stage=f"statistics {group[0]}")
        with run.report.stage("statistics"):
            g, h, wh = _group_statistics(run, block, group, forwards)
        block.dense_inputs.pop(group[0], None)
        for name in group:
            block.dense_outputs.pop(name, None)
        run.bar.set_postfix(stage=f"solve {group[0]}")
        if not spec.low_rank:
            reports += [_prune_linear(run, block, name, g) for name in group]
            continue
        with run.report.stage("whitening"):
            chol = solver.whitening(g, run.config.damping) if spec.whiten else None
        with run.report.stage("truncate"):
            starts = {}
            for name in group:
                weight = linear_weight(block.module.get_submodule(name))
                start = solver.truncate(weight, chol, run.plan.ranks[f"{block.prefix}.{name}"])
                starts[name] = start, solver.output_energy(weight, g, chol, start.energy)  # ||W X~||^2
        del chol  # M needs G and H only: one (n, n) float64 matrix less at its peak
        reports += [_solve_linear(run, block, name, g, h, wh.pop(name, None), *starts.pop(name)) for name in group]
        del g, h
        crash_point(f"block:{block.index}:group")
    return reports


def _finite_weight(module: nn.Module, full: str) -> torch.Tensor:
    weight = linear_weight(module)
    if not all_finite(weight):
        raise ValueError(f"non-finite weights (NaN or Inf) in {full}")
    return weight


def _solve_linear(run: _Run, block: _Block, local: str, g: torch.Tensor, h: torch.Tensor | None,
                  wh: torch.Tensor | None, start: solver.Truncation, energy: float) -> ModuleReport:
    """M from the truncation ``start`` when the method reconstructs (from H, or from W H itself), then the
    layer swap (``energy``: ||W X~||^2, the calibration error's denominator)."""
    config, report, full = run.config, run.report, f"{block.prefix}.{local}"
    module = block.module.get_submodule(local)
    weight = linear_weight(module)
    rank = run.plan.ranks[full]
    up, down, down_g = start.up, start.down, None
    if config.spec.reconstruct and (h is not None or wh is not None):
        with report.stage("m-reconstruct"):
            try:
                up, down, down_g = solver.m_reconstruct(weight, up, down, g, h, config.mix, config.als_steps,
                                                        config.ridge, wh=wh)
            except solver.SingularSystem:
                logger.warning("%s: singular M system (rank-deficient layer); keeping the whitened truncation", full)
    m, n = weight.shape
    if config.layer_kind == "pivot" and rank >= min(m, n):  # full rank: the dense form is as small, and faster
        with report.stage("error"):
            error = solver.lowrank_error(weight, up, down, g, energy, down_g)
        write_weight(module, (up @ down).to(weight.dtype))
        return ModuleReport(full, "dense", m, n, rank, m * n, m * n, error, run.plan.scores.get(full))
    bias = None if getattr(module, "bias", None) is None else module.bias.detach()
    with report.stage("pifa" if config.layer_kind == "pivot" else "swap"):
        layer = build_layer(config.layer_kind, up, down, bias, weight.dtype, config.pivot_method).to(weight.device)
    set_module(block.module, local, layer)
    with report.stage("error"):
        error = solver.lowrank_error(weight, up, down, g, energy, down_g)
    return ModuleReport(full, config.layer_kind, m, n, rank, m * n, layer_parameters(m, n, rank, config.layer_kind),
                        error, run.plan.scores.get(full))



def _prune_linear(run: _Run, block: _Block, local: str, g: torch.Tensor) -> ModuleReport:
    """Sparse baselines: zeros written into the layer's own weight (nn.Linear or Conv1D)."""
    config, full = run.config, f"{block.prefix}.{local}"
    module = block.module.get_submodule(local)
    weight = _finite_weight(module, full)
    with run.report.stage("prune"):
        pruned, perm = sparse.prune_permuted(config.spec.sparse_rule, weight, g.to(weight.device),
                                             run.plan.densities[full], config.nm, config.permute)
    write_weight(module, pruned)
    m, n = weight.shape
    with run.report.stage("error"):
        error = solver.output_error(weight, pruned, g)
    return ModuleReport(full, "sparse", m, n, 0, m * n, int(torch.count_nonzero(pruned)), error,
                        nm_in_storage=None if config.nm is None else sparse.is_nm(pruned, config.nm),
                        input_permutation=None if perm is None else perm.tolist())


def _sensitivity_probe(config: CompressionConfig, model: nn.Module, blocks: nn.ModuleList, streams: _Streams,
                       device: torch.device, batches: list[torch.Tensor],
                       cache: SensitivityCache | None = None) -> SensitivityProbe:
    """The dense model's states and logits on the first ``sensitivity_samples`` calibration sequences
    (of all the batches, under torch.distributed too: every rank measures the same and chooses the same)."""
    if type(streams.residency) is not InMemory:
        raise ValueError("allocation 'sensitivity' runs the whole model for every measurement: it cannot stream "
                         "(run without --stream, or use allocation 'spectrum')")
    subset = torch.cat(batches)[: config.sensitivity_samples, :MEASURE_TOKENS]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    logits = getattr(model(input_ids=subset.to(device)), "logits", None) if head is not None else None
    if logits is None:
        raise ValueError("allocation 'sensitivity' measures next-token distributions: it needs a causal LM")
    inputs = capture_block_inputs(model, blocks, [subset], device)
    return SensitivityProbe(blocks, inputs, output_head(model, streams.prefix), [logits], device, cache=cache,
                            calibration=batches)
