"""transformers' from_pretrained loads save_compressed directories through pifa's quantizer plugin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import pifa
from helpers import MATRIX_CONFIGS, factor_layout_ok, model_output, tiny_model
from pifa import LowRankLinear, PivotLinear, load_compressed, save_compressed
from pifa.app.cli import main
from pifa.format import CONFIG_NAME
from pifa.layers import is_compressed
from pifa.model import find_blocks, is_linear, linear_weight

CAUSAL_ARCHS = ["llama", "llama-tied", "qwen2"]


def compress_decoder(model):
    """PIFA on q_proj, k_proj and gate_proj of block 0, low-rank on v_proj and down_proj of block 1."""
    layers = model.model.layers
    attn0, mlp0, attn1, mlp1 = layers[0].self_attn, layers[0].mlp, layers[1].self_attn, layers[1].mlp
    if attn0.k_proj.bias is not None:  # qwen2: make the bias matter
        with torch.no_grad():
            attn0.k_proj.bias.normal_()
    attn0.q_proj = PivotLinear.from_linear(attn0.q_proj, 8)
    attn0.k_proj = PivotLinear.from_linear(attn0.k_proj, 4)
    mlp0.gate_proj = PivotLinear.from_linear(mlp0.gate_proj, 12)
    attn1.v_proj = LowRankLinear.from_linear(attn1.v_proj, 4)
    mlp1.down_proj = LowRankLinear.from_linear(mlp1.down_proj, 10)
    return model


def compress_bert(model):
    layer0, layer1 = model.encoder.layer
    layer0.attention.self.query = PivotLinear.from_linear(layer0.attention.self.query, 8)
    layer0.intermediate.dense = PivotLinear.from_linear(layer0.intermediate.dense, 12)
    layer1.attention.self.value = LowRankLinear.from_linear(layer1.attention.self.value, 6)
    layer1.output.dense = LowRankLinear.from_linear(layer1.output.dense, 10)
    return model


def compressed_layers(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, (PivotLinear, LowRankLinear))}


def assert_clean_load(info):
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]


@pytest.fixture(params=CAUSAL_ARCHS)
def saved_causal(request, tmp_path):
    model = compress_decoder(tiny_model(request.param))
    path = save_compressed(model, tmp_path / request.param)
    return request.param, model, path


def test_config_json_carries_quantization_config(saved_causal):
    _, _, path = saved_causal
    block = json.loads((path / "config.json").read_text())["quantization_config"]
    spec = json.loads((path / CONFIG_NAME).read_text())
    assert block["quant_method"] == "pifa" and block["format_version"] == 1
    assert block["modules"] == spec["modules"] and len(block["modules"]) == 5


def test_no_quantization_config_without_compressed_layers(tmp_path):
    save_compressed(tiny_model("llama"), tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    # a plain checkpoint: transformers loads it without pifa's quantizer
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert getattr(model, "hf_quantizer", None) is None


def test_from_pretrained_matches_load_compressed(saved_causal, input_ids):
    arch, original, path = saved_causal
    expected = model_output(original, input_ids)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert_clean_load(info)
    assert compressed_layers(model) == compressed_layers(original)
    assert isinstance(model.model.layers[0].self_attn.q_proj, PivotLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, LowRankLinear)
    assert not model.training
    reference = load_compressed(path)
    assert torch.equal(model_output(model, input_ids), model_output(reference, input_ids))
    assert torch.equal(model_output(model, input_ids), expected)
    # the derived index buffers were rebuilt from the loaded pivot_index
    for name, layer in model.named_modules():
        if isinstance(layer, PivotLinear):
            source = original.get_submodule(name)
            assert layer.pivot_index.dtype == torch.int64
            for buffer in ("pivot_index", "gather_index", "other_index"):
                assert torch.equal(getattr(layer, buffer), getattr(source, buffer)), (name, buffer)
    for loaded in (model, reference):  # factors laid out again (pifa.layers.column_major), whoever loaded them
        assert all(factor_layout_ok(layer) for layer in loaded.modules() if is_compressed(layer))
    if arch == "llama-tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if arch == "qwen2":
        k_proj = model.model.layers[0].self_attn.k_proj
        assert torch.equal(k_proj.bias, original.model.layers[0].self_attn.k_proj.bias)
    assert model.is_quantized and model.config.quantization_config.quant_method == "pifa"


def test_bert_encoder_with_automodel(tmp_path, input_ids):
    original = compress_bert(tiny_model("bert"))
    path = save_compressed(original, tmp_path / "bert")
    model, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
    assert_clean_load(info)
    assert type(model).__name__ == "BertModel"
    assert compressed_layers(model) == compressed_layers(original)
    expected = model_output(original, input_ids)
    assert torch.equal(model_output(model, input_ids), expected)
    assert torch.equal(model_output(load_compressed(path), input_ids), expected)


def test_causal_checkpoint_into_base_model(tmp_path, input_ids):
    """AutoModel on a *ForCausalLM checkpoint: module names lose the ``model.`` prefix, as weights do."""
    original = compress_decoder(tiny_model("llama"))
    path = save_compressed(original, tmp_path / "m")
    base, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and info["unexpected_keys"] == {"lm_head.weight"}  # the head it has not
    assert type(base).__name__ == "LlamaModel"
    assert isinstance(base.layers[0].self_attn.q_proj, PivotLinear)
    with torch.no_grad():
        expected = original.model(input_ids=input_ids).last_hidden_state
    assert torch.equal(model_output(base, input_ids), expected)


def dense_linear(module):
    """An nn.Linear equal to a linear or a GPT-2 Conv1D."""
    weight = linear_weight(module)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


@pytest.mark.parametrize("arch", sorted(MATRIX_CONFIGS))
def test_model_matrix(arch, tmp_path, input_ids):
    """Every layout of the pipeline's matrix (Conv1D, fused qkv, encoders): first three linears of block 0."""
    original = tiny_model(arch)
    prefix, blocks = find_blocks(original)
    names = [f"{prefix}.0.{name}" for name, module in blocks[0].named_modules() if is_linear(module)][:3]
    for i, name in enumerate(names):
        linear = dense_linear(original.get_submodule(name))
        kind = PivotLinear if i % 2 == 0 else LowRankLinear
        original.set_submodule(name, kind.from_linear(linear, min(linear.in_features, linear.out_features) // 2))
    path = save_compressed(original, tmp_path / arch)
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(path, output_loading_info=True)
    assert_clean_load(info)
    assert compressed_layers(model) == compressed_layers(original) and len(names) == 3
    assert not any("_init_weights" in vars(m) for m in model.modules())  # the loading-time patch is gone
    expected = model_output(original, input_ids)
    assert torch.equal(model_output(model, input_ids), expected)
    assert torch.equal(model_output(load_compressed(path), input_ids), expected)


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_bfloat16(saved_causal, input_ids, keyword):
    _, _, path = saved_causal
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **{keyword: torch.bfloat16})
    for layer in compressed_layers(model):
        layer = model.get_submodule(layer)
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            expected = torch.int64 if name.endswith("_index") else torch.bfloat16
            assert tensor.dtype == expected, (name, tensor.dtype)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    reference = load_compressed(path, dtype=torch.bfloat16)
    logits = model_output(model, input_ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert torch.equal(logits, model_output(reference, input_ids))


def test_device_map_auto(saved_causal, input_ids):
    pytest.importorskip("accelerate", reason="transformers needs accelerate for any device_map")
    _, original, path = saved_causal
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.bfloat16)
    if not torch.cuda.is_available():  # "auto" maps everything to the CPU (no hf_device_map on one device)
        assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, PivotLinear) and q_proj.pivot_weight.dtype == torch.bfloat16
    assert q_proj.pivot_index.dtype == torch.int64
    reference = load_compressed(path, device=q_proj.pivot_weight.device, dtype=torch.bfloat16)
    ids = input_ids.to(q_proj.pivot_weight.device)
    assert torch.equal(model_output(model, ids), model_output(reference, ids))


