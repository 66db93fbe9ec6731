"""Every `pifa ...` command the README and docs/ show parses with the CLI's own parser (flags and
subcommands that exist), so the documentation cannot drift from the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pifa.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every line of a fenced code block that runs `pifa` (continuations joined)."""
    found = []
    for path in DOCS:
        blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", path.read_text(), flags=re.S)
        for block in blocks:
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("pifa ") or " -m pifa " in line:
                    found.append((path.name, line))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_documented_command_parses(where, command):
    words = shlex.split(command.replace("$GGUF", "model.gguf"))
    words = words[words.index("pifa") + 1:] if "pifa" in words else words
    if "..." in words:  # an elided tail ("compress MODEL OUT ..."): required options may be in it
        pytest.skip("elided command")
    parser = build_parser()
    try:
        parser.parse_args(words)
    except SystemExit as error:
        pytest.fail(f"{where}: `{command}` does not parse (exit {error.code})")
