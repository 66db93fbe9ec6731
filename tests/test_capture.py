"""Paused forwards (pifa.capture.PausedForwards): each batch runs through a block once, paused at each group's
input, and must give exactly what replaying the block from its start gives, swapped layers included.

Architectures whose blocks take different inputs (sliding-window and full attention, per-layer-type rotary
embeddings): every block is replayed with its own inputs, equal to the model's own forward; compress,
the sensitivity allocation and the saved folder work on each; a broken replay is refused."""

from __future__ import annotations

import contextlib
import copy
import importlib

import pytest
import torch
import transformers

import pifa
from helpers import tiny_model
from pifa.capture import (
    BlockInputs,
    PausedForwards,
    capture_block_inputs,
    check_replay,
    infer_groups,
    layer_inputs,
    replay_differences,
)
from pifa.model import find_blocks, inference_state, set_module, target_linears

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


# --- Architectures whose blocks take different inputs (sliding-window and full attention, per-layer-type rotary

WINDOW, SEQ = 8, 40  # calibration longer than every sliding window
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

MIXED_CONFIGS = {
    # local rotary base 10,000 on sliding layers, 1,000,000 on full ones: two rotary embeddings
    "gemma3": lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=WINDOW, layer_types=MIXED),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=8, sliding_window=WINDOW, layer_types=MIXED),
    "qwen2-sliding": lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=WINDOW,
                                                      max_window_layers=2),
    "qwen3-sliding": lambda: transformers.Qwen3Config(**SMALL, head_dim=8, use_sliding_window=True,
                                                      sliding_window=WINDOW, max_window_layers=2),
    "mistral-window": lambda: transformers.MistralConfig(**SMALL, sliding_window=WINDOW),
    "cohere2": lambda: transformers.Cohere2Config(**SMALL, sliding_window=WINDOW, layer_types=MIXED),
    "olmo3": lambda: transformers.Olmo3Config(**SMALL, sliding_window=WINDOW, layer_types=MIXED),
    "exaone4": lambda: transformers.Exaone4Config(**SMALL, sliding_window=WINDOW, layer_types=MIXED),
    "ministral": lambda: transformers.MinistralConfig(**SMALL, head_dim=8, sliding_window=WINDOW, layer_types=MIXED),
    "smollm3": lambda: transformers.SmolLM3Config(**SMALL, no_rope_layers=[1, 0, 1, 0], pad_token_id=0),
}
# blocks called with other inputs than block 0 (mistral: one window everywhere; smollm3: the layers without
# rotary embeddings differ inside the block, not in what they are passed)
DIFFERING = set(MIXED_CONFIGS) - {"mistral-window", "smollm3"}


