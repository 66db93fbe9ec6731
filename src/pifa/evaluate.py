"""Quality evaluation of dense and compressed models (ALGORITHMS.md section 8).

* Causal LMs: perplexity over non-overlapping windows of a tokenized text stream.
* Encoders: fidelity of mean-pooled sentence embeddings to the dense model's (mean
  cosine of matching rows and top-1 nearest-neighbour agreement).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import text_token_ids
from .model import eval_mode, module_device
from .validate import check_positive_int

logger = logging.getLogger(__name__)

BOS_HANDLING = "none"




def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (else ``config.vocab_size``); ``None`` when unknown."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def check_token_ids(model: nn.Module, ids: torch.Tensor, what: str = "token ids") -> None:
    """One-line ``ValueError`` for ids the model's embedding cannot look up (negative, or at or beyond its rows).

    A tokenizer that does not belong to the model gives such ids; the embedding would fail with an
    IndexError deep inside the forward (or read out of bounds on some devices).
    """
    if ids.numel() == 0:
        return
    vocab = vocabulary_size(model)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"{what} span [{low}, {high}], outside the model's vocabulary of {vocab} "
                         "(is the tokenizer the model's own?)")


def _windows(input_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The token stream ``[L]`` or ``[1, L]`` cut into ``[L // seq_len, seq_len]`` (tail dropped)."""
    check_positive_int(seq_len, "seq_len", minimum=2)  # one predicted token per window at least
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must have shape [L] or [1, L], got {list(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    count = input_ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"seq_len {seq_len} is longer than the token stream of {input_ids.numel()} tokens")
    return input_ids[: count * seq_len].reshape(count, seq_len).long()


def _window_nll(model: nn.Module, batch: torch.Tensor, first: int) -> float:
    """Summed NLL (float64) of the ``B * (T - 1)`` predicted tokens of ``batch`` ``[B, T]``.

    ``first`` is the index of the batch's first window, used in the error message when a
    window's logits are not finite.
    """
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    finite = torch.isfinite(logits).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = first + int((~finite).nonzero()[0, 0])
        raise ValueError(f"non-finite logits in perplexity window {bad}")
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll)


def perplexity(model: nn.Module, input_ids: torch.Tensor, seq_len: int, batch_size: int = 4) -> float:
    """Perplexity of a causal LM on a token stream.

    ``input_ids`` is a LongTensor ``[L]`` or ``[1, L]``. It is cut into ``W = L // seq_len``
    non-overlapping windows of ``seq_len`` tokens (the incomplete tail is dropped), run in
    batches of ``batch_size`` windows ``[B, seq_len]`` under ``torch.no_grad``; every
    window predicts its ``seq_len - 1`` next tokens. Returns exp of the token-weighted mean
    NLL over all ``W * (seq_len - 1)`` predicted tokens.

    Raises ``ValueError`` for a ``seq_len`` longer than the stream (or < 2), and for
    non-finite logits, naming the first offending window index.
    """
    check_positive_int(batch_size, "batch_size")
    windows = _windows(input_ids, seq_len)
    check_token_ids(model, windows)
    windows = windows.to(module_device(model))
    total = 0.0
    with torch.no_grad(), eval_mode(model):
        for first in range(0, windows.shape[0], batch_size):
            total += _window_nll(model, windows[first: first + batch_size], first)
    predicted = windows.shape[0] * (seq_len - 1)
    logger.info("perplexity over %d windows of %d tokens", windows.shape[0], seq_len)
    return math.exp(total / predicted)


