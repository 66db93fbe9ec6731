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
        after = layer_parameters(m, n, r, KIND_TO_RANK_KIND[entry["kind"]])
        rows.append({"module": name, "kind": entry["kind"], "shape": f"{m}x{n}", "rank": r,
                     "before": m * n, "after": after})
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
    print(f"\n{len(rows)} compressed modules: {after:,} of {before:,} weights kept, density {density:.4f}")
    return 0


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per CompressionConfig field (help and default from the field), so they never drift."""
    import dataclasses

    from .config import ALLOCATIONS, METHODS, CompressionConfig

    choices = {"method": METHODS, "allocation": ALLOCATIONS, "pivot_method": ("lu", "qr")}
    for field in dataclasses.fields(CompressionConfig):
        if field.name == "version":
            continue
        flag, help_text = "--" + field.name.replace("_", "-"), field.metadata.get("help")
        if isinstance(field.default, tuple):
            parser.add_argument(flag, nargs="*", default=list(field.default), metavar="PATTERN", help=help_text)
        else:
            kind = float if field.name == "attn_density" else type(field.default)
            parser.add_argument(flag, type=kind, default=field.default, choices=choices.get(field.name), help=help_text)


def _config_from_args(args: argparse.Namespace) -> Any:
    import dataclasses

    from .config import CompressionConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompressionConfig) if f.name != "version"}
    return CompressionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def cmd_compress(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from .data import calibration_batches
    from .engine import compress
    from .loading import load_dense, resolve_device
    from .serialization import save_compressed

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"output directory {str(out)!r} already exists (pass --overwrite to replace it)")
    config = _config_from_args(args)
    device = resolve_device(args.device)
    model, tokenizer = load_dense(args.model, args.dtype, str(device))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context of {limit} tokens")
    calib = calibration_batches(tokenizer, args.calib, args.samples, args.seq_len, args.seed)
    checkpoint = out.with_name(out.name + ".pifa-checkpoint")
    if checkpoint.exists() and not args.resume:
        shutil.rmtree(checkpoint)
    report = compress(model, config, calib, device=device, batch_size=args.batch_size, checkpoint_dir=str(checkpoint))
    report.config["calibration"] = {"source": str(args.calib), "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed}
    save_compressed(model, out, tokenizer=tokenizer, compression=config.to_dict(), overwrite=args.overwrite,
                    extra_files={"compression_report.json": report.to_json()})
    shutil.rmtree(checkpoint, ignore_errors=True)
    print(report.table())
    print(f"saved to {out}")
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

    comp = sub.add_parser("compress", help="compress a Hugging Face model to a target density",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comp.add_argument("model", help="local model directory (safetensors) or a hub id when online")
    comp.add_argument("out", help="output directory (appears only when complete)")
    comp.add_argument("--calib", required=True, help="calibration text: .txt/.jsonl file, folder, or wikitext2/c4")
    comp.add_argument("--samples", type=int, default=128, help="calibration sequences")
    comp.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence")
    comp.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    comp.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    comp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    comp.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    comp.add_argument("--resume", action="store_true", help="continue a killed run from its last finished block")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_config_flags(comp)
    comp.set_defaults(func=cmd_compress)
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
