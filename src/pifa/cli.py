"""The ``pifa`` command line. Errors in user input print one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .ranks import layer_parameters
from .serialization import check_tensor_shapes, read_pifa_config

KIND_TO_RANK_KIND = {"lowrank": "lowrank", "pivot": "pifa"}


def _module_rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in spec["modules"].items():
        m, n, r = entry["out_features"], entry["in_features"], entry["rank"]
        bias = m if entry["bias"] else 0
        after = layer_parameters(m, n, r, KIND_TO_RANK_KIND[entry["kind"]]) + bias
        rows.append({"module": name, "kind": entry["kind"], "shape": f"{m}x{n}", "rank": r,
                     "before": m * n + bias, "after": after})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table with a header row and right-aligned numbers."""
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    cells = [[str(row[c]) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def cmd_info(args: argparse.Namespace) -> int:
    spec = read_pifa_config(args.path)
    check_tensor_shapes(args.path, spec)
    rows = _module_rows(spec)
    print(f"pifa model {args.path} (format {spec['format_version']}, written by pifa {spec.get('library_version')})")
    print(format_table(rows))
    before, after = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
    density = after / before if before else 1.0
    print(f"\n{len(rows)} compressed modules: {after:,} of {before:,} parameters, density {density:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pifa", description="Post-training low-rank compression of transformer models (MPIFA)."
    )
    parser.add_argument("--version", action="version", version=f"pifa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="describe a compressed model directory")
    info.add_argument("path", help="directory written by pifa")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"pifa {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