def spread_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """At most ``max_windows`` whole windows of ``ids`` ``[L]``, evenly spaced, re-joined: ``[W * seq_len]``.

    Window ``i`` of the result is window ``(i * total) // max_windows`` of the stream's
    ``total = L // seq_len`` windows, so a budget cut still samples the whole text (the
    start of a text is often unrepresentative). ``None`` (or ``max_windows >= total``)
    keeps every window.
    """
    windows = _windows(ids, seq_len)
    if max_windows is not None:
        check_positive_int(max_windows, "max_windows")
        total = windows.shape[0]
        if max_windows < total:
            windows = windows[torch.arange(max_windows) * total // max_windows]
    return windows.reshape(-1)


def perplexity_of_ids(model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 4,
                      max_windows: int | None = None) -> dict[str, Any]:
    """Perplexity of a token stream ``ids`` ``[L]`` with the protocol fields next to it.

    With ``max_windows``, only that many evenly spaced windows are evaluated (a budget cut,
    see :func:`spread_windows`, recorded as ``max_windows``). Returns ``ppl``, ``seq_len``,
    ``windows``, ``tokens`` (tokens inside the evaluated windows), ``predicted_tokens``
    (``windows * (seq_len - 1)``), ``stream_tokens`` (the whole stream), ``max_windows``,
    ``dtype``, ``bos_handling`` and ``model`` (its ``name_or_path``).
    """
    ids = ids.reshape(-1)
    ids_used = spread_windows(ids, seq_len, max_windows)
    ppl = perplexity(model, ids_used, seq_len, batch_size)
    windows = ids_used.numel() // seq_len
    param = next(model.parameters())
    return {
        "ppl": ppl,
        "seq_len": seq_len,
        "windows": windows,
        "tokens": windows * seq_len,
        "predicted_tokens": windows * (seq_len - 1),
        "stream_tokens": ids.numel(),
        "max_windows": max_windows,
        "dtype": str(param.dtype).removeprefix("torch."),
        "bos_handling": BOS_HANDLING,
        "model": getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__),
    }


def perplexity_of_text(model: nn.Module, tokenizer: Any, text: str, seq_len: int,
                       batch_size: int = 4, max_windows: int | None = None) -> dict[str, Any]:
    """Perplexity of ``text`` with every protocol field recorded next to it.

    The text is tokenized once as given (documents already joined by the caller), with no
    special tokens: no BOS is prepended to the stream or to the windows
    (``bos_handling="none"``). Returns the fields of :func:`perplexity_of_ids` plus
    ``tokenizer`` (its ``name_or_path``).
    """
    result = perplexity_of_ids(model, text_token_ids(tokenizer, text), seq_len, batch_size, max_windows)
    result["tokenizer"] = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    return result


def mean_pooled_embeddings(model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 32,
                           max_length: int = 128) -> torch.Tensor:
    """L2-normalised, attention-mask-weighted mean of ``last_hidden_state``: float32 ``[N, d]``.

    Sentences are tokenized with the tokenizer's special tokens, padded per batch and
    truncated to ``max_length`` tokens, as sentence-transformers does for
    all-MiniLM-L6-v2. Rows follow the order of ``sentences``.
    """
    if not sentences:
        raise ValueError("sentences must be a non-empty list of strings")
    check_positive_int(batch_size, "batch_size")
    device = module_device(model)
    rows = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[start: start + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            check_token_ids(model, enc["input_ids"])
            enc = enc.to(device)
            hidden = model(**enc).last_hidden_state.float()  # [B, T, d]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(F.normalize(pooled, p=2, dim=1).cpu())
    return torch.cat(rows)


def _nearest_others(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar OTHER row of ``emb`` ``[N, d]``: LongTensor ``[N]``."""
    unit = F.normalize(emb.double(), p=2, dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-math.inf)
    return sims.argmax(dim=1)


def encoder_fidelity(dense_emb: torch.Tensor, comp_emb: torch.Tensor) -> dict[str, float]:
    """How closely compressed embeddings ``[N, d]`` follow the dense ones ``[N, d]``.

    ``cosine``: mean cosine similarity of matching rows. ``top1_agreement``: the fraction of
    sentences whose nearest neighbour among the other N - 1 sentences (by cosine) is the
    same under both models. Needs N >= 2.
    """
    if dense_emb.dim() != 2 or dense_emb.shape != comp_emb.shape:
        raise ValueError(f"embeddings must both be [N, d]; got {list(dense_emb.shape)} and {list(comp_emb.shape)}")
    if dense_emb.shape[0] < 2:
        raise ValueError("encoder fidelity needs at least 2 sentences")
    cosine = F.cosine_similarity(dense_emb.double(), comp_emb.double(), dim=1).mean()
    agree = (_nearest_others(dense_emb) == _nearest_others(comp_emb)).double().mean()
    return {"cosine": float(cosine), "top1_agreement": float(agree)}
