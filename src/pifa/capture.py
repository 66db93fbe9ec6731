"""Activation capture: every block's inputs, the replay guard, block replay, per-group statistics (hooks only)."""

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
from .validate import first_line


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


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A block call's hidden states and its other inputs."""
    if args:
        return args[0], args[1:], kwargs
    if "hidden_states" not in kwargs:
        raise ValueError("a transformer block was called without hidden states (neither first argument nor "
                         "'hidden_states')")
    return kwargs["hidden_states"], (), {k: v for k, v in kwargs.items() if k != "hidden_states"}


@dataclass
class BlockInputs:
    """What every block is called with for one calibration batch.

    ``hidden`` is block 0's input [B, T, d] on the CPU; ``per_block[i]`` is block i's other inputs
    (args, kwargs): its attention mask, rotary embeddings, ... as the model itself passes them, which
    differ between blocks of different layer types (sliding-window and full attention, two rotary
    bases in Gemma 3). A tensor passed to several blocks is stored once (one CPU tensor, the model's dtype).
    """

    hidden: torch.Tensor
    per_block: list[tuple[tuple, dict[str, Any]]]
    ids: torch.Tensor  # the batch's token ids (for the replay guard)

    def call(self, index: int, block: nn.Module, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Run ``block`` (block number ``index``) on ``hidden`` with its other inputs of this batch; returns the
        output hidden states."""
        args, kwargs = self.per_block[index]
        args = map_tensors(args, lambda t: t.to(device))
        kwargs = map_tensors(kwargs, lambda t: t.to(device))
        out = block(hidden.to(device), *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class _PassThrough:
    """A block's stand-in during capture: records what the model calls it with and returns its hidden states
    unchanged (as a tensor, or as a 1-tuple for models whose loop takes ``outputs[0]``); no weight is read."""

    def __init__(self, index: int, calls: list, shared: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 as_tuple: bool, last: bool) -> None:
        self.index, self.calls, self.shared, self.as_tuple, self.last = index, calls, shared, as_tuple, last
        self.shape: torch.Size | None = None

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        # the same tensor object passed to several blocks (a layer type's mask) is copied once; the original
        # is held with its copy so that its id cannot be reused during the capture
        if id(t) not in self.shared:
            self.shared[id(t)] = (t, t.detach().to("cpu"))
        return self.shared[id(t)][1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hidden, rest, kw = _split_hidden(args, kwargs)
        if not isinstance(hidden, torch.Tensor):
            raise _Mismatch
        self.calls[self.index] = (hidden, map_tensors(rest, self._keep), map_tensors(kw, self._keep))
        if self.last:
            raise _Stop
        return (hidden,) if self.as_tuple else hidden


class _Mismatch(Exception):
    """The stand-ins returned the wrong structure for this model's block loop."""


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor],
                         device: torch.device) -> list[BlockInputs]:
    """Every block's inputs for every batch, as the model's own forward passes them.

    Each block is replaced for the pass by a stand-in that records its call and hands its hidden states on
    unchanged, so the capture costs the embeddings and mask construction only, reads no block weight (a
    streamed model's blocks may be on the meta device) and ends at the last block. Whether the model's loop
    wants a tensor or a tuple back is found by trying: a later block that receives hidden states of another
    shape (``outputs[0]`` of a tensor) means the other structure. A loop that unpacks several values from
    each block (hidden states plus states, weights or indices) accepts neither: then the real blocks run
    once, recorded by pre-hooks (:func:`_capture_running`); the replay guard then checks that the recorded
    inputs reproduce the model (a block whose extra outputs feed the next block cannot be, and is refused).
    """
    errors = []
    for as_tuple in (False, True):
        try:
            return [_capture_batch(model, blocks, batch, device, as_tuple) for batch in batches]
        except Exception as error:  # noqa: BLE001 - the model's own code may fail anywhere on a wrong structure
            errors.append(error)
    if not _any_meta(blocks):  # blocks returning several values that the loop unpacks: run the real blocks
        return [_capture_running(model, blocks, batch, device) for batch in batches]
    if not isinstance(errors[-1], _Mismatch):
        raise errors[-1]
    raise ValueError("cannot capture the transformer blocks' inputs: the model's block loop accepts neither a "
                     "tensor nor a tuple of hidden states from its blocks, and the blocks' weights are not loaded "
                     "to run them instead (streamed)")