def test_disk_offload(tmp_path, input_ids):
    pytest.importorskip("accelerate", reason="transformers needs accelerate for any device_map")
    original = compress_decoder(tiny_model("llama"))
    path = save_compressed(original, tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "disk", "model.layers.1": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=tmp_path / "off")
    assert model.model.layers[0].self_attn.q_proj.pivot_weight.device.type == "meta"  # on disk
    # accelerate brings the offloaded factors back row-major (pifa lays tall ones out column-major): another GEMM
    # kernel, so equal to round-off rather than bit for bit
    torch.testing.assert_close(model_output(model, input_ids), model_output(original, input_ids))
    with pytest.raises(ValueError, match="offload_buffers=False"):
        transformers.AutoModelForCausalLM.from_pretrained(
            path, device_map=device_map, offload_folder=tmp_path / "off2", offload_buffers=True)


def test_resave_after_from_pretrained(saved_causal, tmp_path, input_ids):
    _, original, path = saved_causal
    expected = model_output(original, input_ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    again = save_compressed(model, tmp_path / "again")
    assert json.loads((again / CONFIG_NAME).read_text())["modules"] == json.loads((path / CONFIG_NAME).read_text())["modules"]
    config = json.loads((again / "config.json").read_text())
    assert config["quantization_config"]["modules"] == json.loads((path / "config.json").read_text())["quantization_config"]["modules"]
    assert not config.get("_is_quantized", False)
    assert torch.equal(model_output(load_compressed(again), input_ids), expected)
    assert torch.equal(model_output(transformers.AutoModelForCausalLM.from_pretrained(again), input_ids), expected)


def test_save_pretrained_round_trip(saved_causal, tmp_path, input_ids):
    """transformers' own save_pretrained of a loaded pifa model is loadable again (the quantizer is serializable)."""
    arch, original, path = saved_causal
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.model.layers[0].self_attn.q_proj = model.model.layers[0].self_attn.q_proj.to_linear()  # densify one
    model.save_pretrained(tmp_path / "hf")
    block = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.q_proj" not in block["modules"] and len(block["modules"]) == 4
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(again.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(model_output(again, input_ids), model_output(model, input_ids))
    if arch == "llama-tied":
        assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()


def test_dequantize(saved_causal, input_ids):
    _, original, path = saved_causal
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    expected = model_output(model, input_ids)
    model = model.dequantize()
    assert compressed_layers(model) == {}
    assert not hasattr(model.config, "quantization_config")
    torch.testing.assert_close(model_output(model, input_ids), expected, rtol=1e-4, atol=1e-5)


def test_load_compressed_checks_config_json_agrees(saved_causal):
    _, _, path = saved_causal
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.0.self_attn.q_proj"]["rank"] = 9
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="different compressed modules"):
        load_compressed(path)


def test_load_compressed_without_quantization_config(saved_causal, input_ids):
    """Directories written before config.json carried the block still load with load_compressed."""
    _, original, path = saved_causal
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    assert torch.equal(model_output(load_compressed(path), input_ids), model_output(original, input_ids))


def test_bad_quantization_config(saved_causal):
    _, _, path = saved_causal
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 99"):
        transformers.AutoModelForCausalLM.from_pretrained(path)
    config["quantization_config"]["format_version"] = 1
    config["quantization_config"]["modules"]["model.layers.0.self_attn.nope"] = dict(
        kind="pivot", in_features=32, out_features=32, rank=4, bias=False)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="nope"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


def test_cannot_compress_on_the_fly(tmp_path):
    """A dense checkpoint with a PifaQuantizationConfig passed in: pifa needs calibration, so it refuses."""
    from pifa.hf import PifaQuantizationConfig

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=PifaQuantizationConfig())


