"""The engine's activations: every block's captured inputs, the compressed stream and, for M, the dense one,
each calibration batch on the CPU; the replay guard; and where block weights live (:class:`Residency`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .capture import BlockInputs, check_replay, group_by_input, record_inputs, record_outputs
from .model import linear_weight, on_device
from .validate import all_finite

logger = logging.getLogger(__name__)


class Residency:
    """Where the engine finds block weights (the protocol; this base keeps them in the model, all the time:
    :class:`InMemory`). ``pifa.streaming.StreamedWeights`` loads each block when needed and writes it out
    when finished. ``streamed``: the whole model is never resident at once (what runs the whole model, the
    sensitivity allocation, cannot work)."""

    streamed: bool = False

    @contextlib.contextmanager
    def resident(self, module: nn.Module, prefix: str) -> Iterator[None]:
        """The block's weights are present inside the ``with`` (here: always)."""
        yield

    def finished(self, module: nn.Module, prefix: str) -> None:
        """The block is compressed (or restored from the checkpoint) and will not change again."""

    def fingerprint(self) -> str | None:
        """The model's fingerprint for the checkpoint, or ``None`` to hash the model's own tensors."""
        return None


class InMemory(Residency):
    """The whole model in memory: every block's weights are always present."""


@dataclass
class Streams:
    """Block inputs per batch: the compressed stream, and the dense one when M needs it;
    ``residency`` says how to reach each block's weights (whole model in memory, or streamed)."""

    inputs: list[BlockInputs]
    compressed: list[torch.Tensor]
    dense: list[torch.Tensor] | None
    residency: Residency
    prefix: str  # the blocks' name in the model, e.g. "model.layers"

    @classmethod
    def start(cls, inputs: list[BlockInputs], two_streams: bool, residency: Residency, prefix: str) -> Streams:
        hidden = [i.hidden for i in inputs]
        return cls(inputs, hidden, list(hidden) if two_streams else None, residency, prefix)

    def resident(self, index: int, module: nn.Module) -> contextlib.AbstractContextManager[None]:
        return self.residency.resident(module, f"{self.prefix}.{index}")

    def advance_compressed(self, block: nn.Module, device: torch.device, index: int) -> None:
        self.compressed = [checked_hidden(i.call(index, block, h, device), index).to("cpu", h.dtype)
                           for i, h in zip(self.inputs, self.compressed)]

    def advance_dense(self, block: nn.Module, device: torch.device, index: int, prefix: str,
                      linears: dict[str, nn.Module]
                      ) -> tuple[list[list[str]], dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """Run the dense block on the dense stream. Returns the groups of ``linears`` (inferred on the first
        batch, saving a pass; none when ``linears`` is empty) and, per batch, what M needs of the dense
        stream: the input of each group's first linear, or for a group whose outputs are narrower than
        its input (``_by_outputs``), the outputs of its linears."""
        inputs_seen: dict[str, list[torch.Tensor]] = {}
        outputs_seen: dict[str, list[torch.Tensor]] = {}
        narrow = {name: m for name, m in linears.items() if _narrow(m)}  # may be recorded by their outputs
        outputs = []
        groups: list[list[str]] | None = None  # known after the first batch
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
            outputs.append(checked_hidden(output, index).to("cpu", hidden.dtype))
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


def checked_hidden(hidden: torch.Tensor, index: int) -> torch.Tensor:
    if not all_finite(hidden):
        raise ValueError(f"non-finite activations at the output of block {index}")
    return hidden


def guard(model: nn.Module, blocks: nn.ModuleList, streams: Streams, device: torch.device) -> float:
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


def finite_weight(module: nn.Module, full: str) -> torch.Tensor:
    """The linear's (out, in) weight, refused (naming ``full``) when it holds a NaN or an Inf."""
    weight = linear_weight(module)
    if not all_finite(weight):
        raise ValueError(f"non-finite weights (NaN or Inf) in {full}")
    return weight