def _any_meta(blocks: nn.ModuleList) -> bool:
    return any(p.is_meta for p in blocks.parameters())


def _capture_running(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor,
                     device: torch.device) -> BlockInputs:
    """The capture for models whose block loop unpacks several outputs of each block (hidden states plus
    states, weights or indices): the real blocks run (one forward pass of all but the last block, which reads
    their weights) while pre-hooks record each call; the pass stops at the last block's call."""
    calls: list = [None] * len(blocks)
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    recorders = [_PassThrough(i, calls, shared, False, i == len(blocks) - 1) for i in range(len(blocks))]

    def hook(index: int) -> Callable:
        def pre_hook(_block: nn.Module, args: tuple, kwargs: dict) -> None:
            recorders[index](*args, **kwargs)
        return pre_hook

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=batch.to(device))
    except _Stop:
        crash_point("capture")
    except _Mismatch:
        raise ValueError("cannot capture the transformer blocks' inputs: the model does not pass its blocks "
                         "their hidden states as a tensor") from None
    else:
        raise ValueError("the forward pass never reached the last transformer block")
    finally:
        for handle in handles:
            handle.remove()
    return _block_inputs(calls, batch, check_shapes=False)


def _capture_batch(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, device: torch.device,
                   as_tuple: bool) -> BlockInputs:
    calls: list = [None] * len(blocks)
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    stand_ins = [_PassThrough(i, calls, shared, as_tuple, i == len(blocks) - 1) for i in range(len(blocks))]
    own = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's hooked forward
    try:
        for block, stand_in in zip(blocks, stand_ins):
            block.forward = stand_in  # the instance attribute shadows the class's forward; hooks still run
        model(input_ids=batch.to(device))
    except _Stop:
        crash_point("capture")
    except Exception as error:  # a wrong structure may fail anywhere in the model's own code
        if not as_tuple and any(c is not None for c in calls[1:]):
            raise _Mismatch from error
        raise
    else:
        raise ValueError("the forward pass never reached the last transformer block")
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward
    return _block_inputs(calls, batch, check_shapes=True)


def _block_inputs(calls: list, batch: torch.Tensor, check_shapes: bool) -> BlockInputs:
    """The recorded calls as :class:`BlockInputs`; with ``check_shapes``, hidden states of another shape at a
    later block mean the stand-ins returned the wrong structure (``_Mismatch``)."""
    if any(c is None for c in calls):
        missing = [i for i, c in enumerate(calls) if c is None]
        raise ValueError(f"the forward pass never called transformer blocks {missing}")
    first = calls[0][0]
    if check_shapes and any(c[0].shape != first.shape for c in calls[1:]):
        raise _Mismatch
    return BlockInputs(first.detach().to("cpu"), [(rest, kw) for _, rest, kw in calls], batch.detach().to("cpu"))


def _tolerance(reference: torch.Tensor) -> float:
    """Round-off allowed between a replayed block output and the model's own: a few units in the last place
    of the largest value (a replay runs the same operations on the same inputs: in practice, the same bits)."""
    eps = torch.finfo(reference.dtype).eps if reference.is_floating_point() else 0.0
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return (16 if reference.dtype in (torch.float32, torch.float64) else 2) * eps * max(1.0, scale)


def _replay(inputs: BlockInputs, index: int, block: nn.Module, hidden: torch.Tensor,
            device: torch.device) -> torch.Tensor:
    """``inputs.call``, with whatever the block's own code raises turned into one line refusing the model."""
    try:
        return inputs.call(index, block, hidden, device)
    except Exception as error:  # noqa: BLE001 - the block's own code: whatever it raises, one line
        raise ValueError(f"cannot replay transformer block {index} on its own with the inputs the model passes it "
                         f"({type(error).__name__}: {first_line(error)}); this architecture is not "
                         "supported") from error


