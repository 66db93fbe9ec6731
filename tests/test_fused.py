"""Fused siblings (pifa.fuse_siblings): compressed layers reading one input share their first GEMM; the
outputs equal the unfused model's to round-off on every architecture of the matrix, the state dict and the
saved folder are unchanged; load_compressed(fuse=True) and from_pretrained then fuse_siblings."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch._dynamo

import pifa
from helpers import MATRIX_CONFIGS, factor_layout_ok, model_output, tensor_layout_ok, tiny_model
from pifa import LowRankLinear, PivotLinear
from pifa.fused import FusedGroup
from pifa.layers import is_compressed

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _compressed(arch: str, method: str = "mpifa"):
    model = tiny_model(arch)
    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    pifa.compress(model, pifa.CompressionConfig(method=method, density=0.5), calib, batch_size=2, progress=False)
    return model


@pytest.mark.parametrize("arch", sorted(MATRIX_CONFIGS))
def test_fused_equals_unfused_on_the_matrix(arch):
    model = _compressed(arch)
    expected = model_output(model, IDS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = pifa.fuse_siblings(model)
    assert pifa.fused_groups(model) == groups
    if arch in ("llama", "qwen2", "mistral", "gemma", "opt", "bert"):  # separate q/k/v projections at least
        assert any(len(g) >= 3 for g in groups), groups
    shared = {id(m._fused[0]): m._fused[0] for m in model.modules() if getattr(m, "_fused", None) is not None}
    assert all(tensor_layout_ok(group.weight) for group in shared.values())
    got = model_output(model, IDS)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert pifa.unfuse_siblings(model) == sum(len(g) for g in groups)
    assert all(factor_layout_ok(m) for m in model.modules() if is_compressed(m))
    assert torch.allclose(model_output(model, IDS), expected, atol=1e-5, rtol=1e-5)


def test_fused_low_rank_layers_and_groups_share_memory():
    model = _compressed("llama", method="svd")
    expected = model_output(model, IDS)
    groups = pifa.fuse_siblings(model)
    attn = model.model.layers[0].self_attn
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in groups
    group, _ = attn.q_proj._fused
    assert isinstance(attn.q_proj, LowRankLinear)
    assert attn.k_proj.down.data_ptr() == group.weight[attn.q_proj.rank:].data_ptr()  # rows of one tensor
    assert torch.allclose(model_output(model, IDS), expected, atol=1e-5, rtol=1e-5)


def test_any_call_order_repeated_calls_and_in_place_changes():
    model = _compressed("llama")
    pifa.fuse_siblings(model)
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = {name: F_unfused(layer, x) for name, layer in (("q", q), ("k", k), ("v", v))}
        assert torch.allclose(v(x), expected["v"], atol=1e-6)
        assert torch.allclose(k(x), expected["k"], atol=1e-6)
        assert torch.allclose(k(x), expected["k"], atol=1e-6)  # twice before q: recomputed, same result
        x.mul_(2)  # in place: the kept product is stale
        assert torch.allclose(q(x), F_unfused(q, x), atol=1e-6)
        assert torch.allclose(v(x), F_unfused(v, x), atol=1e-6)
    with torch.inference_mode():  # inference tensors: no version counter, identity only
        y = torch.randn(3, 32)
        assert torch.allclose(k(y), F_unfused(k, y), atol=1e-6) and torch.allclose(q(y), F_unfused(q, y), atol=1e-6)
    with torch.enable_grad():  # autograd: each layer its own GEMM, gradients reach its own parameter
        k(x).sum().backward()
    assert k.pivot_weight.grad is not None and q.pivot_weight.grad is None


def F_unfused(layer, x):  # noqa: N802
    dense = layer.to_linear()
    return dense(x)


def test_cast_and_move_rebuild_the_group():
    model = _compressed("llama")
    pifa.fuse_siblings(model)
    model.to(torch.float64)
    group, _ = model.model.layers[0].mlp.gate_proj._fused
    with torch.no_grad():
        got = model_output(model, IDS)
    assert isinstance(group, FusedGroup) and group.weight.dtype == torch.float64
    assert got.dtype == torch.float64
    pifa.unfuse_siblings(model)
    assert torch.allclose(model_output(model, IDS), got, atol=1e-9)


def test_save_load_round_trip_unchanged(tmp_path):
    model = _compressed("llama")
    expected = model_output(model, IDS)
    pifa.save_compressed(model, tmp_path / "plain")
    pifa.fuse_siblings(model)
    pifa.save_compressed(model, tmp_path / "fused")
    for name in ("model.safetensors",):
        plain = safetensors.torch.load_file(tmp_path / "plain" / name)
        fused = safetensors.torch.load_file(tmp_path / "fused" / name)
        assert plain.keys() == fused.keys() and all(torch.equal(plain[k], fused[k]) for k in plain)
    loaded = pifa.load_compressed(tmp_path / "plain", fuse=True)
    assert pifa.fused_groups(loaded)
    assert torch.allclose(model_output(loaded, IDS), expected, atol=1e-5, rtol=1e-5)
    unfused = pifa.load_compressed(tmp_path / "fused")  # the default: unfused, bit for bit the saved model
    assert not pifa.fused_groups(unfused)
    pifa.unfuse_siblings(model)
    assert torch.equal(model_output(unfused, IDS), model_output(model, IDS))


def test_from_pretrained_then_fuse(tmp_path):
    import transformers

    model = _compressed("qwen2")
    expected = model_output(model, IDS)
    pifa.save_compressed(model, tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert pifa.fuse_siblings(loaded)
    assert torch.allclose(model_output(loaded, IDS), expected, atol=1e-5, rtol=1e-5)


def test_fused_model_compiles_without_graph_breaks():
    model = _compressed("llama")
    pifa.fuse_siblings(model)
    assert any(isinstance(m, PivotLinear) and m._fused for m in model.modules())
    with torch.no_grad():
        expected = model_output(model, IDS)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)
