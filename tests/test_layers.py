"""torch.compile(fullgraph=True) of compressed models: no graph break from pifa's layers, and generate with a
static KV cache gives the eager model's tokens, on every causal architecture of the test matrix. The graphs
are captured with the "eager" backend (dynamo's capture, which is where graph breaks happen, without the
minutes of C++ code generation); the benchmarks time the inductor backend."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pifa
from helpers import MATRIX_CONFIGS, factor_layout_ok, tiny_model
from pifa import LowRankLinear, PivotLinear


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def factors(m: int, n: int, r: int, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    return up, down, (torch.randn(m, generator=g) if bias else None)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 48), n=st.integers(1, 48), r_frac=st.floats(0.0, 1.0),
    bias=st.booleans(), method=st.sampled_from(["lu", "qr"]), seed=st.integers(0, 2**16),
)
def test_pifa_equals_low_rank_source(m, n, r_frac, bias, method, seed):
    r = max(1, round(r_frac * min(m, n)))
    up, down, b = factors(m, n, r, seed, bias)
    low = LowRankLinear.from_factors(up, down, b)
    piv = PivotLinear.from_low_rank(low, method=method)
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        assert rel_err(piv(x), low(x)) <= 1e-5
    assert rel_err(piv.to_linear().weight, low.to_linear().weight) <= 1e-5


@pytest.mark.parametrize("m, n, r", [(96, 48, 1), (48, 96, 24), (64, 64, 64), (80, 40, 40), (40, 80, 40), (257, 129, 100)])
@pytest.mark.parametrize("method", ["lu", "qr"])
def test_shapes_rank_one_and_full_rank(m, n, r, method):
    up, down, b = factors(m, n, r)
    low = LowRankLinear.from_factors(up, down, b)
    piv = PivotLinear.from_factors(up, down, b, method=method)
    x = torch.randn(3, 5, n)  # any number of leading dimensions
    with torch.no_grad():
        y = piv(x)
        assert y.shape == (3, 5, m)
        assert rel_err(y, low(x)) <= 1e-5
    assert piv.pivot_weight.shape == (r, n) and piv.coeff.shape == (m - r, r)
    assert piv.pivot_index.shape == (r,)


def test_pivot_rows_are_rows_of_the_product():
    up, down, _ = factors(50, 30, 10)
    piv = PivotLinear.from_factors(up, down)
    dense = (up.double() @ down.double()).float()
    torch.testing.assert_close(piv.pivot_weight, dense[piv.pivot_index])
    assert torch.equal(piv.pivot_index, piv.pivot_index.sort().values)


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
def test_full_rank_reproduces_dense(cls):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    layer = cls.from_linear(linear, rank=24)
    x = torch.randn(6, 24)
    with torch.no_grad():
        assert rel_err(layer(x), linear(x)) <= 1e-5
    assert rel_err(layer.to_linear().weight, linear.weight) <= 1e-5
    torch.testing.assert_close(layer.to_linear().bias, linear.bias)


def test_from_linear_is_truncated_svd():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=False)
    low = LowRankLinear.from_linear(linear, rank=8)
    s = torch.linalg.svdvals(linear.weight.double())
    err = torch.linalg.matrix_norm((low.to_linear().weight - linear.weight).detach().double())
    assert err == pytest.approx(float(s[8:].norm()), rel=1e-4)
    # sqrt of the singular values on both factors: equal column / row norms
    torch.testing.assert_close(low.up.norm(dim=0), low.down.norm(dim=1), rtol=1e-4, atol=1e-6)
    piv = PivotLinear.from_linear(linear, rank=8)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert rel_err(piv(x), low(x)) <= 1e-5


def test_parameter_counts():
    m, n, r = 40, 30, 10
    up, down, b = factors(m, n, r)
    assert LowRankLinear.from_factors(up, down, b).num_parameters() == r * (m + n) + m
    assert PivotLinear.from_factors(up, down, b).num_parameters() == r * (m + n - r) + m
    assert PivotLinear.from_factors(up, down).num_parameters() == r * (m + n - r)
    assert "rank=10" in repr(PivotLinear.from_factors(up, down)) and "of dense" in repr(LowRankLinear.from_factors(up, down))


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtype_is_kept(cls, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(16, 24).to(dtype)
    layer = cls.from_linear(linear, 8)
    assert layer.to_linear().weight.dtype == dtype
    with torch.no_grad():
        assert layer(torch.randn(2, 16, dtype=dtype)).dtype == dtype


def test_pivot_autograd_matches_low_rank():
    up, down, b = factors(20, 12, 5)
    low = LowRankLinear.from_factors(up, down, b)
    piv = PivotLinear.from_low_rank(low)
    x1 = torch.randn(3, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    low(x1).square().sum().backward()
    piv(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    assert piv.pivot_weight.grad is not None and piv.coeff.grad is not None and piv.bias.grad is not None


def test_inference_path_equals_autograd_path():
    up, down, b = factors(33, 17, 6)
    piv = PivotLinear.from_factors(up, down, b)
    x = torch.randn(2, 4, 17)
    with torch.no_grad():
        fast = piv(x)
    slow = piv(x)  # parameters require grad: differentiable path
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
def test_torch_compile(cls):
    up, down, b = factors(24, 16, 6)
    layer = cls.from_factors(up, down, b) if cls is LowRankLinear else PivotLinear.from_factors(up, down, b)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


def test_module_to_keeps_index_buffers_integer():
    piv = PivotLinear.from_factors(*factors(12, 8, 4))
    piv = piv.to(torch.float16)
    assert piv.pivot_index.dtype == torch.int64 and piv.coeff.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pifa_low_precision_error_is_within_3x_of_low_rank(dtype):
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(256, 64, generator=g) / 8, torch.randn(64, 192, generator=g) / 14
    x = torch.randn(32, 192, generator=g)
    exact = x.double() @ (up.double() @ down.double()).T
    low = LowRankLinear.from_factors(up, down)
    piv = PivotLinear.from_low_rank(low)
    with torch.no_grad():
        err_low = float((low.to(dtype)(x.to(dtype)).double() - exact).norm() / exact.norm())
        err_piv = float((piv.to(dtype)(x.to(dtype)).double() - exact).norm() / exact.norm())
    assert err_piv <= 3 * err_low


# --- torch.compile(fullgraph=True) of compressed models: no graph break from pifa's layers, and generate with a

CAUSAL = sorted(name for name in MATRIX_CONFIGS if name != "bert")


@pytest.mark.parametrize("layer_cls", [PivotLinear, LowRankLinear])
def test_layers_compile_without_graph_breaks(layer_cls):
    torch.manual_seed(0)
    layer = layer_cls.from_linear(torch.nn.Linear(24, 16), 6)
    x = torch.randn(3, 5, 24)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=1e-6)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("arch", CAUSAL)
def test_compiled_static_cache_generate_equals_eager(arch):
    model = tiny_model(arch)
    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    pifa.compress(model, pifa.CompressionConfig(method="mpifa", density=0.5), calib, batch_size=2, progress=False)
    assert any(isinstance(m, PivotLinear) for m in model.modules())
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")  # fullgraph: a break raises
        compiled = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(compiled, expected)


@pytest.mark.parametrize("cls", [PivotLinear, LowRankLinear])
def test_factors_keep_their_layout_through_casts_copies_and_loads(cls):
    import copy

    up, down = torch.randn(24, 6, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    layer = cls.from_factors(up, down, torch.randn(24, dtype=torch.float64)).float()
    x = torch.randn(3, 10)
    expected = layer(x)
    assert factor_layout_ok(layer) and factor_layout_ok(copy.deepcopy(layer))
    assert factor_layout_ok(copy.deepcopy(layer).to(torch.bfloat16))
    empty = cls(10, 24, 6, device="meta").to_empty(device="cpu")
    empty.load_state_dict(layer.state_dict())
    assert factor_layout_ok(empty) and torch.equal(empty(x), expected)
    # a loader that assigns row-major tensors (transformers 5): relayout_ restores the layout, same values
    assigned = cls(10, 24, 6, device="meta")
    assigned.load_state_dict({k: v.contiguous() for k, v in layer.state_dict().items()}, assign=True)
    if cls is PivotLinear:
        assigned._refresh_index()
    assert not factor_layout_ok(assigned)
    assigned.relayout_()
    assert factor_layout_ok(assigned) and torch.equal(assigned(x), expected)