def mixed_model(name: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(MIXED_CONFIGS[name]()).eval()


def calib(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _differences(model, ids):
    _, blocks = find_blocks(model)
    with inference_state(model):
        inputs = capture_block_inputs(model, blocks, [ids], CPU)
        return inputs, replay_differences(model, blocks, ids, inputs[0], CPU, lambda i, b: contextlib.nullcontext())


def _block_inputs_differ(inputs: BlockInputs) -> bool:
    """Whether some block is called with other tensors than block 0 (the case the old capture got wrong)."""
    def flat(call):
        args, kwargs = call
        return [t for v in (*args, *kwargs.values()) for t in (v if isinstance(v, (tuple, list)) else [v])
                if isinstance(t, torch.Tensor)]
    first = flat(inputs.per_block[0])
    return any(len(flat(c)) != len(first) or any(not torch.equal(a, b) for a, b in zip(flat(c), first))
               for c in inputs.per_block[1:])


@pytest.mark.parametrize("arch", sorted(MIXED_CONFIGS))
def test_replay_equals_the_models_own_forward(arch):
    model = mixed_model(arch)
    inputs, found = _differences(model, calib(2))
    assert len(found) == model.config.num_hidden_layers + 1
    assert max(d for d, _ in found) == 0.0  # same operations on the same inputs: the same bits
    if arch in DIFFERING:
        assert _block_inputs_differ(inputs[0])


def test_blocks_of_one_layer_type_share_their_tensors():
    model = mixed_model("gemma3")
    inputs, _ = _differences(model, calib(2))
    per_block = inputs[0].per_block
    sliding, full = per_block[0][1], per_block[1][1]
    assert per_block[2][1]["attention_mask"] is sliding["attention_mask"]
    assert per_block[3][1]["position_embeddings"][0] is full["position_embeddings"][0]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # two rotary bases
    assert all(t.dtype == torch.float32 for t in full["position_embeddings"])  # kept in the model's dtype


def test_the_guard_refuses_a_broken_replay_naming_the_block():
    """Block 0's inputs replayed for every block (what the engine did before): refused at the first block
    whose own inputs differ, in one line."""
    model = mixed_model("gemma3")
    ids = calib(2)
    _, blocks = find_blocks(model)
    with inference_state(model):
        inputs = capture_block_inputs(model, blocks, [ids], CPU)[0]
        broken = BlockInputs(inputs.hidden, [inputs.per_block[0]] * len(blocks), inputs.ids)
        with pytest.raises(ValueError, match=r"block 1 differs by .*not supported") as error:
            check_replay(model, blocks, ids, broken, CPU, lambda i, b: contextlib.nullcontext())
        assert "\n" not in str(error.value)
        assert check_replay(model, blocks, ids, inputs, CPU, lambda i, b: contextlib.nullcontext()) == 0.0


def test_the_engine_refuses_when_its_replay_is_wrong(monkeypatch):
    """The guard runs inside compress for every method: a capture that loses the per-block inputs stops the
    run before anything is compressed."""
    engine = importlib.import_module("pifa.compress")  # the module (pifa.compress is the function)

    real = engine.capture_block_inputs

    def first_block_only(*args, **kwargs):
        return [BlockInputs(i.hidden, [i.per_block[0]] * len(i.per_block), i.ids) for i in real(*args, **kwargs)]

    monkeypatch.setattr(engine, "capture_block_inputs", first_block_only)
    model = mixed_model("gemma2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("mpifa", "sparsegpt"):
        with pytest.raises(ValueError, match="cannot reproduce this model's own forward pass"):
            pifa.compress(model, pifa.CompressionConfig(method=method, density=0.5), calib(), batch_size=2,
                          progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "qwen2-sliding", "mistral-window", "cohere2"])
def test_compress_sensitivity_and_reload(arch, tmp_path):
    model = mixed_model(arch)
    config = pifa.CompressionConfig(method="mpifa", density=0.6, allocation="sensitivity", sensitivity_samples=2)
    report = pifa.compress(model, config, calib(), batch_size=2, progress=False)
    assert report.replay_difference == 0.0
    assert "guard" in report.stage_seconds
    assert len({m.rank for m in report.modules}) > 1  # measured ranks, not uniform
    ids = calib(2, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.isfinite(expected).all()
    pifa.save_compressed(model, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma3", "qwen2-sliding"])
def test_streamed_equals_in_memory_on_mixed_attention(arch, tmp_path):
    """The streamed engine (blocks on the meta device until needed) captures the same per-block inputs and
    passes the same guard: identical tensors to the in-memory run."""
    from pifa.streaming import compress_streamed

    config = pifa.CompressionConfig(method="mpifa", density=0.5)
    mixed_model(arch).save_pretrained(tmp_path / "dense")
    model = mixed_model(arch)
    report = pifa.compress(model, config, calib(), batch_size=2, progress=False)
    pifa.save_compressed(model, tmp_path / "memory")
    streamed_report = compress_streamed(tmp_path / "dense", tmp_path / "streamed", config, calib(), batch_size=2,
                                        progress=False)
    assert report.replay_difference == streamed_report.replay_difference == 0.0
    expected = pifa.load_compressed(tmp_path / "memory").state_dict()
    streamed = pifa.load_compressed(tmp_path / "streamed").state_dict()
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], v) for k, v in expected.items())
