"""Activation capture: the first block's inputs, block replay, per-group statistics (hooks only)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .faults import crash_point
from .model import hooks


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early; never escapes this module."""


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


@dataclass
class BlockInputs:
    """What a block is called with for one calibration batch; ``hidden`` is [B, T, d] on the CPU."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]

    def call(self, block: nn.Module, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Run ``block`` on ``hidden`` with this batch's other inputs; returns the output hidden states."""
        args = map_tensors(self.args, lambda t: t.to(device))
        kwargs = map_tensors(self.kwargs, lambda t: t.to(device))
        hidden = hidden.to(device)
        out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def capture_first_block(
    model: nn.Module, block: nn.Module, batches: list[torch.Tensor], device: torch.device
) -> list[BlockInputs]:
    """Inputs of ``block`` for every batch, captured by a forward pre-hook (``with_kwargs=True``)."""
    captured: list[BlockInputs] = []

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        to_cpu = lambda t: t.detach().to("cpu")  # noqa: E731
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs["hidden_states"], ()
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append(BlockInputs(to_cpu(hidden), map_tensors(rest, to_cpu), map_tensors(kwargs, to_cpu)))
        raise _Stop

    with hooks([block.register_forward_pre_hook(pre_hook, with_kwargs=True)]):
        for batch in batches:
            try:
                model(input_ids=batch.to(device))
            except _Stop:
                crash_point("capture")
                continue
            raise ValueError("the forward pass never reached the first transformer block")
    return captured


def layer_inputs(
    block: nn.Module, module: nn.Module, inputs: BlockInputs, hidden: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The input [tokens, n] of ``module`` when ``block`` runs on ``hidden`` (stops the block right there)."""
    seen: list[torch.Tensor] = []

    def pre_hook(_module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _Stop

    with hooks([module.register_forward_pre_hook(pre_hook)]):
        try:
            inputs.call(block, hidden, device)
        except _Stop:
            return seen[0]
    raise ValueError("a targeted linear was never called by its block")


@contextlib.contextmanager
def record_inputs(modules: dict[str, nn.Module],
                  order: list[tuple[str, torch.Tensor]] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input [tokens, n] of each module's first call during the forward passes inside the block;
    with ``order``, also append (name, input tensor) in call order (for ``group_by_input``)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            if name not in seen:
                seen[name] = args[0].detach().reshape(-1, args[0].shape[-1])
                if order is not None:
                    order.append((name, args[0]))
        return pre_hook

    with hooks([module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]):
        yield seen
    missing = set(modules) - set(seen)
    if missing:
        raise ValueError(f"targeted linears never called by their block: {sorted(missing)}")


@contextlib.contextmanager
def record_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output [tokens, m] of each module's first call during the forward passes inside the block."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def forward_hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if name not in seen:
                seen[name] = output.detach().reshape(-1, output.shape[-1])
        return forward_hook

    with hooks([module.register_forward_hook(hook(name)) for name, module in modules.items()]):
        yield seen


def infer_groups(block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs,
                 device: torch.device) -> list[list[str]]:
    """Groups of linears in execution order; linears fed the same input tensor share a group.

    For Llama this yields [q, k, v] -> [o] -> [gate, up] -> [down].
    """
    order: list[tuple[str, torch.Tensor]] = []
    with record_inputs(linears, order):
        inputs.call(block, inputs.hidden, device)
    return group_by_input(order)


def group_by_input(order: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Groups from (linear, input tensor) pairs in call order: linears fed the same tensor object share a group."""
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in order:
        for key, members in groups:
            if key is tensor:
                members.append(name)
                break
        else:
            groups.append((tensor, [name]))
    return [members for _, members in groups]
