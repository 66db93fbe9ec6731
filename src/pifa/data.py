"""Deterministic calibration token batches for post-training compression.

Sources are local files (``.txt``, ``.jsonl``), folders of text/code files, or the Hugging Face
datasets ``"wikitext2"`` / ``"c4"`` (only with the optional ``datasets`` package and a network).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .validate import check_positive_int, check_seed

logger = logging.getLogger(__name__)

FOLDER_SUFFIXES = (".txt", ".py", ".md", ".jsonl")
# Far beyond any calibration set (papers use 128 x 2048 = 262k tokens); a guard against typos such as
# 1000000000 samples, which would otherwise die allocating the token windows.
MAX_CALIBRATION_TOKENS = 2**27
STDLIB_SOURCE = "python-stdlib"
HF_DATASETS = {
    "wikitext2": dict(path="wikitext", name="wikitext-2-raw-v1", split="train"),
    "c4": dict(path="allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz", split="train"),
}
# Evaluation splits (the calibration ones above are the training splits).
HF_EVAL_DATASETS = {
    "wikitext2": dict(path="wikitext", name="wikitext-2-raw-v1", split="test"),
    "c4": dict(path="allenai/c4", data_files="en/c4-validation.00000-of-00008.json.gz", split="train"),
}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _jsonl_texts(path: Path) -> list[str]:
    """One document per non-blank line of ``path``: the line's JSON ``"text"`` field."""
    texts = []
    for lineno, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from exc
        except RecursionError:
            raise ValueError(f"{path}: line {lineno} nests its JSON too deeply") from None
        except ValueError as exc:  # an integer beyond Python's 4300 digits
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({str(exc)[:100]})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}: line {lineno} has no string 'text' field")
        texts.append(text)
    return texts


def _file_texts(path: Path) -> list[str]:
    """A ``.jsonl`` file gives one document per line; any other file is one document."""
    return _jsonl_texts(path) if path.suffix == ".jsonl" else [_read(path)]


