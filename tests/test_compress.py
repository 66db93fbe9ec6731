"""The compression pipeline on the tiny model matrix."""

import logging
import sys

import pytest
import torch

import pifa
from helpers import MATRIX_CONFIGS, model_output, tiny_model
from pifa import CompressionConfig, LowRankLinear, PivotLinear, compress, load_compressed, save_compressed
from pifa.model import context_limit, find_blocks, is_linear

CALIB = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
KINDS = {"mpifa": PivotLinear, "m": LowRankLinear, "svd-llm": LowRankLinear, "svd": LowRankLinear}


def run(model, **fields):
    return compress(model, CompressionConfig(**fields), CALIB, batch_size=4, progress=False)


@pytest.mark.parametrize("name", sorted(MATRIX_CONFIGS))
def test_matrix_swaps_every_target_and_hits_the_density(name, tmp_path):
    model = tiny_model(name)
    report = run(model, density=0.5)
    _, blocks = find_blocks(model)
    assert not any(is_linear(m) for m in blocks.modules()), "a linear inside a block was left dense"
    compressed = [m for m in model.modules() if isinstance(m, PivotLinear)]
    assert len(compressed) == len(report.modules) > 0
    assert 0.5 * 0.99 <= report.density <= 0.5 * 1.01
    expected = model_output(model, CALIB[:2])
    save_compressed(model, tmp_path / "m")
    assert torch.equal(model_output(load_compressed(tmp_path / "m"), CALIB[:2]), expected)


@pytest.mark.parametrize("method", sorted(KINDS))
def test_methods_give_their_layer_kind(method):
    model = tiny_model("qwen2")
    report = run(model, density=0.6, method=method)
    assert all(isinstance(m, KINDS[method]) for m in find_blocks(model)[1].modules() if hasattr(m, "rank"))
    assert 0.6 * 0.99 <= report.density <= 0.6 * 1.01
    assert all(m.calib_error >= 0 for m in report.modules)


def test_full_density_keeps_outputs():
    model = tiny_model("gpt2")  # Conv1D weights are stored transposed
    expected = model_output(model, CALIB[:2])
    run(model, density=1.0, method="mpifa")  # PIFA at density 1 is full rank
    torch.testing.assert_close(model_output(model, CALIB[:2]), expected, rtol=1e-4, atol=1e-4)


def test_whitened_beats_plain_on_the_first_group():
    errors = {}
    for method in ("svd", "svd-llm"):
        report = run(tiny_model("llama"), density=0.4, method=method)
        errors[method] = {m.name: m.calib_error for m in report.modules if ".0.self_attn." in m.name}
    for name, err in errors["svd-llm"].items():
        if not name.endswith("o_proj"):
            assert err <= errors["svd"][name] + 1e-9


def test_attention_split():
    report = run(tiny_model("llama"), density=0.5, attn_density=0.4)
    attn = [m for m in report.modules if "self_attn" in m.name]
    mlp = [m for m in report.modules if "mlp" in m.name]
    assert sum(m.params_after for m in attn) / sum(m.params_before for m in attn) == pytest.approx(0.4, abs=0.03)
    assert sum(m.params_after for m in mlp) / sum(m.params_before for m in mlp) > 0.5
    assert 0.495 <= report.density <= 0.505


def test_impossible_attention_split_names_both():
    with pytest.raises(ValueError, match=r"attn_density 0.05 with density 0.9 forces the MLP density to .*outside"):
        run(tiny_model("llama"), density=0.9, attn_density=0.05)


def test_owl_allocation_hits_the_density():
    report = run(tiny_model("llama"), density=0.5, allocation="owl")
    assert 0.495 <= report.density <= 0.505
    per_block = {}
    for m in report.modules:
        block = m.name.split(".")[2]
        per_block.setdefault(block, []).append(m.params_after / m.params_before)
    assert len(per_block) == 2


def assert_clean(model):
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert model.training and model.config.use_cache


def test_hooks_and_modes_restored_after_success():
    model = tiny_model("llama").train()
    model.config.use_cache = True
    run(model, density=0.5)
    assert_clean(model)


