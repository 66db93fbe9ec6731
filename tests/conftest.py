"""Tiny randomly initialised Hugging Face models, built offline from configs."""

from __future__ import annotations

import pytest
import torch
import transformers

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


def tiny_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny causal LM of architecture ``name`` with random weights (eval mode)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[name]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
