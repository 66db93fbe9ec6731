"""The ``pifa`` command line. Errors in user input print one line and exit with code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .._version import __version__
from . import commands
from .flags import cli_message, config_flag


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per CompressionConfig field (help and default from the field), so they never drift."""
    import dataclasses

    from ..config import ALLOCATIONS, METHODS, CompressionConfig

    # No argparse choices: CompressionConfig validates, so every bad value gets the same one-line error.
    listed = {"method": METHODS, "allocation": ALLOCATIONS, "pivot_method": ("lu", "qr")}
    for field in dataclasses.fields(CompressionConfig):
        if field.name == "version":
            continue
        flag, help_text = config_flag(field.name), field.metadata.get("help")
        if field.name in listed:
            help_text = f"{help_text} (one of: {', '.join(listed[field.name])})"
        if isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        elif isinstance(field.default, tuple):
            parser.add_argument(flag, nargs="*", default=list(field.default), metavar="PATTERN", help=help_text)
        else:
            kind = type(field.default) if field.default is not None else (
                str if str(field.type).startswith("str") else float)
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)


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
    layer.set_defaults(func=commands.cmd_bench_layer)
    model = kinds.add_parser("model", help="prefill and decode tokens/s, dense vs compressed",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model.add_argument("--compressed", nargs="+", default=[],
                       help="pifa output directories (with --dense; several: one row each, in one run)")
    model.add_argument("--dense", help="the dense model they came from: an HF folder or a GGUF file")
    model.add_argument("--hidden", type=int, default=4096, help="synthetic Llama: hidden size")
    model.add_argument("--mlp", type=int, default=11008, help="synthetic Llama: MLP size")
    model.add_argument("--blocks", type=int, default=4, help="synthetic Llama: blocks")
    model.add_argument("--vocab", type=int, default=32000, help="synthetic Llama: vocabulary")
    model.add_argument("--density", type=float, default=0.5, help="synthetic: PIFA density of every block linear")
    model.add_argument("--batch", type=int, default=1)
    model.add_argument("--batch-sizes", help="several batch sizes in one run, e.g. 1,4 (instead of --batch)")
    model.add_argument("--compile", action="store_true",
                       help="torch.compile every model first; the compile time is reported apart")
    model.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend with --compile (eager: dynamo's capture only, a quick check)")
    model.add_argument("--fuse", choices=["off", "on", "both"], default="off",
                       help="fused siblings (pifa.fuse_siblings) for the compressed models; both: a row for each")
    model.add_argument("--prefill", type=int, default=512, help="prefill tokens per sequence")
    model.add_argument("--decode", type=int, default=32, help="decoded tokens (with the KV cache)")
    model.set_defaults(func=commands.cmd_bench_model)
    layer.add_argument("--repeats", type=int, default=5,
                       help="independent measurements with fresh layers; the table gives their medians")
    for parser in (layer, model):
        parser.add_argument("--device", default="auto")
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--json", help="also write the results to this JSON file")
    model.add_argument("--dtype", default="float32")


def _add_eval(sub: Any) -> None:
    ev = sub.add_parser("eval", help="perplexity, zero-shot accuracy or encoder fidelity of a model",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("model", help="a dense model directory or a pifa output directory")
    ev.add_argument("--ppl", nargs="+", metavar="SOURCE", help="wikitext2, c4 (online) or text files")
    ev.add_argument("--seq-len", type=int, default=2048, help="perplexity window (non-overlapping)")
    ev.add_argument("--max-windows", type=int, help="evaluate only this many evenly spaced windows")
    ev.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag")
    ev.add_argument("--include-path", help="folder of local lm-eval task definitions")
    ev.add_argument("--limit", type=int, help="lm-eval: documents per task")
    ev.add_argument("--sentences", help="encoders: text file, one sentence per line")
    ev.add_argument("--max-sentences", type=int, default=1000)
    ev.add_argument("--dense", help="encoders: the dense model to compare with (default: recorded source)")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--json", help="also write the results to this JSON file")
    ev.set_defaults(func=commands.cmd_eval)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit code 2), like every other pifa error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pifa", description="Post-training low-rank compression of transformer models (MPIFA)."
    )
    parser.add_argument("--version", action="version", version=f"pifa {__version__}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the machine's physical cores; more oversubscribes)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="describe a compressed model directory")
    info.add_argument("path", help="directory written by pifa")
    info.set_defaults(func=commands.cmd_info)

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
    comp.add_argument("--calib-format", choices=("auto", "text", "chat"), default="auto",
                      help="chat: wrap the calibration paragraphs as assistant replies in the model's chat template "
                           "(for instruction-tuned models); text: plain text; auto: chat when the tokenizer has a "
                           "chat template, text otherwise (the report says which was used)")
    comp.add_argument("--stream", action="store_true",
                      help="never hold the whole model: read each block from MODEL's safetensors when it is reached "
                           "and write it out when finished (sharded output; peak memory independent of depth)")
    comp.add_argument("--sensitivity-cache", metavar="FILE",
                      help="--allocation sensitivity: keep the measured KLs in this JSON file and reuse them in later "
                           "runs on the same model and calibration (e.g. at other densities)")
    comp.add_argument("--dry-run", action="store_true",
                      help="print the plan (per-linear ranks and the achieved density) and write nothing")
    _add_config_flags(comp)
    comp.set_defaults(func=commands.cmd_compress)
    _add_bench(sub)
    _add_eval(sub)
    report = sub.add_parser("report", help="Markdown tables and PNG plots from JSON results")
    report.add_argument("results", nargs="+", help="JSON files from compress, eval, bench or the benchmarks")
    report.add_argument("--out", required=True, help="directory for report.md and the plots")
    report.set_defaults(func=commands.cmd_report)
    return parser


def _quiet_transformers() -> None:
    """pifa shows its own progress; transformers' per-file loading bars would only add noise."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()


def physical_cores() -> int:
    """Physical CPU cores (distinct core ids in /proc/cpuinfo), else the logical CPU count."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    cores = {(block.split("physical id")[1].split("\n")[0], block.split("core id")[1].split("\n")[0])
             for block in text.split("\n\n") if "core id" in block and "physical id" in block}
    return len(cores) or os.cpu_count() or 1


def _set_up_process(threads: int | None) -> None:
    """Determinism and threads for a CLI run (API users do this themselves, see the README).

    MKL may otherwise change its thread count with the machine's load, and with it the
    rounding of every GEMM, so that a resumed run would not reproduce an uninterrupted one
    bit for bit; a value the user set wins.
    """
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    torch.set_num_threads(threads or physical_cores())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"pifa: error: --threads {args.threads} must be a positive integer", file=sys.stderr)
        return 2
    _set_up_process(args.threads)
    _quiet_transformers()
    try:
        return args.func(args)
    except ValueError as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"pifa {args.command}: error: {cli_message(lines[0])}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch.distributed: a rank died or a collective timed out
        if not distributed.active():
            raise
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"pifa {args.command}: error: rank {distributed.rank()}: another rank failed or did not answer "
              f"({lines[0][:200]})", file=sys.stderr)
        return 2
    finally:
        distributed.shut_down()


if __name__ == "__main__":
    sys.exit(main())