def _dataset_texts(name: str, evaluation: bool = False) -> list[str]:
    """The ``"text"`` column of the Hugging Face dataset registered as ``name``."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ValueError(
            f"calibration source {name!r} needs the 'datasets' package (pip install datasets) "
            "and network access; or pass a local .txt/.jsonl file or folder"
        ) from exc
    logger.info("loading calibration dataset %s via datasets", name)
    try:
        dataset = datasets.load_dataset(**(HF_EVAL_DATASETS if evaluation else HF_DATASETS)[name])
    except Exception as exc:  # offline, hub errors, ...
        raise ValueError(f"could not load calibration dataset {name!r}: {exc}") from exc
    return list(dataset["text"])


def load_texts(source: str | os.PathLike, evaluation: bool = False) -> list[str]:
    """Documents of a calibration ``source``, in a deterministic order.

    * a ``.jsonl`` file: one document per line (its ``"text"`` field; blank lines skipped);
    * any other file (e.g. ``.txt``): the whole file is one document, paragraphs included;
    * a folder: recursively every ``*.txt``, ``*.py``, ``*.md``, ``*.jsonl`` file in sorted
      path order, each one document (``.jsonl``: one per line);
    * ``"wikitext2"`` or ``"c4"`` (not an existing path): loaded with the ``datasets`` package;
    * ``"python-stdlib"``: the running Python's standard-library sources, without the files
      held out from pycode-llama's training (see ``stdlib_python_files``).

    With ``evaluation``, dataset names load their evaluation split (wikitext2: test, c4:
    validation) instead of the training split. Whitespace-only documents are dropped. Raises
    ``ValueError`` for an unknown source, a bad ``.jsonl`` line (naming its number), or when no
    text is left.
    """
    path = Path(source)
    if path.is_file():
        texts = _file_texts(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FOLDER_SUFFIXES and p.is_file())
        texts = [text for file in files for text in _file_texts(file)]
        logger.info("read %d calibration files under %s", len(files), path)
    elif str(source) == STDLIB_SOURCE:
        texts = [_read(file) for file in stdlib_python_files(exclude_heldout=True)]
    elif str(source) in HF_DATASETS:
        texts = _dataset_texts(str(source), evaluation)
    else:
        raise ValueError(
            f"calibration source {str(source)!r} is not a file, a folder or a known dataset name "
            f"({', '.join([*HF_DATASETS, STDLIB_SOURCE])})"
        )
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError(f"calibration source {str(source)!r} contains no text")
    return texts


CALIB_FORMATS = ("auto", "text", "chat")


def calibration_format(tokenizer: Any, requested: str = "auto") -> str:
    """The calibration format to use, ``"chat"`` or ``"text"``: ``requested``, or for ``"auto"`` chat when the
    tokenizer has a chat template and plain text otherwise.

    An instruction-tuned model calibrated on plain text never shows its role markers and special tokens to the
    statistics, and compressed may answer nothing at all (the first token ``<|im_end|>``, see the README); a
    tokenizer with a chat template is the sign of such a model.
    """
    if requested not in CALIB_FORMATS:
        raise ValueError(f"calibration format {requested!r} is not one of {', '.join(CALIB_FORMATS)}")
    if requested != "auto":
        return requested
    return "chat" if has_chat_template(tokenizer) else "text"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template (a non-empty string, or a non-empty table of named ones)."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and isinstance(template, (str, dict))


CHAT_PROMPTS = ("Tell me about this topic.", "Write a paragraph about it.", "What do you know about this?",
                "Explain this in detail.")


def chat_documents(tokenizer: Any, texts: Sequence[str], prompts: Sequence[str] = CHAT_PROMPTS,
                   min_chars: int = 200) -> list[str]:
    """Calibration documents in the model's chat format, for instruction-tuned models.

    Every paragraph (blank-line separated, at least ``min_chars`` characters) of ``texts``
    becomes the assistant's reply to one of ``prompts`` (in turn), rendered with the
    tokenizer's chat template, so the calibration activations include the role markers and
    special tokens the model sees when it chats. A text of short paragraphs only (lines, a list) is
    wrapped in replies of neighbouring paragraphs, each at least ``min_chars`` long. Raises ``ValueError``
    without a chat template, or when all of ``texts`` together are shorter than ``min_chars``.
    """
    if not has_chat_template(tokenizer):
        raise ValueError("the tokenizer has no chat template: chat-format calibration needs one")
    paragraphs = [p.strip() for text in texts for p in text.replace("\r\n", "\n").split("\n \n")
                  if len(p.strip()) >= min_chars]
    paragraphs = [q.strip() for p in paragraphs for q in p.split("\n\n") if len(q.strip()) >= min_chars]
    if not paragraphs:  # short paragraphs only: join neighbours
        paragraphs = _joined([q.strip() for text in texts for q in text.replace("\r\n", "\n").split("\n\n")
                              if q.strip()], min_chars)
    if not paragraphs:
        raise ValueError(f"the calibration text has fewer than {min_chars} characters to wrap in the chat template")
    return [render_chat(tokenizer, [{"role": "user", "content": prompts[i % len(prompts)]},
                                    {"role": "assistant", "content": p}])
            for i, p in enumerate(paragraphs)]


MAX_CHAT_TEMPLATE = 1 << 20  # characters of a chat template; the longest in use are tens of kB
CHAT_RENDER_MEMORY = 1 << 30  # bytes one rendering of a chat template may allocate
CHAT_RENDER_SECONDS = 30.0  # seconds one rendering may take (enforced in the main thread)
MAX_CHAT_TEXT = 1 << 24  # characters of one rendered conversation


class _RenderTimeout(Exception):
    pass


@contextlib.contextmanager
def _bounded_render() -> Iterator[None]:
    """Limit what rendering a chat template may cost: ``CHAT_RENDER_MEMORY`` more bytes of address space
    (``RLIMIT_AS``, Linux) and ``CHAT_RENDER_SECONDS`` of wall time (a timer, in the main thread only).
    Jinja's sandbox stops a template from reaching outside, not from building a 2 GB string
    (``'x' * 2000000000``) or looping for hours; with these limits such a template fails in the sandbox
    instead, as a ``MemoryError`` or ``_RenderTimeout``. Where a limit cannot be set it is not."""
    import signal
    import threading

    restore_limit = restore_timer = None
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = used + CHAT_RENDER_MEMORY
        if (soft == resource.RLIM_INFINITY or soft > limit) and (hard == resource.RLIM_INFINITY or hard >= limit):
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
            restore_limit = (resource, soft, hard)
    except (ImportError, OSError, ValueError):
        pass
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def expire(signum: int, frame: Any) -> None:
            raise _RenderTimeout()
        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, CHAT_RENDER_SECONDS)
        restore_timer = previous
    try:
        yield
    finally:
        if restore_timer is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, restore_timer)
        if restore_limit is not None:
            module, soft, hard = restore_limit
            module.setrlimit(module.RLIMIT_AS, (soft, hard))


def _template_sizes(tokenizer: Any) -> list[int]:
    template = getattr(tokenizer, "chat_template", None)
    templates = template.values() if isinstance(template, dict) else [template]
    return [len(t) for t in templates if isinstance(t, str)]


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` rendered with the tokenizer's chat template (transformers' Jinja sandbox).

    The template comes with the model and is input like any other: one that raises (``raise_exception``), has a
    syntax error, reaches for what the sandbox forbids, names something undefined or fails in any other way is a
    one-line ``ValueError`` naming the error, never a traceback. So is one longer than ``MAX_CHAT_TEMPLATE``
    characters, one whose rendering needs more than ``CHAT_RENDER_MEMORY`` bytes or ``CHAT_RENDER_SECONDS``
    seconds (see :func:`_bounded_render`), and a rendered conversation longer than ``MAX_CHAT_TEXT`` characters.
    """
    longest = max(_template_sizes(tokenizer), default=0)
    if longest > MAX_CHAT_TEMPLATE:
        raise ValueError(f"the tokenizer's chat template has {longest:,} characters, more than the "
                         f"{MAX_CHAT_TEMPLATE:,} pifa accepts")
    try:
        with _bounded_render():
            text = tokenizer.apply_chat_template(messages, tokenize=False)
    except MemoryError:
        raise ValueError(f"the tokenizer's chat template needs more than {CHAT_RENDER_MEMORY / 2**30:g} GiB of memory "
                         "to render one conversation: refused") from None
    except _RenderTimeout:
        raise ValueError(f"the tokenizer's chat template takes more than {CHAT_RENDER_SECONDS:g} s to render one "
                         "conversation: refused") from None
    except Exception as exc:  # noqa: BLE001 -- jinja2's TemplateError family, or whatever the template's code raised
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"the tokenizer's chat template failed ({type(exc).__name__}"
                         + (f": {first}" if first else "") + ")") from None
    if not isinstance(text, str):
        raise ValueError(f"the tokenizer's chat template gave {type(text).__name__}, not text")
    if len(text) > MAX_CHAT_TEXT:
        raise ValueError(f"the tokenizer's chat template renders one conversation as {len(text):,} characters, more "
                         f"than the {MAX_CHAT_TEXT:,} pifa accepts")
    return text


