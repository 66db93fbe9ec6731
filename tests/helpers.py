"""Test helpers: tiny randomly initialised Hugging Face models built offline from configs, a character
tokenizer, and dense model folders for the CLI tests. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


def char_tokenizer(model_max_length: int = 16) -> transformers.PreTrainedTokenizerFast:
    """A character-level WordLevel tokenizer, one id per character, built offline."""
    vocab = {"[UNK]": 0, **{ch: i + 1 for i, ch in enumerate(ALPHABET)}, "[EOS]": len(ALPHABET) + 1}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[UNK]", eos_token="[EOS]", model_max_length=model_max_length)


COMMON = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama-tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
}

# The pipeline's model matrix: the four above plus other layouts (Conv1D, fused qkv, encoders).
MATRIX_CONFIGS = {
    **TINY_CONFIGS,
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=8),
    # blocks with their own inputs: a sliding-window layer (window shorter than the calibration) and a
    # full-attention layer, each with its own rotary embeddings
    "gemma3-mixed": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=4,
                                                          layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: transformers.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "bert": lambda: transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64),
}


def tiny_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny model of architecture ``name`` with random weights (eval mode); BERT is an encoder."""
    torch.manual_seed(seed)
    config = MATRIX_CONFIGS[name]()
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(config).eval()


def model_output(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder."""
    with torch.no_grad():
        out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CALIB_TEXT = "the quick brown fox jumps over the lazy dog, again and again.\n\n" * 40


def make_dense_dir(root, name: str = "llama"):
    """A tiny dense model directory (safetensors + tokenizer) and a calib.txt beside it."""
    model = tiny_model(name)
    model.save_pretrained(root / "dense")
    char_tokenizer(64).save_pretrained(root / "dense")
    (root / "calib.txt").write_text(CALIB_TEXT)
    return root / "dense"


def compress_argv(dense_dir, out, *extra):
    """`pifa compress` arguments for a directory made by ``make_dense_dir``."""
    calib = dense_dir.parent / "calib.txt"
    return ["compress", str(dense_dir), str(out), "--calib", str(calib), "--samples", "4", "--seq-len", "16",
            "--device", "cpu", *extra]


class _BareLinearBlocks(torch.nn.Module):
    """An embedding and a ModuleList of bare nn.Linear "blocks": no transformer block list at all."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def bare_linear_blocks() -> torch.nn.Module:
    return _BareLinearBlocks()


SRC = str(Path(__file__).parents[1] / "src")


def pifa_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m pifa`` subprocess: this checkout's sources first, no crash point."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
            "PIFA_CRASH_AT": "", **extra}


def run_pifa(*args: str, crash_at: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pifa ARGS`` in a subprocess (``crash_at``: a named crash point, see pifa.faults)."""
    return subprocess.run([sys.executable, "-m", "pifa", *args], capture_output=True, text=True, timeout=timeout,
                          env=pifa_env(PIFA_CRASH_AT=crash_at or ""))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (folders as empty entries)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"") for p in sorted(root.rglob("*"))}


def tree(root: Path) -> list[str]:
    """Every path under ``root``, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def factor_layout_ok(layer: torch.nn.Module) -> bool:
    """Whether a compressed layer's factors are stored as ``pifa.layers.column_major`` says: tall ones
    column-major, the others row-major."""
    return all(tensor_layout_ok(param) for name, param in layer.named_parameters() if name != "bias")


def tensor_layout_ok(tensor: torch.Tensor) -> bool:
    return tensor.t().is_contiguous() if tensor.shape[0] > tensor.shape[1] else tensor.is_contiguous()
