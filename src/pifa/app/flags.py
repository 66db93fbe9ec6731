"""Core errors name the Python API's arguments (``batch_size``, ``checkpoint_dir``, ``sensitivity_cache``);
the command line says what its user types instead: this table rewords them when an error is printed."""

from __future__ import annotations

# a core phrase (as raised by src/pifa) -> what the command line says in its place
CLI_WORDING: tuple[tuple[str, str], ...] = (
    ("start afresh with another checkpoint_dir", "run without --resume to start afresh"),
    ("rerun with the same checkpoint_dir to resume", "rerun with --resume"),
    ("compress the model in memory, not streamed", "run without --stream"),
    ("(a larger num_samples, or a smaller batch_size)", "(more --samples, or a smaller --batch-size)"),
    ("(or pass it as sensitivity_cache)", "(or pass it as --sensitivity-cache)"),
)


def cli_message(message: str) -> str:
    """``message`` with every core phrase of :data:`CLI_WORDING` replaced by the command line's."""
    for core, cli in CLI_WORDING:
        message = message.replace(core, cli)
    return message
