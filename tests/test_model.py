"""pifa.model: finding blocks and linears, module surgery.

The architecture matrix (benchmarks/arch_matrix.py) on a few architectures, and the model.py rules it needed:
a linear subclass counts only if it computes x W^T + b; no KV cache in a multimodal model's text config either."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from helpers import bare_linear_blocks
from pifa import CompressionConfig, compress
from pifa.model import inference_state, is_linear


def test_a_list_of_bare_linears_is_no_block_list_and_gets_no_junk_submodule():
    model = bare_linear_blocks()
    names = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match="no block list found"):
        compress(model, CompressionConfig(method="svd"), torch.randint(0, 16, (4, 8)), progress=False)
    assert [name for name, _ in model.named_modules()] == names  # no submodule named '' attached
    from pifa.model import set_module, target_linears

    assert target_linears(model.layers[0], "layers.0", (), ()) == {}
    with pytest.raises(ValueError, match="cannot replace Linear itself"):
        set_module(model.layers[0], "", torch.nn.Identity())


# --- The architecture matrix (benchmarks/arch_matrix.py) on a few architectures, and the model.py rules it needed:

ROOT = Path(__file__).resolve().parent.parent


def _load_matrix():
    spec = importlib.util.spec_from_file_location("arch_matrix", ROOT / "benchmarks" / "arch_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("arch_matrix", module)
    spec.loader.exec_module(module)
    return module


matrix = _load_matrix()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2", "gpt2", "gemma3"])
def test_walker_compresses_common_architectures_with_the_guard_passing(arch):
    record = matrix.check_architecture(arch)
    assert record["status"] == "supported", record
    assert record["replay_difference"] is not None and record["replay_difference"] <= 1e-6
    assert record["compressed_linears"] > 0 and record["reason"].startswith(f"{record['compressed_linears']} linears")
    if arch != "gemma3":  # gemma3's vision tower is in the total and not compressed
        assert record["coverage"] == 1.0


def test_tiny_configs_keep_mixed_layers_and_slide_within_the_calibration():
    config = matrix.tiny_config("gemma3_text")
    assert config.num_hidden_layers == matrix.LAYERS and config.hidden_size == matrix.HIDDEN
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert config.sliding_window < matrix.SEQ_LEN
    # per-layer lists, index lists and per-layer dicts follow the layers kept
    values = {"num_hidden_layers": 10, "layer_types": ["a"] * 7 + ["b"] * 3, "index_layers": [8],
              "per_layer_config": {"08": {"num_attention_heads": 64}}}
    small = matrix.shrink(values)
    assert matrix.choose_layers(values, 10) == [0, 1, 7, 8]  # the first of each kind, then the first layers
    assert small["num_hidden_layers"] == 4 and small["layer_types"] == ["a", "a", "b", "b"]
    assert small["index_layers"] == [3] and small["per_layer_config"] == {"03": {"num_attention_heads": 4}}


def _drifting_llama() -> nn.Module:
    """A tiny Llama whose blocks add a call counter to their output: state outside the blocks' inputs, so the
    engine's replay cannot equal the model's own forward."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    calls = [0]

    def drift(_module, _args, output):
        calls[0] += 1
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + 0.01 * calls[0]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for layer in model.model.layers:
        layer.register_forward_hook(drift)
    return model


def test_walker_reports_a_broken_architecture_as_refused():
    record = matrix.check_architecture("drifting-llama", build=_drifting_llama)
    assert record["status"] == "refused"
    assert "cannot reproduce this model's own forward pass" in record["reason"]
    assert record["replay_difference"] is None


def test_walker_isolates_a_hanging_architecture(monkeypatch):
    monkeypatch.setattr(matrix, "check_architecture", lambda _name: time.sleep(60))
    record = matrix.run_isolated("hangs", timeout=1.0)  # the 60 s sleep is cut at 1 s: "timed out"
    assert record["status"] == "failed" and "timed out" in record["reason"]


def test_tables_count_every_status():
    records = [{"architecture": "a", "status": "supported", "reason": "x", "replay_difference": 0.0, "seconds": 1.0,
                "coverage": 1.0},
               {"architecture": "b", "status": "refused", "reason": "why | not", "replay_difference": None,
                "seconds": 2.0}]
    assert matrix.summary(records) == "2 architectures: 1 supported, 1 refused, 0 skipped, 0 failed"
    meta = {"transformers": "t", "torch": "t", "pifa": "p", "seconds": 3.0}
    markdown = matrix.markdown(records, meta)
    assert matrix.COMMAND in markdown and "| b | refused |  |  | why \\| not |" in markdown
    rows = matrix.text_table(records).splitlines()
    assert rows[0].split() == ["architecture", "status", "replay_diff", "coverage", "seconds", "reason"]
    assert rows[2].split() == ["a", "supported", "0", "100", "%", "1.0", "x"]


class _Router(nn.Linear):
    """Returns (scores, logits), as Llama 4's router does."""

    def forward(self, x):
        logits = super().forward(x)
        return torch.sigmoid(logits), logits


class _PlainSubclass(nn.Linear):
    """x W^T + b written out, as Falcon's FalconLinear does."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _Grouped(nn.Linear):
    """Applies its weight per group of outputs and inputs (block-diagonal), as DeepSeek-V4's grouped linear does."""

    def forward(self, x):
        w = self.weight.view(2, 4, 8)[:, :, :4]
        return torch.einsum("...gi,goi->...go", x.view(*x.shape[:-1], 2, 4), w).flatten(-2)


def test_a_linear_subclass_counts_only_when_it_computes_a_linear():
    assert is_linear(nn.Linear(8, 4)) and is_linear(_PlainSubclass(8, 4))
    assert not is_linear(_Router(8, 4)) and not is_linear(_Grouped(8, 8))
    assert is_linear(transformers.pytorch_utils.Conv1D(4, 8))
    with torch.device("meta"):
        assert is_linear(_Router(8, 4))  # not materialized: taken at its class's word


def test_inference_state_turns_off_the_cache_in_sub_configs():
    model = matrix.build_model("gemma3", matrix.tiny_config("gemma3"))
    text = model.config.get_text_config()
    assert model.config.text_config is text and text.use_cache
    with inference_state(model):
        assert not text.use_cache
    assert text.use_cache


@pytest.mark.parametrize("arch", ["bamba", "zaya", "rwkv"])
def test_block_loops_that_unpack_several_outputs_are_captured_by_running_the_blocks(arch):
    """These models' loops unpack (hidden, extra...) from each block: the stand-ins cannot satisfy them, so the
    capture runs the real blocks once under pre-hooks; the guard confirms the replay."""
    record = matrix.check_architecture(arch)
    assert record["status"] == "supported", record
    assert record["replay_difference"] is not None and record["replay_difference"] <= 1e-6


@pytest.mark.parametrize("arch", ["deepseek_v32", "glm_moe_dsa"])
def test_the_sparse_attention_indexer_is_left_dense_by_default(arch):
    record = matrix.check_architecture(arch)
    assert record["status"] == "supported", record
    assert "indexer" in record["reason"]


def test_a_block_that_cannot_be_replayed_is_refused_in_one_line():
    record = matrix.check_architecture("reformer")
    assert record["status"] == "refused", record
    assert record["reason"].startswith("cannot replay transformer block 0") and "\n" not in record["reason"]