def test_hooks_and_modes_restored_after_an_exception(monkeypatch):
    model = tiny_model("llama").train()
    model.config.use_cache = True
    calls = {"n": 0}
    real = pifa.solver.truncate

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pifa.solver, "truncate", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run(model, density=0.5)
    assert_clean(model)


def test_resume_after_failure_gives_identical_tensors(tmp_path, monkeypatch):
    config = CompressionConfig(density=0.5, method="mpifa")
    reference = tiny_model("llama")
    compress(reference, config, CALIB, batch_size=4, progress=False)

    real = pifa.solver.truncate
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # inside the second block
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pifa.solver, "truncate", failing)
    with pytest.raises(RuntimeError, match="killed"):
        compress(tiny_model("llama"), config, CALIB, batch_size=4, progress=False, checkpoint_dir=tmp_path / "ck")
    monkeypatch.setattr(pifa.solver, "truncate", real)
    assert (tmp_path / "ck" / "block_0000.safetensors").exists()
    assert not (tmp_path / "ck" / "block_0001.safetensors").exists()
    resumed = tiny_model("llama")
    report = compress(resumed, config, CALIB, batch_size=4, progress=False, checkpoint_dir=tmp_path / "ck")
    assert len(report.modules) == 14
    expected = reference.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_checkpoint_of_another_config_is_refused(tmp_path):
    compress(tiny_model("llama"), CompressionConfig(density=0.5), CALIB, progress=False, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ValueError, match="another model, config"):
        compress(tiny_model("llama"), CompressionConfig(density=0.6), CALIB, progress=False, checkpoint_dir=tmp_path / "ck")


def test_non_finite_activations_name_the_block():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite activations at the input of model.layers.1.self_attn.q_proj in block 1"):
        run(model, density=0.5)


def test_one_infinite_activation_names_its_linear():
    """A single Inf among the compressed stream's tokens (caught from G's diagonal, one sum of squares per channel)."""
    model = tiny_model("llama")

    def poison(_module, _args, output):
        output = output.clone()
        output[0, 3, 5] = float("inf")
        return output

    model.model.layers[1].post_attention_layernorm.register_forward_hook(poison)
    with pytest.raises(ValueError, match=r"non-finite activations at the input of model.layers.1.mlp.gate_proj in "
                                         r"block 1"):
        compress(model, CompressionConfig(method="svd-llm", density=0.5), CALIB, progress=False)


