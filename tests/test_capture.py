"""Paused forwards (pifa.capture.PausedForwards): each batch runs through a block once, paused at each group's
input, and must give exactly what replaying the block from its start gives, swapped layers included."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_model
from pifa.capture import PausedForwards, capture_block_inputs, infer_groups, layer_inputs
from pifa.model import find_blocks, set_module, target_linears

CPU = torch.device("cpu")


def _block(arch: str, batches: int = 3):
    model = tiny_model(arch)
    name, blocks = find_blocks(model)
    block = blocks[0]
    local = {n.removeprefix(f"{name}.0."): m for n, m in target_linears(block, f"{name}.0", (), ()).items()}
    data = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(batches)]
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks, data, CPU)
        groups = infer_groups(0, block, local, inputs[0], CPU)
    return block, local, inputs, groups


def _replacement(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object of the same kind with other weights (as a layer swap puts in place)."""
    new = copy.deepcopy(module)
    with torch.no_grad():
        new.weight.mul_(0.5).add_(0.01)
    return new


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "phi3", "bert"])
def test_paused_forwards_equal_replays_with_swapped_layers(arch):
    block, local, inputs, groups = _block(arch)
    hidden = [i.hidden for i in inputs]
    with torch.no_grad(), PausedForwards(0, block, inputs, hidden, CPU, local) as forwards:
        for group in groups:
            seen = list(forwards.inputs_of(group[0]))
            replayed = [layer_inputs(0, block, local[group[0]], i, h, CPU) for i, h in zip(inputs, hidden)]
            assert len(seen) == len(replayed) == len(inputs)
            for x, y in zip(seen, replayed):
                assert torch.equal(x, y)
            for name in group:  # the engine swaps the group's layers before the next group's statistics
                set_module(block, name, _replacement(local[name]))
        outputs = forwards.finish()
        expected = [i.call(0, block, h, CPU) for i, h in zip(inputs, hidden)]
        for out, ref in zip(outputs, expected):
            assert not out.requires_grad
            assert torch.equal(out, ref)
        assert forwards.paused == 0
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in local.values())


def test_leaving_early_unwinds_paused_forwards_and_removes_hooks():
    block, local, inputs, groups = _block("llama")
    with pytest.raises(KeyError), torch.no_grad():
        with PausedForwards(0, block, inputs, [i.hidden for i in inputs], CPU, local) as forwards:
            for _ in forwards.inputs_of(groups[1][0]):
                pass
            assert forwards.paused == len(inputs)  # every forward paused at o_proj
            raise KeyError("the engine failed")
    assert forwards.paused == 0
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in local.values())


def test_errors_inside_a_forward_reach_the_engine():
    block, local, inputs, groups = _block("llama")

    def broken(_module, _args):
        raise ZeroDivisionError("inside the block")

    handle = local["mlp.up_proj"].register_forward_pre_hook(broken)
    try:
        with torch.no_grad(), PausedForwards(0, block, inputs, [i.hidden for i in inputs], CPU, local) as forwards:
            list(forwards.inputs_of("self_attn.q_proj"))
            with pytest.raises(ZeroDivisionError, match="inside the block"):
                list(forwards.inputs_of("mlp.down_proj"))
    finally:
        handle.remove()


def test_a_linear_never_called_is_one_line():
    block, local, inputs, _ = _block("llama")
    stray = torch.nn.Linear(32, 32)
    with torch.no_grad(), PausedForwards(0, block, inputs, [i.hidden for i in inputs], CPU,
                                         {**local, "stray": stray}) as forwards:
        with pytest.raises(ValueError, match="stray was never called"):
            list(forwards.inputs_of("stray"))