def replay_differences(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, inputs: BlockInputs,
                       device: torch.device,
                       resident: Callable[[int, nn.Module], contextlib.AbstractContextManager[Any]]
                       ) -> list[tuple[float, float]]:
    """The model's own forward on ``batch`` against the engine's replay from ``inputs`` (its capture of the
    same batch), block by block: (largest difference, tolerance) of block 0's input, then of every block's
    output, each replayed from the block's true input. ``resident(index, block)`` makes a block's weights
    present and puts it on ``device`` while it runs (streamed models). One forward and one replay of the
    batch; the forward ends at the last block, or at the first whose own output is not finite."""
    found: list[tuple[float, float]] = []
    state: dict[str, Any] = {"replaying": False, "stack": None, "input": None}

    def pre_hook(index: int) -> Callable:
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            if state["replaying"]:
                return
            state["stack"] = contextlib.ExitStack()
            state["stack"].enter_context(resident(index, block))
            hidden = _split_hidden(args, kwargs)[0]
            state["input"] = hidden
            if index == 0:
                true = hidden.detach().to("cpu")
                found.append((float((true.float() - inputs.hidden.float()).abs().max()), _tolerance(true)))
        return hook

    def post_hook(index: int) -> Callable:
        def hook(block: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
            if state["replaying"]:
                return
            true = output[0] if isinstance(output, (tuple, list)) else output
            state["replaying"] = True
            try:
                replayed = _replay(inputs, index, block, state["input"], device)
            finally:
                state["replaying"] = False
                state["stack"].close()
            if not torch.isfinite(true).all():  # the model's own forward overflows: not the replay's to judge
                raise _Stop  # (the engine names the non-finite weights or activations itself)
            found.append((float((replayed.float() - true.float()).abs().max()), _tolerance(true)))
            if index == len(blocks) - 1:
                raise _Stop
        return hook

    handles = [h for i, block in enumerate(blocks)
               for h in (block.register_forward_pre_hook(pre_hook(i), with_kwargs=True),
                         block.register_forward_hook(post_hook(i), with_kwargs=True))]
    with hooks(handles):
        try:
            model(input_ids=batch.to(device))
        except _Stop:
            return found
        finally:
            if state["stack"] is not None:
                state["stack"].close()
    raise ValueError("the forward pass never reached the last transformer block")


def check_replay(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor, inputs: BlockInputs,
                 device: torch.device,
                 resident: Callable[[int, nn.Module], contextlib.AbstractContextManager[Any]]) -> float:
    """Refuse (ValueError naming the first block) when the replay differs from the model's own forward beyond
    round-off (see ``replay_differences``); returns the largest difference found."""
    found = replay_differences(model, blocks, batch, inputs, device, resident)
    for position, (difference, tolerance) in enumerate(found):
        if not difference <= tolerance:  # NaN too
            where = "the first block's input" if position == 0 else f"block {position - 1}"
            raise ValueError(f"cannot reproduce this model's own forward pass block by block: {where} differs by "
                             f"{difference:.3g} (allowed {tolerance:.3g}); this architecture passes its blocks "
                             "inputs pifa does not capture, so it is not supported")
    return max((d for d, _ in found), default=0.0)


def layer_inputs(index: int, block: nn.Module, module: nn.Module, inputs: BlockInputs, hidden: torch.Tensor,
                 device: torch.device) -> torch.Tensor:
    """The input [tokens, n] of ``module`` when ``block`` (number ``index``) runs on ``hidden`` (stops the block
    right there)."""
    seen: list[torch.Tensor] = []

    def pre_hook(_module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _Stop

    with hooks([module.register_forward_pre_hook(pre_hook)]):
        try:
            inputs.call(index, block, hidden, device)
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


def infer_groups(index: int, block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs,
                 device: torch.device) -> list[list[str]]:
    """Groups of linears in execution order; linears fed the same input tensor share a group.

    For Llama this yields [q, k, v] -> [o] -> [gate, up] -> [down].
    """
    order: list[tuple[str, torch.Tensor]] = []
    with record_inputs(linears, order):
        inputs.call(index, block, inputs.hidden, device)
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

    def __init__(self, index: int, block: nn.Module, inputs: list[BlockInputs], hidden: list[torch.Tensor],
                 device: torch.device, linears: dict[str, nn.Module]):
        self.block, self.linears = block, linears
        self._running: _Forward | None = None  # the forward now running (hooks act only inside forwards)
        self._forwards = [_Forward(functools.partial(batch.call, index, block, h, device))
                          for batch, h in zip(inputs, hidden)]
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
