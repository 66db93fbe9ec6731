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
            kind = float if field.default is None else type(field.default)
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


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        import json
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _torch_dtype(name: str) -> Any:
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return value


def cmd_bench_layer(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_layers
    from .loading import resolve_device

    device = str(resolve_device(args.device))
    m, n, r = args.out_features, args.in_features, args.rank
    dtypes = [_torch_dtype(d) for d in args.dtypes]
    print(f"pifa bench layer: {m} x {n}, rank {r}, device {device}, threads {torch.get_num_threads()}, "
          f"FLOP ideal lowrank/pifa {(m + n) / max(m + n - r, 1):.3f}")
    rows = [row for dtype in dtypes for row in bench_layers(m, n, r, args.tokens, dtype, device, args.rounds)]
    print(format_table(rows))
    _write_json(args.json, {"kind": "bench-layer", "device": device, "shape": [m, n], "rank": r, "rows": rows})
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from .bench import bench_models, random_pivot_copy, synthetic_llama
    from .loading import load_dense, resolve_device
    from .serialization import load_compressed

    device = str(resolve_device(args.device))
    if args.compressed:
        if not args.dense:
            raise ValueError("--compressed needs --dense, the model it was compressed from")
        dense, _ = load_dense(args.dense, args.dtype, device)
        models = {"dense": dense, "compressed": load_compressed(args.compressed, device=device, dtype=dense.dtype)}
    else:
        dense = synthetic_llama(args.hidden, args.mlp, args.blocks, args.vocab, _torch_dtype(args.dtype), device)
        models = {"dense": dense, f"pifa@{args.density}": random_pivot_copy(dense, args.density)}
    result = bench_models(models, args.batch, args.prefill, args.decode, device, args.rounds)
    print(f"pifa bench model: batch {args.batch}, prefill {args.prefill} tokens, decode {args.decode} tokens, "
          f"device {device}")
    print(format_table(result["rows"]))
    print(f"peak memory ({result['peak_memory_kind']}): {result['peak_memory_MB']} MB")
    _write_json(args.json, {"kind": "bench-model", **result})
    return 0


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure speed: layers or whole models")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    layer = kinds.add_parser("layer", help="dense vs low-rank vs PIFA (and 2:4 on CUDA) at one shape",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    layer.add_argument("--out-features", type=int, default=4096)
    layer.add_argument("--in-features", type=int, default=4096)
    layer.add_argument("--rank", type=int, default=2048)
    layer.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 2048])
    layer.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    layer.set_defaults(func=cmd_bench_layer)
    model = kinds.add_parser("model", help="prefill and decode tokens/s, dense vs compressed",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model.add_argument("--compressed", help="a pifa output directory (with --dense)")
    model.add_argument("--dense", help="the dense model it came from")
    model.add_argument("--hidden", type=int, default=4096, help="synthetic Llama: hidden size")
    model.add_argument("--mlp", type=int, default=11008, help="synthetic Llama: MLP size")
    model.add_argument("--blocks", type=int, default=4, help="synthetic Llama: blocks")
    model.add_argument("--vocab", type=int, default=32000, help="synthetic Llama: vocabulary")
    model.add_argument("--density", type=float, default=0.5, help="synthetic: PIFA density of every block linear")
    model.add_argument("--batch", type=int, default=1)
    model.add_argument("--prefill", type=int, default=512, help="prefill tokens per sequence")
    model.add_argument("--decode", type=int, default=32, help="decoded tokens (with the KV cache)")
    model.set_defaults(func=cmd_bench_model)
    for parser in (layer, model):
        parser.add_argument("--device", default="auto")
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--json", help="also write the results to this JSON file")
    model.add_argument("--dtype", default="float32")


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
    _add_bench(sub)
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
