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
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, solver, sparse
from .allocation import Context, Plan, make_plan
from .budget import layer_parameters
from .capture import PausedForwards, capture_block_inputs, infer_groups
from .checkpoint import Checkpoint
from .config import CompressionConfig
from .faults import crash_point
from .layers import build_layer
from .model import (
    context_limit,
    find_blocks,
    inference_state,
    linear_shape,
    linear_weight,
    on_device,
    set_module,
    target_linears,
    write_weight,
)
from .report import CompressionReport, ModuleReport
from .sensitivity import SensitivityCache
from .streams import InMemory, Residency, Streams, checked_hidden, finite_weight, guard
from .validate import all_finite, check_positive_int, parse_device

logger = logging.getLogger(__name__)


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
    streams: Streams
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


def _check_context(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Calibration the model can read: real token ids (not on the meta device), no longer than its context."""
    if any(b.is_meta for b in batches):
        raise ValueError("calib is on the meta device: it holds no token ids (give a LongTensor with values)")
    context = context_limit(model)
    longest = max(b.shape[1] for b in batches)
    if context is not None and longest > context:
        raise ValueError(f"calibration sequences of {longest} tokens are longer than the model's context of "
                         f"{context} tokens (max_position_embeddings)")


def _check_vocabulary(model: nn.Module, batches: list[torch.Tensor]) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    high = max(int(b.max()) for b in batches)
    low = min(int(b.min()) for b in batches)
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        raise ValueError(f"calibration token ids span [{low}, {high}], outside the model's vocabulary of {vocab}")


def compress(
    model: nn.Module,
    config: CompressionConfig,
    calib: torch.Tensor | Iterable[torch.Tensor],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    checkpoint_dir: str | None = None,
    progress: bool = True,
    weights: Residency | None = None,
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
    batches, blocks_name, blocks, device, targets = _prepare(model, config, calib, device, batch_size)
    checkpoint = (Checkpoint.open(checkpoint_dir, config, batches, model, weights.fingerprint())
                  if checkpoint_dir else None)
    report = CompressionReport(config.to_dict(), calibration_tokens=sum(b.numel() for b in batches))
    report.stage_seconds["setup"] = time.perf_counter() - start  # checks and the checkpoint's fingerprint
    with inference_state(model):
        with report.stage("capture"):  # several processes: each calibrates on its share of the batches
            streams = Streams.start(capture_block_inputs(model, blocks, distributed.shard(batches), device),
                                     config.spec.reconstruct, weights, blocks_name)
        with report.stage("guard"):  # one forward and one replay of a batch
            report.replay_difference = guard(model, blocks, streams, device)
        with report.stage("allocate"):  # all the batches: every rank measures the same sensitivity subset
            plan = make_plan(Context(config, model, blocks, targets, streams, device, batches, sensitivity_cache))
        report.allocation_cost = plan.cost
        report.predicted_speedup = plan.speedup
        bar = tqdm(list(enumerate(blocks)), desc="pifa compress", unit="block", disable=not progress)
        run = _Run(config, plan, streams, device, report, bar)
        for index, module in bar:
            block = _Block(index, f"{blocks_name}.{index}", module, targets.pop(0))
            with contextlib.ExitStack() as resident:
                with _stage(report, "load", weights.streamed):  # read the block from the safetensors files
                    resident.enter_context(streams.resident(index, module))
                with on_device(module, device):
                    _run_block(run, block, checkpoint)
                with _stage(report, "write", weights.streamed):  # its shard of the output
                    weights.finished(module, block.prefix)
            del block  # the replaced linears go with it: nothing of a finished block stays referenced
    report.seconds = time.perf_counter() - start
    return report


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
    _check_context(model, batches)
    _check_vocabulary(model, batches)
    blocks_name, blocks = find_blocks(model)
    device = parse_device(device) if device is not None else next(model.parameters()).device
    targets = [target_linears(b, f"{blocks_name}.{i}", config.targets, config.ignore) for i, b in enumerate(blocks)]
    if not any(targets):
        raise ValueError(f"no linear in {blocks_name} matches targets {config.targets} minus ignore {config.ignore}")
    return batches, blocks_name, blocks, device, targets


def plan(model: nn.Module, config: CompressionConfig, calib: torch.Tensor | Iterable[torch.Tensor], *,
         device: torch.device | str | None = None, batch_size: int = 8, weights: Residency | None = None,
         sensitivity_cache: SensitivityCache | None = None) -> tuple[Plan, dict[str, tuple[int, int]]]:
    """What ``compress`` would do, without compressing: the plan and every targeted linear's shape.

    Runs the capture and, for data-driven allocations (owl, spectrum), their dense statistics pass;
    the model is left unchanged.
    """
    batches, blocks_name, blocks, device, targets = _prepare(model, config, calib, device, batch_size)
    with inference_state(model):
        streams = Streams.start(capture_block_inputs(model, blocks, distributed.shard(batches), device), False,
                                 weights or InMemory(), blocks_name)
        guard(model, blocks, streams, device)
        shapes = {n: linear_shape(m) for t in targets for n, m in t.items()}
        ctx = Context(config, model, blocks, targets, streams, device, batches, sensitivity_cache)
        return make_plan(ctx), shapes


def _run_block(run: _Run, block: _Block, checkpoint: Checkpoint | None) -> None:
    """Compress (or restore) one block, then move both streams past it."""
    resumed = checkpoint is not None and checkpoint.has_block(block.index)
    if block.linears and not resumed:
        with run.report.stage("groups"):
            for name, module in block.linears.items():
                finite_weight(module, name)
            if run.streams.dense is None:  # with two streams, the dense pass finds the groups on its way
                local = {block.local(n): m for n, m in block.linears.items()}
                block.groups = infer_groups(block.index, block.module, local, run.streams.inputs[0], run.device)
    if run.streams.dense is not None:
        run.bar.set_postfix(stage="dense stream")
        with run.report.stage("propagate"):
            dense = copy.deepcopy(block.module)
            linears = {} if resumed else {block.local(n): dense.get_submodule(block.local(n)) for n in block.linears}
            block.groups, block.dense_inputs, block.dense_outputs = run.streams.advance_dense(
                dense, run.device, block.index, block.prefix, linears)
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
            run.streams.compressed = [checked_hidden(h, block.index).to("cpu", old.dtype)
                                      for h, old in zip(forwards.finish(), run.streams.compressed)]


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
    weight = finite_weight(module, full)
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

