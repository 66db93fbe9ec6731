"""GGUF model input: a tiny Llama written as GGUF by the test itself, read back through transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from pifa.app.gguf import find_gguf, gguf_architecture, load_gguf  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
# byte-level BPE vocabulary: the specials, every printable ASCII byte, space (Ġ) and newline (Ċ), the merges
TOKENS = SPECIALS + [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"] + ["Ġt", "he", "Ġthe", "in"]
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
CONFIG = dict(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
              max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
IDS = torch.tensor([[1, 40, 41, 42, 99, 43, 100, 44, 2, 10, 11, 12]])
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def reference_model(tied: bool) -> transformers.LlamaForCausalLM:
    """A tiny random Llama, norms randomised too so that every tensor matters."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves -> interleaved pairs)."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: transformers.LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, q/k permuted as llama.cpp writes them."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not model.config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(model.config.num_hidden_layers):
        for short, long in LAYER_NAMES.items():
            weight = state[f"model.layers.{i}.{long}.weight"]
            if short in ("attn_q", "attn_k"):
                weight = llama_cpp_permute(weight, HEADS if short == "attn_q" else KV_HEADS)
            tensors[f"blk.{i}.{short}.weight"] = weight
    return tensors


def write_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", dtype=np.float32) -> Path:
    """A GGUF file as llama.cpp would write it: hyper-parameters, byte-level BPE tokenizer, chat template."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(CONFIG["max_position_embeddings"])
    writer.add_embedding_length(CONFIG["hidden_size"])
    writer.add_block_count(CONFIG["num_hidden_layers"])
    writer.add_feed_forward_length(CONFIG["intermediate_size"])
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(CONFIG["rope_theta"])
    writer.add_layer_norm_rms_eps(CONFIG["rms_norm_eps"])
    writer.add_vocab_size(len(TOKENS))
    writer.add_file_type(0 if dtype == np.float32 else 1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32 if tensor.ndim == 1 else dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """(reference model, folder holding its GGUF, that GGUF loaded by load_gguf)."""
    reference = reference_model(tied=False)
    folder = tmp_path_factory.mktemp("untied")
    write_gguf(folder / "tiny.gguf", gguf_tensors(reference))
    return reference, folder, load_gguf(folder / "tiny.gguf", "auto", "cpu")


def test_gguf_loads_with_the_reference_logits(untied):
    reference, _, (model, _) = untied
    assert type(model) is transformers.LlamaForCausalLM
    assert not model.training and model.dtype == torch.float32
    assert not [m for m in model.modules() if "Gguf" in type(m).__name__]  # dense, nothing left packed
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_reference_check_sees_the_llama_cpp_qk_layout(untied, tmp_path):
    """Written without llama.cpp's q/k permutation the logits differ: the check above is not vacuous."""
    reference, _, _ = untied
    tensors, state = gguf_tensors(reference), reference.state_dict()
    for i in range(CONFIG["num_hidden_layers"]):
        for short in ("attn_q", "attn_k"):
            tensors[f"blk.{i}.{short}.weight"] = state[f"model.layers.{i}.{LAYER_NAMES[short]}.weight"].numpy()
    model, _ = load_gguf(write_gguf(tmp_path / "hf-layout.gguf", tensors))
    assert not torch.allclose(logits(model), logits(reference), rtol=1e-3, atol=1e-3)


def test_tied_f16_gguf_from_its_folder(tmp_path):
    reference = reference_model(tied=True)
    write_gguf(tmp_path / "tiny-f16.gguf", gguf_tensors(reference), dtype=np.float16)
    (tmp_path / "README.md").write_text("not a model file\n")
    model, _ = load_gguf(tmp_path, torch.bfloat16, "cpu")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(model).float(), logits(reference), rtol=0.05, atol=0.05)