def _joined(pieces: Sequence[str], min_chars: int) -> list[str]:
    """``pieces`` joined with blank lines into runs of at least ``min_chars`` characters (a short rest joins the
    last run)."""
    runs: list[str] = []
    current = ""
    for piece in pieces:
        current = f"{current}\n\n{piece}" if current else piece
        if len(current) >= min_chars:
            runs.append(current)
            current = ""
    if current and runs:
        runs[-1] = f"{runs[-1]}\n\n{current}"
    return runs


def text_token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor, without special tokens or truncation.

    Accepts a ``transformers`` tokenizer or a raw ``tokenizers.Tokenizer``. ``verbose=False``
    silences the "longer than model_max_length" warning: the stream is only cut into windows.
    """
    if callable(tokenizer):
        try:
            ids = tokenizer(text, add_special_tokens=False, return_tensors=None, verbose=False)["input_ids"]
        except TypeError:  # a plain callable without the ``verbose`` keyword
            ids = tokenizer(text, add_special_tokens=False, return_tensors=None)["input_ids"]
    else:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def calibration_batches(
    tokenizer: Any,
    source_or_texts: str | os.PathLike | Sequence[str],
    num_samples: int,
    seq_len: int,
    seed: int = 0,
) -> torch.Tensor:
    """Random windows of calibration tokens: a LongTensor of shape ``[num_samples, seq_len]``.

    ``source_or_texts`` is a source for :func:`load_texts` or a list of document strings. The
    documents are joined with ``"\\n\\n"`` and tokenized once (no special tokens) into a stream
    of N tokens; each row is the window ``stream[s : s + seq_len]`` for a start ``s`` drawn
    uniformly from ``[0, N - seq_len]``, independently (with replacement) by
    ``torch.Generator().manual_seed(seed)``. The same inputs always give the same tensor.
    Raises ``ValueError`` for non-positive sizes or when N < seq_len + 1.
    """
    check_positive_int(num_samples, "num_samples")
    check_positive_int(seq_len, "seq_len")
    check_seed(seed)
    if num_samples * seq_len > MAX_CALIBRATION_TOKENS:
        raise ValueError(f"{num_samples} samples x {seq_len} tokens is {num_samples * seq_len:,} calibration tokens, "
                         f"more than the {MAX_CALIBRATION_TOKENS:,} pifa accepts")
    if isinstance(source_or_texts, (str, os.PathLike)):
        texts = load_texts(source_or_texts)
    else:
        texts = list(source_or_texts)
        if not texts or not all(isinstance(t, str) for t in texts) or not "".join(texts).strip():
            raise ValueError("calibration texts must be a non-empty list of non-empty strings")
    ids = text_token_ids(tokenizer, "\n\n".join(texts))
    if ids.numel() < seq_len + 1:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than one sample of seq_len={seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    logger.info("drew %d calibration windows of %d tokens from %d tokens", num_samples, seq_len, ids.numel())
    return ids[starts[:, None] + torch.arange(seq_len)]


def _is_heldout(relative: str) -> bool:
    """The deterministic ~5 % held-out split: sha1 of the relative posix path, mod 20 == 0."""
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 20 == 0


def stdlib_python_files(exclude_heldout: bool = True) -> list[Path]:
    """Sorted ``.py`` files of the running Python's standard library.

    Skips paths containing ``site-packages``, test packages (``/test`` in ``"/" + relative
    path``, e.g. ``test/``, ``ctypes/test/``, ``lib2to3/tests/``) and ``idlelib``; with
    ``exclude_heldout`` also the held-out split (see :func:`_is_heldout`).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative or "/test" in "/" + relative or "idlelib" in relative:
            continue
        if exclude_heldout and _is_heldout(relative):
            continue
        files.append(path)
    return sorted(files)
