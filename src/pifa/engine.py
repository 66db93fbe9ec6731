"""``pifa.compress``: the block-by-block engine.

data -> capture the first block's inputs -> per block: infer groups, collect statistics
for each group, solve, swap layers -> propagate both streams -> next block.
Only the current block sits on the compute device; activations wait on the CPU.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import solver, sparse
from .allocation import allocate_ranks, outlier_ratio, owl_block_densities, split_densities
from .capture import BlockInputs, capture_first_block, infer_groups, layer_inputs
from .checkpoint import Checkpoint
from .config import CompressionConfig
from .faults import crash_point
from .modules import (
    build_layer, find_blocks, inference_state, is_attention, linear_shape, linear_weight, set_module, target_linears,
)
from .ranks import layer_parameters
from .report import CompressionReport, ModuleReport

logger = logging.getLogger(__name__)
RANK_KIND = {"pivot": "pifa", "lowrank": "lowrank"}


def _as_batches(calib: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    batches = list(calib.split(batch_size)) if isinstance(calib, torch.Tensor) else list(calib)
    if not batches or any(b.dim() != 2 or b.dtype not in (torch.int64, torch.int32) for b in batches):
        raise ValueError("calib must be a LongTensor [N, T] or an iterable of such batches")
    return batches


@dataclass
class _Streams:
    """Block inputs per batch: the compressed stream, and the dense one when M needs it."""

    inputs: list[BlockInputs]
    compressed: list[torch.Tensor]
    dense: list[torch.Tensor] | None

    def advance(self, block: nn.Module, dense_block: nn.Module | None, device: torch.device, index: int) -> None:
        self.compressed = [_checked(i.call(block, h, device), index).to("cpu", h.dtype)
                           for i, h in zip(self.inputs, self.compressed)]
        if self.dense is not None and dense_block is not None:
            self.dense = [_checked(i.call(dense_block, h, device), index).to("cpu", h.dtype)
                          for i, h in zip(self.inputs, self.dense)]


def _checked(hidden: torch.Tensor, index: int) -> torch.Tensor:
    if not bool(torch.isfinite(hidden).all()):
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
) -> CompressionReport:
    """Compress ``model`` in place; returns the per-module report.

    ``calib`` is a LongTensor [N, T] of token ids (or an iterable of such batches).
    With ``checkpoint_dir``, every finished block is saved there and a later call with the
    same arguments resumes after the last finished block, producing identical tensors.
    """
    start = time.perf_counter()
    batches = _as_batches(calib, batch_size)
    blocks_name, blocks = find_blocks(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    targets = [target_linears(b, f"{blocks_name}.{i}", config.targets, config.ignore) for i, b in enumerate(blocks)]
    if not any(targets):
        raise ValueError(f"no linear in {blocks_name} matches targets {config.targets} minus ignore {config.ignore}")
    checkpoint = Checkpoint.open(checkpoint_dir, config, batches, model) if checkpoint_dir else None
    report = CompressionReport(config.to_dict(), calibration_tokens=sum(b.numel() for b in batches))
    with inference_state(model):
        with report.stage("capture"):
            streams = _Streams(capture_first_block(model, blocks[0], batches, device), [], None)
        streams.compressed = [i.hidden for i in streams.inputs]
        if config.method in ("m", "mpifa"):
            streams.dense = list(streams.compressed)
        with report.stage("allocate"):
            plan = _plan(config, blocks, targets, streams, device)
        bar = tqdm(list(enumerate(blocks)), desc="pifa compress", unit="block", disable=not progress)
        for index, block in bar:
            home = next(block.parameters()).device
            block.to(device)
            dense_block = copy.deepcopy(block) if streams.dense is not None else None
            if checkpoint is not None and checkpoint.has_block(index):
                report.modules += checkpoint.restore_block(index, block, f"{blocks_name}.{index}")
            else:
                report.modules += _compress_block(block, dense_block, index, f"{blocks_name}.{index}",
                                                  targets[index], plan, streams, config, device, bar, report)
                if checkpoint is not None:
                    checkpoint.save_block(index, block, f"{blocks_name}.{index}", report.modules)
            bar.set_postfix(stage="propagate")
            with report.stage("propagate"):
                streams.advance(block, dense_block, device, index)
            block.to(home)
            del dense_block
    report.seconds = time.perf_counter() - start
    return report


def _plan(config: CompressionConfig, blocks: nn.ModuleList, targets: list[dict[str, nn.Module]],
          streams: _Streams, device: torch.device) -> dict[str, float]:
    """Per module: its rank (low-rank methods) or its density (sparse methods)."""
    shapes = {name: linear_shape(m) for t in targets for name, m in t.items()}
    if config.nm is not None:
        return {name: config.density for name in shapes}
    densities = split_densities(shapes, {n: is_attention(n) for n in shapes}, config.density, config.attn_density)
    if config.allocation == "owl":
        scale = _owl_scales(config, blocks, targets, streams, device)
        densities = {name: min(1.0, d * scale[name]) for name, d in densities.items()}
    if config.layer_kind == "sparse":
        return densities
    return allocate_ranks(shapes, densities, RANK_KIND[config.layer_kind], config.rank_multiple_of)


def _owl_scales(config: CompressionConfig, blocks: nn.ModuleList, targets: list[dict[str, nn.Module]],
                streams: _Streams, device: torch.device) -> dict[str, float]:
    """OWL: per-block density multipliers from a dense pass over the calibration data."""
    hidden = list(streams.compressed)
    ratios, params = [], []
    for index, (block, linears) in enumerate(zip(blocks, targets)):
        home = next(block.parameters()).device
        block.to(device)
        norms = {name: 0.0 for name in linears}
        for inputs, h in zip(streams.inputs, hidden):
            for name, module in linears.items():
                x = layer_inputs(block, module, inputs, h, device).double()
                norms[name] = norms[name] + x.square().sum(0)
        weights = [linear_weight(m) for m in linears.values()]
        ratios.append(outlier_ratio(weights, [norms[n].sqrt() for n in linears], config.owl_threshold))
        params.append(sum(w.numel() for w in weights))
        hidden = [_checked(i.call(block, h, device), index).to("cpu", h.dtype) for i, h in zip(streams.inputs, hidden)]
        block.to(home)
    block_density = owl_block_densities(ratios, params, config.density, config.owl_lambda)
    logger.info("OWL outlier ratios %s -> block densities %s", ratios, block_density)
    return {name: block_density[i] / config.density for i, t in enumerate(targets) for name in t}


def _group_statistics(block: nn.Module, dense_block: nn.Module | None, first: str, local: str,
                      streams: _Streams, device: torch.device, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """G = sum x~ x~^T and (for M) H = sum x x~^T over the calibration tokens, float64 (n, n)."""
    module = block.get_submodule(local)
    g = h = None
    for b, inputs in enumerate(streams.inputs):
        x_c = layer_inputs(block, module, inputs, streams.compressed[b], device)
        if not bool(torch.isfinite(x_c).all()):
            raise ValueError(f"non-finite activations at the input of {first} in block {index}")
        xf = x_c.float()
        g = (xf.T @ xf).double() if g is None else g.add_((xf.T @ xf).double())
        if dense_block is not None and streams.dense is not None:
            x_d = layer_inputs(dense_block, dense_block.get_submodule(local), inputs, streams.dense[b], device).float()
            h = (x_d.T @ xf).double() if h is None else h.add_((x_d.T @ xf).double())
    return g, h


def _compress_block(block: nn.Module, dense_block: nn.Module | None, index: int, prefix: str,
                    linears: dict[str, nn.Module], plan: dict[str, float], streams: _Streams,
                    config: CompressionConfig, device: torch.device, bar: tqdm,
                    report: CompressionReport) -> list[ModuleReport]:
    if not linears:
        return []
    reports = []
    local = {name: name.removeprefix(prefix + ".") for name in linears}
    groups = infer_groups(block, {local[n]: m for n, m in linears.items()}, streams.inputs[0], device)
    for group in groups:
        bar.set_postfix(stage=f"statistics {group[0]}")
        with report.stage("statistics"):
            g, h = _group_statistics(block, dense_block, f"{prefix}.{group[0]}", group[0], streams, device, index)
        bar.set_postfix(stage=f"solve {group[0]}")
        if config.layer_kind == "sparse":
            reports += [_prune_linear(block, f"{prefix}.{name}", name, plan[f"{prefix}.{name}"], g, config, report)
                        for name in group]
            continue
        with report.stage("whitening"):
            chol = solver.whitening(g, config.damping) if config.uses_calibration else None
        for name in group:
            reports.append(_solve_linear(block, f"{prefix}.{name}", name, int(plan[f"{prefix}.{name}"]), g, h, chol,
                                         config, report))
        del g, h, chol
        crash_point(f"block:{index}:group")
    return reports


def _finite_weight(module: nn.Module, full: str) -> torch.Tensor:
    weight = linear_weight(module)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"non-finite weights (NaN or Inf) in {full}")
    return weight


def _solve_linear(block: nn.Module, full: str, local: str, rank: int, g: torch.Tensor, h: torch.Tensor | None,
                  chol: torch.Tensor | None, config: CompressionConfig, report: CompressionReport) -> ModuleReport:
    module = block.get_submodule(local)
    weight = _finite_weight(module, full)
    with report.stage("truncate"):
        up, down = solver.truncate(weight, chol, rank)
    if config.method in ("m", "mpifa") and h is not None:
        with report.stage("m-reconstruct"):
            try:
                up, down = solver.m_reconstruct(weight, up, down, g, h, config.mix, config.als_steps, config.ridge)
            except solver.SingularSystem:
                logger.warning("%s: singular M system (rank-deficient layer); keeping the whitened truncation", full)
    bias = None if getattr(module, "bias", None) is None else module.bias.detach()
    with report.stage("pifa" if config.layer_kind == "pivot" else "swap"):
        layer = build_layer(config.layer_kind, up, down, bias, weight.dtype, config.pivot_method).to(weight.device)
    set_module(block, local, layer)
    m, n = weight.shape
    return ModuleReport(full, config.layer_kind, m, n, rank, m * n,
                        layer_parameters(m, n, rank, RANK_KIND[config.layer_kind]),
                        solver.output_error(weight, up @ down, g))


def _prune_linear(block: nn.Module, full: str, local: str, density: float, g: torch.Tensor,
                  config: CompressionConfig, report: CompressionReport) -> ModuleReport:
    """Sparse baselines: zeros written into the layer's own weight (nn.Linear or Conv1D)."""
    module = block.get_submodule(local)
    weight = _finite_weight(module, full)
    with report.stage("prune"):
        pruned = sparse.prune(config.method, weight, g.to(weight.device), density, config.nm)
    with torch.no_grad():
        module.weight.copy_(pruned if isinstance(module, nn.Linear) else pruned.T)
    setattr(module, sparse.PRUNED_ATTR, config.pattern)
    m, n = weight.shape
    return ModuleReport(full, "sparse", m, n, 0, m * n, int(torch.count_nonzero(pruned)),
                        solver.output_error(weight, pruned, g))
