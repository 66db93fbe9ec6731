"""Numerical robustness, determinism and the no-pickle guarantee."""

import logging
import pickle

import pytest
import torch

from helpers import model_output, tiny_model
from pifa import CompressionConfig, LowRankLinear, PivotLinear, compress, load_compressed, save_compressed
from pifa.validate import all_finite

CALIB = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))


def test_dead_neurons_and_constant_channels_give_finite_results(caplog):
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[:5] = 0  # silu(0) * up = 0: five dead inputs of down_proj
        mlp.up_proj.weight[5:8] = 0
        model.model.layers[1].mlp.up_proj.weight[:, :] = 0  # a whole dead MLP
    with caplog.at_level(logging.WARNING, logger="pifa"):
        report = compress(model, CompressionConfig(density=0.5), CALIB, progress=False)
    assert "input channels are always zero" in caplog.text
    assert all(m.calib_error == m.calib_error for m in report.modules)  # no NaN
    assert torch.isfinite(model_output(model, CALIB)).all()


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


def test_large_pivot_coefficients_are_warned(caplog, monkeypatch):
    import pifa.pivot

    monkeypatch.setattr(pifa.pivot, "LARGE_COEFF", 0.5)  # any real layer has some coefficient above 0.5
    with caplog.at_level(logging.WARNING, logger="pifa"):
        PivotLinear.from_factors(torch.randn(40, 4), torch.randn(4, 8))
    assert "pivot coefficients reach" in caplog.text


@pytest.mark.parametrize("method", ["mpifa", "svd-llm", "sparsegpt"])
def test_same_inputs_give_identical_bytes(method, tmp_path):
    paths = []
    for run in range(2):
        model = tiny_model("qwen2")
        compress(model, CompressionConfig(method=method), CALIB, progress=False)
        paths.append(save_compressed(model, tmp_path / f"run{run}"))
    assert (paths[0] / "model.safetensors").read_bytes() == (paths[1] / "model.safetensors").read_bytes()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "training_args.bin", "optimizer.pt"])
def test_planted_pickle_is_never_executed(tmp_path, name):
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj = PivotLinear.from_linear(model.model.layers[0].self_attn.q_proj, 4)
    out = save_compressed(model, tmp_path / "m")
    marker = tmp_path / "pwned"
    (out / name).write_bytes(pickle.dumps(_Exploit(str(marker))))
    load_compressed(out)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert not marker.exists()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_the_elementwise_check_even_when_the_sum_overflows(dtype):
    big = torch.finfo(dtype).max
    inf, nan = float("inf"), float("nan")
    cases = [[], [1.0, -2.5], [big] * 12, [big, -big, big], [1.0, nan], [inf, 2.0], [-inf],
             [inf, -inf]]  # the sum of [big] * 12 overflows to Inf; of the last is NaN
    for case in cases:
        tensor = torch.tensor(case, dtype=dtype)
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all()), tensor
    assert all_finite(torch.randn(64, 33, dtype=dtype))
    assert all_finite(torch.arange(5))  # integers are always finite
