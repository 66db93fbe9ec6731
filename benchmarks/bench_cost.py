"""Compression cost: time per stage and peak memory for ONE LLaMA-7B-shaped block.

    python benchmarks/bench_cost.py --json results/cost.json          # 4096 / 11008, 32 x 512 tokens
    python benchmarks/bench_cost.py --hidden 256 --intermediate 704 --samples 4 --seq-len 64  # smoke test
    python benchmarks/bench_cost.py --compare OLD.json NEW.json   # side by side: time ratios, error equality

A one-block ``LlamaForCausalLM`` (hidden 4096, MLP 11008, 32 heads, vocabulary 1000) with
random float32 weights is compressed with ``pifa.compress`` (mpifa, density 0.5 by default)
on random token ids. Reports ``report.stage_seconds``, the total, the process's peak RSS
(``ru_maxrss``), the RSS before compressing (model built, calibration drawn), the size
of the float64 statistics of the widest input, G and H: ``2 * n * n * 8`` bytes for
``n = intermediate`` (the down projection's input), and every module's calibration error.
To compare two versions of the library, run this script with ``PYTHONPATH`` pointing at each
version's ``src`` (the script only uses the public API), then ``--compare`` the two JSON files.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import pifa
from pifa.tables import format_table

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    """A one-block Llama with random float32 weights (seed 0), in eval mode."""
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(1024, args.seq_len),
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32).eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, compress, and measure; returns every number the tables and the JSON show."""
    start = time.perf_counter()
    model = build_model(args)
    build_seconds = time.perf_counter() - start
    calib = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    rss_before = current_rss()
    config = pifa.CompressionConfig(density=args.density, method=args.method)
    report = pifa.compress(model, config, calib, device="cpu", batch_size=args.batch_size, progress=False)
    n = args.intermediate
    stats_bytes = (2 if config.method in ("m", "mpifa") else 1) * n * n * 8
    return {
        "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                  "vocab": args.vocab, "blocks": 1, "dtype": "float32"},
        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
                        "tokens": args.samples * args.seq_len, "kind": "random token ids, seed 0"},
        "config": config.to_dict(),
        "build_seconds": build_seconds,
        "stage_seconds": dict(report.stage_seconds),
        "total_seconds": report.seconds,
        "achieved_density": report.density,
        "calibration_error": {m.name: m.calib_error for m in report.modules},
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak_rss(),
        "statistics_bytes": stats_bytes,
        "statistics_formula": (f"{stats_bytes // (n * n * 8)} * n * n * 8 "
                               f"(float64 G{', H' if stats_bytes > n * n * 8 else ''}), n = {n}"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pifa": pifa.__version__,
        "machine": platform.machine(),
    }


def mean_error(result: dict[str, Any]) -> float:
    errors = list(result["calibration_error"].values())
    return sum(errors) / len(errors)


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Stage by stage seconds of two runs and their ratio; the calibration errors' largest relative difference."""
    stages = list(dict.fromkeys([*old["stage_seconds"], *new["stage_seconds"]]))
    rows = [{"stage": k, "old s": f"{old['stage_seconds'].get(k, 0.0):.2f}",
             "new s": f"{new['stage_seconds'].get(k, 0.0):.2f}"} for k in stages]
    rows.append({"stage": "total", "old s": f"{old['total_seconds']:.2f}", "new s": f"{new['total_seconds']:.2f}",
                 "old / new": f"{old['total_seconds'] / new['total_seconds']:.2f}x"})
    errors_old, errors_new = old["calibration_error"], new["calibration_error"]
    if set(errors_old) != set(errors_new):
        raise SystemExit("the two runs compressed different modules")
    errors = [{"module": k, "old error": f"{errors_old[k]:.6g}", "new error": f"{errors_new[k]:.6g}",
               "relative difference": f"{abs(errors_new[k] - errors_old[k]) / max(abs(errors_old[k]), 1e-300):.1e}"}
              for k in errors_old]
    errors.append({"module": "mean", "old error": f"{mean_error(old):.6g}", "new error": f"{mean_error(new):.6g}",
                   "relative difference": f"{abs(mean_error(new) - mean_error(old)) / mean_error(old):.1e}"})
    return "\n".join([format_table(rows), "", format_table(errors)])


def tables(result: dict[str, Any]) -> str:
    stages = [{"stage": k, "seconds": f"{v:.2f}"} for k, v in result["stage_seconds"].items()]
    stages.append({"stage": "total (report.seconds)", "seconds": f"{result['total_seconds']:.2f}"})
    summary = [
        {"quantity": "achieved density", "value": f"{result['achieved_density']:.4f}"},
        {"quantity": "mean calibration error", "value": f"{mean_error(result):.6g}"},
        {"quantity": "peak RSS (ru_maxrss)", "value": f"{result['peak_rss_bytes'] / GIB:.2f} GiB"},
        {"quantity": "RSS before compress", "value": f"{result['rss_before_bytes'] / GIB:.2f} GiB"},
        {"quantity": "statistics (G, H float64)", "value": f"{result['statistics_bytes'] / GIB:.2f} GiB"},
        {"quantity": "model build (not counted)", "value": f"{result['build_seconds']:.1f} s"},
    ]
    s, c = result["shape"], result["calibration"]
    head = (f"one Llama block, hidden {s['hidden']}, MLP {s['intermediate']}, {s['heads']} heads, float32; "
            f"{result['config']['method']} density {result['config']['density']}; calibration "
            f"{c['samples']} x {c['seq_len']} random tokens; {result['threads']} threads")
    return "\n".join([head, format_table(stages), "", format_table(summary)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    p.add_argument("--method", default="mpifa", choices=("svd", "svd-llm", "m", "mpifa"))
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "cost.json")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("OLD", "NEW"), help="compare two result files and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        old, new = (json.loads(path.read_text()) for path in args.compare)
        print(compare(old, new))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(tables(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
