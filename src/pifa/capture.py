"""Activation capture: the first block's inputs, block replay, per-group statistics (hooks only)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import greenlet
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


class _Abort(BaseException):
    """Raised inside a paused forward to unwind it when the engine stops early (not an ``Exception``: model
    code that catches ``Exception`` must not swallow it)."""


class _Forward:
    """One batch's forward through the block as a coroutine (a greenlet: same thread, same thread pools and
    allocator as the engine), paused on request (see ``PausedForwards``)."""

    def __init__(self, run: Callable[[], torch.Tensor]):
        self.target: nn.Module | None = None  # pause at this module's next call
        self.stashed: dict[nn.Module, torch.Tensor] = {}  # inputs of swapped linears, for their replacements
        self.finished = False
        self._coroutine = greenlet.greenlet(self._main)
        self._run = run

    def _main(self) -> tuple[str, Any] | None:
        try:
            return ("output", self._run())
        except _Abort:
            return None
        except BaseException as error:  # handed to the engine, which raises it
            return ("error", error)

    def pause(self, x: torch.Tensor) -> None:
        """Called inside this forward: hand ``x`` to the engine and wait to be resumed."""
        self.target = None
        self._coroutine.parent.switch(("input", x))

    def resume(self) -> tuple[str, Any]:
        """Called by the engine: run this forward until it pauses or ends; its new state."""
        if self.finished:
            raise RuntimeError("a finished forward cannot be resumed")
        state = self._coroutine.switch()
        self.finished = state is None or state[0] != "input"
        return state or ("error", RuntimeError("forward aborted"))

    @property
    def started(self) -> bool:
        return bool(self._coroutine) or self._coroutine.dead

    def abort(self) -> None:
        """Unwind this forward if it is paused."""
        if self._coroutine:  # started, not finished: paused
            self._coroutine.throw(_Abort)
        self.finished = True


class PausedForwards:
    """``block`` run once on every batch, each forward paused at the input of the linear the engine asks for next,
    so that a group's statistics need no replay of the block from its start.

    Each forward is a coroutine (a greenlet, in the engine's own thread, so its products use the same thread
    pool and allocator); only one runs at any time, resumed in batch order, so every product is computed as
    a sequential replay would compute it (the same bits). (Python threads instead cost about a third more
    time on 2 cores: each keeps its own OpenMP team and malloc arena.) ``linears`` (local name ->
    module) are the block's targeted linears as they are now. When the engine swaps one for a new layer,
    later calls reach the new layer through the block; a forward already inside the old linear's call (it
    paused there) has its input handed to the new layer instead. Memory: the activations each paused forward
    holds, for every batch at once (for a Llama block: the residual stream and the current group's input).
    Use as a context manager: leaving it unwinds the forwards that have not finished.
    """

    def __init__(self, block: nn.Module, inputs: list[BlockInputs], hidden: list[torch.Tensor],
                 device: torch.device, linears: dict[str, nn.Module]):
        self.block, self.linears = block, linears
        self._running: _Forward | None = None  # the forward now running (hooks act only inside forwards)
        self._forwards = [_Forward(functools.partial(batch.call, block, h, device)) for batch, h in zip(inputs, hidden)]
        self._handles = [h for name, module in linears.items()
                         for h in (module.register_forward_pre_hook(self._pre_hook(name)),
                                   module.register_forward_hook(self._post_hook(name)))]

    def __enter__(self) -> PausedForwards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pre_hook(self, name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            forward = self._running
            if forward is None:
                return None
            x = args[0]
            if forward.target is module:
                forward.pause(x.detach().reshape(-1, x.shape[-1]))
            if self.block.get_submodule(name) is module:
                return None
            forward.stashed[module] = x  # swapped: the new layer computes the output (post hook); the old
            return (x[(slice(0, 1),) * (x.dim() - 1)], *args[1:])  # one computes a single token's worth
        return pre_hook

    def _post_hook(self, name: str) -> Callable:
        def post_hook(module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            forward = self._running
            if forward is None or module not in forward.stashed:
                return None
            return self.block.get_submodule(name)(forward.stashed.pop(module))
        return post_hook

    def _resume(self, forward: _Forward) -> tuple[str, Any]:
        """Run ``forward`` until it pauses or ends; the hooks act only meanwhile."""
        self._running = forward
        try:
            return forward.resume()
        finally:
            self._running = None

    @property
    def paused(self) -> int:
        """How many forwards are paused (started, not finished)."""
        return sum(not f.finished and f.started for f in self._forwards)

    def inputs_of(self, name: str) -> Iterator[torch.Tensor]:
        """Each batch's input [tokens, n] of linear ``name``, in batch order (each forward runs on to it)."""
        for forward in self._forwards:
            forward.target = self.linears[name]
            kind, value = self._resume(forward)
            if kind == "error":
                raise value
            if kind != "input":
                raise ValueError(f"targeted linear {name} was never called by its block (or called before the "
                                 "linears of an earlier group)")
            yield value
            del value

    def finish(self) -> list[torch.Tensor]:
        """Every batch's output hidden states: each forward runs to the end of the block."""
        outputs = []
        for forward in self._forwards:
            kind, value = self._resume(forward)
            if kind == "error":
                raise value
            if kind != "output":
                raise RuntimeError("a forward paused after the engine's last request")
            outputs.append(value)
        return outputs

    def close(self) -> None:
        """Unwind every forward still paused and remove the hooks."""
        for forward in self._forwards:  # not marked as running: a hook reached while unwinding does nothing
            forward.abort()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
