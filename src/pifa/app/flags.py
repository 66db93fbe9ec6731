"""Core errors name the Python API's arguments (``batch_size``, ``checkpoint_dir``, ``sensitivity_cache``) and
``CompressionConfig``'s fields (``latency_table``, ``density``); the command line says what its user types
instead: :func:`cli_message` rewords them when an error is printed."""

from __future__ import annotations

import dataclasses
import re
from functools import cache

# a core phrase (as raised by src/pifa) -> what the command line says in its place
CLI_WORDING: tuple[tuple[str, str], ...] = (
    ("start afresh with another checkpoint_dir", "run without --resume to start afresh"),
    ("rerun with the same checkpoint_dir to resume", "rerun with --resume"),
    ("compress the model in memory, not streamed", "run without --stream"),
    ("(a larger num_samples, or a smaller batch_size)", "(more --samples, or a smaller --batch-size)"),
    ("(or pass it as sensitivity_cache)", "(or pass it as --sensitivity-cache)"),
)


def config_flag(field: str) -> str:
    """The ``pifa compress`` flag of a ``CompressionConfig`` field (the CLI builds one flag per field)."""
    return "--" + field.replace("_", "-")


@cache
def _field_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    from ..config import CompressionConfig

    names = [f.name for f in dataclasses.fields(CompressionConfig) if f.name != "version"]
    joined = "|".join(sorted((n for n in names if "_" in n), key=len, reverse=True))
    single = "|".join(sorted((n for n in names if "_" not in n), key=len, reverse=True))
    # a field with an underscore is an identifier wherever it stands; a one-word field ("density", "method")
    # is one only where it opens the message, before its value or a verb ("density 1.5 must be in (0, 1]")
    return re.compile(rf"(?<![\w.\-])({joined})(?![\w\-])"), re.compile(rf"^({single}) ")


def cli_message(message: str) -> str:
    """``message`` with every core phrase of :data:`CLI_WORDING` replaced by the command line's, and every
    ``CompressionConfig`` field it names by that field's flag."""
    for core, cli in CLI_WORDING:
        message = message.replace(core, cli)
    anywhere, opening = _field_patterns()
    message = anywhere.sub(lambda m: config_flag(m.group(1)), message)
    message = opening.sub(lambda m: config_flag(m.group(1)) + " ", message)
    return message