def test_no_block_list():
    model = torch.nn.Sequential(torch.nn.Embedding(128, 8), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no block list found"):
        compress(model, CompressionConfig(), CALIB, progress=False)


@pytest.mark.parametrize(
    "fields, message",
    [({"density": 0}, "density 0 is outside"), ({"density": 1.5}, "density 1.5"),
     ({"method": "lora"}, "unknown method 'lora'"), ({"attn_density": -1}, "attn_density -1"),
     ({"allocation": "x"}, "unknown allocation")],
)
def test_config_bad_input(fields, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**fields)


def test_config_round_trips_through_json():
    config = CompressionConfig(density=0.4, targets=("*mlp*",), attn_density=0.5)
    assert CompressionConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "ria"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparse_methods_keep_n_of_every_m(method, pattern, tmp_path):
    n_keep, m_group = map(int, pattern.split(":"))
    model = tiny_model("gpt2")  # Conv1D: the pattern runs along the inputs of the transposed weight
    report = run(model, method=method, pattern=pattern)
    assert report.density == pytest.approx(n_keep / m_group)
    from pifa.model import linear_weight
    for module in find_blocks(model)[1].modules():
        if is_linear(module):
            groups = linear_weight(module).reshape(-1, m_group)
            assert torch.equal((groups != 0).sum(1), torch.full((groups.shape[0],), n_keep))
    expected = model_output(model, CALIB[:2])
    save_compressed(model, tmp_path / "s", compression=CompressionConfig(method=method, pattern=pattern).to_dict())
    assert torch.equal(model_output(load_compressed(tmp_path / "s"), CALIB[:2]), expected)


def test_sparsegpt_error_at_most_magnitude_per_layer_of_the_first_group():
    """Both prune the first group's linears from the same statistics (the dense block-0 inputs): per layer,
    SparseGPT's compensated reconstruction error does not exceed plain magnitude pruning's."""
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        report = run(tiny_model("llama"), method=method, pattern="2:4")
        errors[method] = {m.name: m.calib_error for m in report.modules if ".0.self_attn." in m.name}
    for name, err in errors["sparsegpt"].items():
        if not name.endswith("o_proj"):
            assert err <= errors["magnitude"][name] + 1e-9


@pytest.mark.parametrize(
    "fields, message",
    [({"method": "wanda", "pattern": "2:4", "density": 0.6}, "contradicts pattern 2:4"),
     ({"method": "wanda", "pattern": "4:2"}, "pattern '4:2'"),
     ({"method": "mpifa", "pattern": "2:4"}, "needs a sparse method")],
)
def test_sparse_config_bad_input(fields, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**fields)


def test_width_not_divisible_by_m():
    with pytest.raises(ValueError, match="not divisible by M=5"):
        run(tiny_model("llama"), method="magnitude", pattern="2:5")


def biased(model):
    """Random biases (transformers initialises them to zero), the same for every call."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("name", ["llama", "opt", "gpt2"])  # opt's fc2 and gpt2's c_proj carry a bias
def test_m_from_dense_outputs_equals_m_from_dense_inputs(name, monkeypatch):
    """A narrow layer (down_proj) gets M's W H from its dense outputs, sum (y - b) x~^T; the engine
    told to use H = sum x x~^T instead must give the same factors to float32 round-off."""
    engine = sys.modules["pifa.streams"]  # where the dense stream decides how M's W H is recorded
    used = []
    real = engine._by_outputs
    monkeypatch.setattr(engine, "_by_outputs", lambda linears, group: used.append(real(linears, group)) or used[-1])
    by_outputs = biased(tiny_model(name))
    first = run(by_outputs, density=0.5, method="m")
    assert any(used), "no group was recorded by its outputs"
    monkeypatch.setattr(engine, "_by_outputs", lambda linears, group: False)
    by_inputs = biased(tiny_model(name))
    second = run(by_inputs, density=0.5, method="m")
    for a, b in zip(first.modules, second.modules, strict=True):
        assert a.calib_error == pytest.approx(b.calib_error, rel=1e-4, abs=1e-7), a.name
    torch.testing.assert_close(model_output(by_outputs, CALIB[:2]), model_output(by_inputs, CALIB[:2]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("calib, message", [
    (torch.zeros(2, 8, dtype=torch.long, device="meta"), "calib is on the meta device"),
    (torch.zeros(2, 65, dtype=torch.long), "longer than the model's context of 64 tokens"),
])
def test_calibration_the_model_cannot_read_is_one_line(calib, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message) as error:
        pifa.compress(model, pifa.CompressionConfig(), calib, progress=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("declared", [-1, 0])
def test_a_context_declared_non_positive_or_absent_is_no_limit(declared):
    """XLNet declares max_position_embeddings = -1 (no limit): calibration of any length is accepted."""
    model = tiny_model("llama")
    model.config.max_position_embeddings = declared
    assert context_limit(model) is None
    pifa.compress(model, pifa.CompressionConfig(density=0.5), torch.randint(3, 100, (2, 80)), progress=False)


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


@pytest.mark.parametrize("method", ["mpifa", "svd-llm", "sparsegpt"])
def test_same_inputs_give_identical_bytes(method, tmp_path):
    paths = []
    for run in range(2):
        model = tiny_model("qwen2")
        compress(model, CompressionConfig(method=method), CALIB, progress=False)
        paths.append(save_compressed(model, tmp_path / f"run{run}"))
    assert (paths[0] / "model.safetensors").read_bytes() == (paths[1] / "model.safetensors").read_bytes()