def test_register_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from pifa.hf import PifaHfQuantizer, PifaQuantizationConfig, register

    register()
    register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["pifa"] is PifaQuantizationConfig
    assert AUTO_QUANTIZER_MAPPING["pifa"] is PifaHfQuantizer


SCRIPT = """
import sys, torch
{first}
{second}
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert type(model.model.layers[0].self_attn.q_proj).__name__ == "PivotLinear"
print("ok")
"""


@pytest.mark.parametrize("order", ["pifa-first", "transformers-first"])
def test_import_pifa_registers_in_any_order(tmp_path, order):
    """No trust_remote_code, no explicit registration: ``import pifa`` (before or after transformers) suffices."""
    path = save_compressed(compress_decoder(tiny_model("llama")), tmp_path / "m")
    pifa_line = "import pifa"
    hf_line = "import transformers.modeling_utils; assert 'transformers.quantizers.auto' in sys.modules"
    first, second = (pifa_line, "import transformers") if order == "pifa-first" else (hf_line, pifa_line)
    src = str(Path(pifa.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(first=first, second=second), str(path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def _saved(tmp_path):
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.q_proj = PivotLinear.from_linear(attn.q_proj, 8)
    return save_compressed(model, tmp_path / "m")


@pytest.mark.parametrize("damage, message", [
    ("drop-coeff", "lacks tensor 'model.layers.0.self_attn.q_proj.coeff'"),
    ("drop-pivot-index", "lacks tensor 'model.layers.0.self_attn.q_proj.pivot_index'"),
    ("int32-coeff", "is I32"),
    ("float-pivot-index", "pivot indices must be I64"),
    ("wrong-shape-coeff", "has shape (24, 9)"),
    ("mixed-dtypes", "mix dtypes"),
    ("big-sentinel", "empty marker"),
])
def test_from_pretrained_refuses_missing_or_mistyped_tensors(tmp_path, damage, message):
    import transformers

    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj."
    if damage == "drop-coeff":
        del tensors[key + "coeff"]
    if damage == "drop-pivot-index":
        del tensors[key + "pivot_index"]
    if damage == "int32-coeff":
        tensors[key + "coeff"] = tensors[key + "coeff"].to(torch.int32)
    if damage == "float-pivot-index":
        tensors[key + "pivot_index"] = tensors[key + "pivot_index"].float()
    if damage == "wrong-shape-coeff":
        tensors[key + "coeff"] = torch.zeros(24, 9)
    if damage == "mixed-dtypes":
        tensors[key + "coeff"] = tensors[key + "coeff"].half()
    if damage == "big-sentinel":
        tensors[key + "weight"] = torch.zeros(32, 32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    for load in (lambda: transformers.AutoModelForCausalLM.from_pretrained(path), lambda: load_compressed(path)):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            load()
        assert "\n" not in str(info.value)
    assert main(["info", str(path)]) == 2


def test_from_pretrained_without_import_pifa_fails_instead_of_returning_random_weights(tmp_path):
    path = _saved(tmp_path)
    script = ("import sys, transformers\n"
              "assert 'pifa' not in sys.modules\n"
              "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
              "print('loaded')\n")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "loaded" not in result.stdout
    assert "Unknown quantization type, got pifa" in result.stderr  # transformers names the missing method ...
    assert "size mismatch" in result.stderr and "ignore_mismatched_sizes" in result.stderr  # ... and then fails
    # with pifa imported the same folder loads cleanly: the empty markers are expected, not reported
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, PivotLinear)
