"""torch.compile(fullgraph=True) of compressed models: no graph break from pifa's layers, and generate with a
static KV cache gives the eager model's tokens, on every causal architecture of the test matrix. The graphs
are captured with the "eager" backend (dynamo's capture, which is where graph breaks happen, without the
minutes of C++ code generation); the benchmarks time the inductor backend."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import pifa
from helpers import MATRIX_CONFIGS, tiny_model
from pifa import LowRankLinear, PivotLinear

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
