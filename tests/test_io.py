import json
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import model_output, tiny_model
from pifa import LowRankLinear, PivotLinear, load_compressed, save_compressed
from pifa.format import CONFIG_NAME, WEIGHTS_NAME


def compress_some(model):
    """Replace q_proj and gate_proj of block 0 with PIFA, v_proj and down_proj of block 1 with low-rank."""
    layers = model.model.layers
    attn0, mlp0, attn1, mlp1 = layers[0].self_attn, layers[0].mlp, layers[1].self_attn, layers[1].mlp
    attn0.q_proj = PivotLinear.from_linear(attn0.q_proj, 8)
    mlp0.gate_proj = PivotLinear.from_linear(mlp0.gate_proj, 12)
    attn1.v_proj = LowRankLinear.from_linear(attn1.v_proj, 4)
    mlp1.down_proj = LowRankLinear.from_linear(mlp1.down_proj, 10)
    return model


def test_round_trip_is_exact(arch, input_ids, tmp_path):
    model = compress_some(tiny_model(arch))
    with torch.no_grad():
        expected = model(input_ids).logits
    save_compressed(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", "pifa_config.json"]
    loaded = load_compressed(tmp_path / "out")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, PivotLinear)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_qwen2_biases_survive(input_ids, tmp_path):
    model = tiny_model("qwen2")
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.bias.normal_()
    attn.k_proj = PivotLinear.from_linear(attn.k_proj, 4)
    save_compressed(model, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert spec["modules"]["model.layers.0.self_attn.k_proj"] == {
        "kind": "pivot", "in_features": 32, "out_features": 16, "rank": 4, "bias": True}
    loaded = load_compressed(tmp_path / "m")
    assert torch.equal(loaded.model.layers[0].self_attn.k_proj.bias, attn.k_proj.bias)


def test_load_with_dtype(input_ids, tmp_path):
    model = compress_some(tiny_model("llama"))
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.model.layers[0].self_attn.q_proj.pivot_weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.pivot_index.dtype == torch.int64
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids).logits).all()


@pytest.fixture
def saved(tmp_path):
    save_compressed(compress_some(tiny_model("llama")), tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("missing", ["config.json", WEIGHTS_NAME, CONFIG_NAME])
def test_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(ValueError, match=f"missing {missing}"):
        load_compressed(saved)


def test_unknown_format_version(saved):
    spec = json.loads((saved / CONFIG_NAME).read_text())
    spec["format_version"] = 99
    (saved / CONFIG_NAME).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="format_version 99"):
        load_compressed(saved)


def test_tensor_shape_disagrees_with_config(saved):
    spec = json.loads((saved / CONFIG_NAME).read_text())
    spec["modules"]["model.layers.0.self_attn.q_proj"]["rank"] = 9
    (saved / CONFIG_NAME).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"q_proj.pivot_weight' has shape \(8, 32\).*implies \(9, 32\)"):
        load_compressed(saved)


def test_corrupt_weights(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="safetensors"):
        load_compressed(saved)


def test_invalid_pivot_index(saved):
    tensors = load_file(saved / WEIGHTS_NAME)
    tensors["model.layers.0.self_attn.q_proj.pivot_index"][:] = 0
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="repeated"):
        load_compressed(saved)


def test_existing_directory_is_not_overwritten(saved):
    before = (saved / WEIGHTS_NAME).read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        save_compressed(tiny_model("llama"), saved)
    assert (saved / WEIGHTS_NAME).read_bytes() == before
    save_compressed(tiny_model("llama"), saved, overwrite=True)
    assert json.loads((saved / CONFIG_NAME).read_text())["modules"] == {}


def test_failed_save_leaves_nothing(tmp_path):
    class Boom:
        def save_pretrained(self, _):
            raise RuntimeError("tokenizer failed")
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        save_compressed(tiny_model("llama"), tmp_path / "x", tokenizer=Boom())
    assert list(tmp_path.iterdir()) == []


def test_save_compressed_failure_leaves_no_partial_and_no_parents(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ValueError, match=r"^could not write .*No space left on device") as info:
        save_compressed(tiny_model("llama"), tmp_path / "x" / "y" / "m")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_save_compressed_into_an_existing_empty_folder(tmp_path, input_ids):
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj = PivotLinear.from_linear(model.model.layers[0].mlp.up_proj, 8)
    (tmp_path / "empty").mkdir()
    save_compressed(model, tmp_path / "empty")  # like save_pretrained: no overwrite needed
    assert torch.equal(model_output(load_compressed(tmp_path / "empty"), input_ids), model_output(model, input_ids))
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        save_compressed(model, folder)
        assert (Path(folder) / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # the temporary folder cleaned itself up
    with pytest.raises(ValueError, match=r"already exists and is not empty \(pass overwrite=True to replace it\)"):
        save_compressed(model, tmp_path / "empty")
    save_compressed(model, tmp_path / "empty", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no .old, no .partial


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
