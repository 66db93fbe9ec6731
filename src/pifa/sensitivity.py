"""Measured-sensitivity rank allocation (``allocation="sensitivity"``).

For every targeted linear and a few candidate densities, the linear alone is replaced by its
whitened truncation (one eigen-decomposition per linear, every candidate rank a prefix of it)
and the model's next-token distributions on a small calibration subset are compared with the
dense model's: mean KL(dense || perturbed) per token. A multiple-choice knapsack
(:func:`pifa.rank_search.knapsack_choice`) then picks one candidate per linear that minimises
the summed KL within the parameter budget (per pool: all linears, or attention and MLP when
the split is fixed). The weights are restored bit for bit after each measurement.

Cost: one forward pass of the blocks from the perturbed one onwards (plus the head) per linear
and candidate, on ``sensitivity_samples`` sequences of at most ``MEASURE_TOKENS`` tokens; the
report records it (``allocation_cost``: seconds and block forward passes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import solver
from .budget import layer_parameters, rank_for_density, rank_kind
from .capture import BlockInputs
from .model import linear_weight
from .rank_search import discretise_costs, knapsack_choice

CANDIDATE_DENSITIES = (0.2, 0.35, 0.5, 0.65, 0.8)  # plus each linear's uniform density, its half, and full rank
MEASURE_TOKENS = 256  # the KL is measured on the first tokens of each measurement sequence
BINS = 4000  # budget resolution of the knapsack: choices stay within the budget exactly, never above


@dataclass
class SensitivityCost:
    seconds: float
    forward_passes: int  # block forward passes (each over the subset), head passes counted as one each


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` (out, in) into an nn.Linear or a transposed Conv1D."""
    with torch.no_grad():
        module.weight.copy_(weight if isinstance(module, nn.Linear) else weight.T)


def _kl(dense_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(dense || perturbed) from log-probabilities and logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return max(0.0, float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean()))  # >= 0 up to round-off


def output_head(model: nn.Module, blocks_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function from the last block's output to the logits: the base model's final norm (and
    output projection, when it has one), then the output embeddings. Checked by the caller."""
    base = model.get_submodule(blocks_name.rsplit(".", 1)[0]) if "." in blocks_name else model
    steps = [getattr(base, name) for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "project_out")
             if isinstance(getattr(base, name, None), nn.Module)]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head is None:
        raise ValueError("allocation 'sensitivity' measures next-token distributions: it needs a causal LM "
                         "with an output head")

    def head(hidden: torch.Tensor) -> torch.Tensor:
        for step in steps:
            hidden = step(hidden)
        return lm_head(hidden)

    return head


class SensitivityProbe:
    """Measures, block by block, each linear's output KL at candidate ranks (see the module docs)."""

    def __init__(self, blocks: nn.ModuleList, subset: list[BlockInputs], head: Callable[[torch.Tensor], torch.Tensor],
                 logits: list[torch.Tensor], device: torch.device) -> None:
        """``subset``: block-0 inputs of the measurement batches; ``logits``: the dense model's on them."""
        self.start = time.perf_counter()
        self.blocks, self.subset, self.head, self.device = blocks, subset, head, device
        self.hidden = [[i.hidden for i in subset]]
        for block in blocks:
            self.hidden.append([i.call(block, h, device).to("cpu", h.dtype) for i, h in zip(subset, self.hidden[-1])])
        self.passes = len(blocks) + 1
        self.dense_logp = [torch.log_softmax(x.float(), -1) for x in logits]
        for mine, reference in zip(self.hidden[-1], logits):
            ours = head(mine.to(device)).float()
            scale = float(reference.float().abs().max()) or 1.0
            if not torch.allclose(ours, reference.float().to(ours.device), rtol=1e-3, atol=1e-3 * scale):
                raise ValueError("allocation 'sensitivity' cannot reproduce this model's logits from its last block "
                                 "(final norm + output head); use allocation 'spectrum'")
        self.options: dict[str, list[tuple[int, int, float]]] = {}  # name -> (rank, cost, kl)

    def _measure(self, first: int) -> float:
        states = self.hidden[first]
        for block in self.blocks[first:]:
            states = [i.call(block, h, self.device) for i, h in zip(self.subset, states)]
        self.passes += len(self.blocks) - first + 1
        return sum(_kl(d.to(h.device), self.head(h)) for d, h in zip(self.dense_logp, states)) / len(states)

    def measure_block(self, index: int, linears: dict[str, nn.Module], grams: dict[str, torch.Tensor],
                      shapes: dict[str, tuple[int, int]], densities: dict[str, float], kind: str, whiten: bool,
                      damping: float, multiple_of: int) -> None:
        """Every candidate rank of block ``index``'s linears (``grams``: their dense input statistics)."""
        rkind = rank_kind(kind)
        for name, module in linears.items():
            m, n = shapes[name]
            top = min(m, n) if rkind == "pifa" else min(m, n, (m * n) // (m + n))
            wanted = (*CANDIDATE_DENSITIES, densities[name], densities[name] / 2)
            ranks = sorted({min(top, max(1, rank_for_density(m, n, d, rkind, multiple_of))) for d in wanted} | {top})
            weight = linear_weight(module)
            original = module.weight.detach().clone()
            chol = solver.whitening(grams[name], damping) if whiten else None
            up, down = solver.truncate(weight, chol, top)
            rows = []
            try:
                for rank in ranks:
                    if rank == min(m, n):
                        kl = 0.0  # full rank (PIFA only): the dense layer's cost and, to round-off, its weight
                    else:
                        _set_weight(module, (up[:, :rank] @ down[:rank]).to(weight.dtype))
                        kl = self._measure(index)
                    rows.append((rank, layer_parameters(m, n, rank, rkind), kl))
            finally:
                with torch.no_grad():
                    module.weight.copy_(original)
            self.options[name] = rows

    def choose(self, shapes: dict[str, tuple[int, int]], densities: dict[str, float], pools: dict[str, str],
               ) -> tuple[dict[str, int], dict[str, float], SensitivityCost]:
        """One rank per linear minimising the summed KL within each pool's budget (multiple-choice knapsack)."""
        chosen: dict[str, int] = {}
        scores: dict[str, float] = {}
        names = list(self.options)
        for pool in sorted(set(pools[name] for name in names)):
            members = [name for name in names if pools[name] == pool]
            budget = sum(densities[name] * shapes[name][0] * shapes[name][1] for name in members)
            costs = [[cost for _, cost, _ in self.options[name]] for name in members]
            units, bins = discretise_costs(costs, budget, BINS)
            choice = knapsack_choice([list(zip(u, (kl for _, _, kl in self.options[name])))
                                      for u, name in zip(units, members)], bins)
            for name, j in zip(members, choice):
                chosen[name], scores[name] = self.options[name][j][0], self.options[name][j][2]
        return chosen, scores, SensitivityCost(time.perf_counter() - self.start, self.passes)
