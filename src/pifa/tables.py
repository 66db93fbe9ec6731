"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table with a header row and right-aligned numbers (floats to 6 digits); the
    columns are every key of any row, in order of first appearance (missing cells stay empty)."""
    if not rows:
        return "(empty)"
    cols = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def pivot(rows: list[dict[str, Any]], row_key: str, column_key: str, value_key: str) -> list[dict[str, Any]]:
    """Rows for :func:`format_table` with one line per ``row_key`` value and one column per ``column_key``
    value (sorted), holding ``value_key`` (e.g. perplexity by method and density); a missing pair stays
    empty, and a pair seen twice keeps its last value."""
    columns = sorted({row[column_key] for row in rows})
    table: dict[Any, dict[str, Any]] = {}
    for row in rows:
        line = table.setdefault(row[row_key], {row_key: row[row_key], **{_cell(c): "" for c in columns}})
        line[_cell(row[column_key])] = row[value_key]
    return list(table.values())