def test_tokenizer_keeps_vocabulary_specials_and_chat_template(untied):
    _, _, (_, tokenizer) = untied
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    ids = tokenizer(" the cat", add_special_tokens=True)["input_ids"]  # merges applied, no BOS (add_bos_token off)
    assert [TOKENS[i] for i in ids] == ["Ġthe", "Ġ", "c", "a", "t"]
    assert tokenizer.decode(tokenizer("in the hat\nok")["input_ids"]) == "in the hat\nok"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    encoded = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert encoded[0] == 1 and encoded.count(2) == 1  # the specials stay whole


def test_saved_model_is_an_ordinary_folder_without_gguf_trace(untied, tmp_path):
    reference, _, (model, tokenizer) = untied
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    config = model.config.to_dict()
    assert config.pop("_name_or_path").endswith("tiny.gguf")  # names the input; save_pretrained never writes it
    assert "gguf" not in json.dumps(config).lower()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.gguf"))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if (tmp_path / name).is_file():
            text = (tmp_path / name).read_text()
            assert "gguf" not in text.lower() and "quantization_config" not in text, name
    assert "_model_name_or_path" not in json.loads((tmp_path / "config.json").read_text())
    assert find_gguf(tmp_path) is None
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded), logits(reference), rtol=1e-5, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == CHAT_TEMPLATE


def test_find_gguf(untied, tmp_path):
    _, folder, _ = untied
    assert find_gguf(folder / "tiny.gguf") == (folder, "tiny.gguf")
    assert find_gguf(str(folder)) == (folder, "tiny.gguf")
    assert find_gguf(tmp_path) is None  # empty folder
    assert find_gguf(tmp_path / "missing.gguf") is None
    (tmp_path / "notes.txt").write_text("x")
    assert find_gguf(tmp_path / "notes.txt") is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "extra.gguf").write_bytes(b"")
    assert find_gguf(tmp_path) is None  # an ordinary model folder, whatever else it holds
    assert gguf_architecture(folder / "tiny.gguf") == "llama"


def test_folder_with_two_gguf_files_is_one_line_error(untied, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes((untied[1] / "tiny.gguf").read_bytes())
    for call in (find_gguf, load_gguf):
        with pytest.raises(ValueError, match=r"2 GGUF files \(a\.gguf, b\.gguf\)") as info:
            call(tmp_path)
        assert "\n" not in str(info.value)


def test_unsupported_architecture_is_one_line_error(untied, tmp_path):
    reference, _, _ = untied
    write_gguf(tmp_path / "odd.gguf", gguf_tensors(reference), arch="fancyarch")
    with pytest.raises(ValueError, match="cannot read GGUF architecture 'fancyarch'") as info:
        load_gguf(tmp_path / "odd.gguf")
    assert "\n" not in str(info.value)


def test_gguf_lacking_weights_is_one_line_error(untied, tmp_path):
    """A qwen2 GGUF without the q/k/v biases qwen2 needs: refused, never completed with random weights."""
    write_gguf(tmp_path / "nobias.gguf", gguf_tensors(untied[0]), arch="qwen2")
    with pytest.raises(ValueError, match=r"lacks weights the model needs: .*q_proj\.bias") as info:
        load_gguf(tmp_path / "nobias.gguf")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all", b"GGUF\x03\x00\x00\x00\x01"])
def test_corrupt_file_is_one_line_error(tmp_path, content):
    (tmp_path / "bad.gguf").write_bytes(content)
    with pytest.raises(ValueError, match="bad.gguf") as info:
        load_gguf(tmp_path / "bad.gguf")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [3000, -4096], ids=["inside-tensor-table", "inside-tensor-data"])
def test_truncated_file_is_one_line_error(untied, tmp_path, keep):
    data = (untied[1] / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:keep])
    with pytest.raises(ValueError, match="cut.gguf") as info:
        load_gguf(tmp_path / "cut.gguf")
    assert "\n" not in str(info.value)


def test_not_gguf_input_is_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(tmp_path)


def test_missing_gguf_package_is_one_line_error(untied, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ValueError, match=r"^reading GGUF files needs the 'gguf' package: pip install gguf$"):
        load_gguf(untied[1])
