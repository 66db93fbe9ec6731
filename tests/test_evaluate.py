"""pifa.evaluate: perplexity and encoder fidelity on tiny random models (offline)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from helpers import tiny_model
from pifa.evaluate import (
    encoder_fidelity,
    mean_pooled_embeddings,
    perplexity,
    perplexity_of_text,
    spread_windows,
)

VOCAB = 128


def _stream(length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def test_uniform_logits_give_vocab_size() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert model.lm_head.bias is None
    ppl = perplexity(model, _stream(100), seq_len=16, batch_size=3)
    assert ppl == pytest.approx(VOCAB, rel=1e-5)


@pytest.mark.parametrize("shape", ["flat", "row"])
def test_matches_transformers_loss(shape: str) -> None:
    model = tiny_model("llama")
    ids = _stream(16 * 5 + 7)  # 5 full windows and a dropped tail of 7 tokens
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in ids[:80].view(5, 16)]
    expected = math.exp(float(torch.stack(losses).mean()))  # every window predicts 15 tokens
    given = ids if shape == "flat" else ids[None]
    assert perplexity(model, given, seq_len=16, batch_size=2) == pytest.approx(expected, rel=1e-4)


def test_batch_size_does_not_change_result() -> None:
    model = tiny_model("llama-tied")
    ids = _stream(64)
    assert perplexity(model, ids, 16, batch_size=1) == pytest.approx(perplexity(model, ids, 16, batch_size=4), rel=1e-6)


def test_restores_training_flag() -> None:
    model = tiny_model("llama").train()
    perplexity(model, _stream(32), 16)
    assert model.training


@pytest.mark.parametrize("seq_len", [101, 1000, 1, 0, -4])
def test_bad_seq_len_raises(seq_len: int) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(tiny_model("llama"), _stream(100), seq_len=seq_len)


def test_bad_input_shape_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        perplexity(tiny_model("llama"), _stream(64).view(2, 32), seq_len=16)


def test_non_finite_logits_name_the_window() -> None:
    model = tiny_model("llama")
    poison = 5
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    ids = _stream(64) % 100 + 10  # token ids 10..109: no poison
    ids[2 * 16 + 7] = poison  # only window 2 sees it
    with pytest.raises(ValueError, match="window 2"):
        perplexity(model, ids, seq_len=16, batch_size=2)


@pytest.fixture(scope="module")
def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One id per character of a small alphabet; BOS defined but never added."""
    alphabet = "abcdefghijklmnopqrstuvwxyz .,\n"
    vocab = {"[UNK]": 0, "[BOS]": 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="[BOS]",
                                                pad_token="[UNK]")


def test_perplexity_of_text_records_protocol(char_tokenizer) -> None:
    model = tiny_model("llama")
    text = "the quick brown fox jumps over the lazy dog.\n\n" * 3  # 138 characters
    result = perplexity_of_text(model, char_tokenizer, text, seq_len=32, batch_size=2)
    ids = torch.tensor([char_tokenizer.convert_tokens_to_ids(ch) for ch in text])
    assert result["stream_tokens"] == len(text) == 138
    assert (result["windows"], result["tokens"], result["predicted_tokens"]) == (4, 128, 124)
    assert result["seq_len"] == 32 and result["dtype"] == "float32" and result["bos_handling"] == "none"
    assert result["ppl"] == pytest.approx(perplexity(model, ids, 32), rel=1e-9)


def _tiny_bert() -> transformers.BertModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


SENTENCES = ["the cat sat.", "a dog ran far away.", "birds fly south", "the cat sat on the mat.",
             "quick brown fox", "lazy dogs sleep all day long, zzz.", "x", "hello world"]


def test_mean_pooling_matches_manual_and_is_unit(char_tokenizer) -> None:
    model = _tiny_bert()
    emb = mean_pooled_embeddings(model, char_tokenizer, SENTENCES, batch_size=3, max_length=10)
    assert emb.shape == (len(SENTENCES), 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    enc = char_tokenizer(SENTENCES[5], truncation=True, max_length=10, return_tensors="pt")
    with torch.no_grad():
        alone = model(**enc).last_hidden_state[0].mean(0)  # no padding: plain mean of 10 tokens
    assert torch.allclose(emb[5], alone / alone.norm(), atol=1e-5)


def test_fidelity_of_model_against_itself(char_tokenizer) -> None:
    model = _tiny_bert()
    emb = mean_pooled_embeddings(model, char_tokenizer, SENTENCES, batch_size=4)
    again = mean_pooled_embeddings(model, char_tokenizer, SENTENCES, batch_size=5)
    result = encoder_fidelity(emb, again)
    assert result["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["top1_agreement"] == 1.0


def test_fidelity_detects_changes() -> None:
    dense = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1]])  # neighbours: 0-1, 2-3
    comp = dense.clone()
    comp[3] = torch.tensor([0.95, 0, 0.05])  # row 3 moves next to row 0
    result = encoder_fidelity(dense, comp)
    moved = float(torch.nn.functional.cosine_similarity(dense[3], comp[3], dim=0))
    assert result["cosine"] == pytest.approx((3 + moved) / 4)
    assert result["top1_agreement"] == 0.25  # only row 1 keeps its neighbour (row 0)
    with pytest.raises(ValueError):
        encoder_fidelity(dense, dense[:3])
    with pytest.raises(ValueError):
        encoder_fidelity(dense[:1], dense[:1])


def test_max_windows_evaluates_evenly_spaced_windows(char_tokenizer) -> None:
    model = tiny_model("llama")
    text = "the quick brown fox jumps over the lazy dog.\n\n" * 3  # 138 characters: 4 windows of 32
    ids = torch.tensor([char_tokenizer.convert_tokens_to_ids(ch) for ch in text])
    result = perplexity_of_text(model, char_tokenizer, text, seq_len=32, max_windows=2)
    assert (result["windows"], result["stream_tokens"], result["max_windows"]) == (2, 138, 2)
    chosen = torch.cat([ids[0:32], ids[64:96]])  # windows 0 and 2 of 4
    assert result["ppl"] == pytest.approx(perplexity(model, chosen, 32), rel=1e-9)
    assert torch.equal(spread_windows(ids, 32, 10), ids[:128])  # more than there are: all of them
    with pytest.raises(ValueError, match="max_windows"):
        perplexity_of_text(model, char_tokenizer, text, seq_len=32, max_windows=0)
