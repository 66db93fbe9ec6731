"""Fused siblings vs unfused: decode and prefill tokens/s of a random Llama-7B-shaped model (4 blocks) with every
block linear a random PIFA layer at density 0.5, next to the dense model, eager and compiled, in one run.

    python benchmarks/bench_fused.py --threads 2 --json results/bench_fused.json     # the real run (minutes)
    python benchmarks/bench_fused.py --tiny                                           # a dry run on tiny shapes

Rows: dense, pifa (each linear its own first GEMM) and pifa+fused (q/k/v and gate/up share one first GEMM,
``pifa.fuse_siblings``), at each batch size; first eager, then each model compiled with ``torch.compile``
(inductor; the warm-up time is reported as ``compile_s``). Fusion is eager-only: under ``torch.compile``
every layer runs its own first GEMM, so compiled ``pifa+fused`` is the same graph as compiled ``pifa`` and
shows the noise between two identical rows (and its compile_s is near 0: dynamo reuses the graph it compiled
for a model of the same structure). Rounds are interleaved across models; medians. The dry run ``--tiny``
uses tiny shapes and one round; add ``--compile-backend eager`` to skip inductor's code generation.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

from pifa import fuse_siblings
from pifa.app.bench import bench_model_table, compile_models, random_pivot_copy, synthetic_llama
from pifa.tables import format_table

FULL = dict(hidden=4096, mlp=11008, blocks=4, vocab=32000)
TINY = dict(hidden=256, mlp=512, blocks=2, vocab=512)


def _models(shape: dict[str, int], density: float, dtype: torch.dtype, device: str) -> dict[str, torch.nn.Module]:
    dense = synthetic_llama(shape["hidden"], shape["mlp"], shape["blocks"], shape["vocab"], dtype, device)
    pifa = random_pivot_copy(dense, density)
    fused = copy.deepcopy(pifa)
    groups = fuse_siblings(fused)
    print(f"fused groups per model: {len(groups)} (e.g. {groups[0] if groups else None})")
    return {"dense": dense, f"pifa@{density}": pifa, f"pifa@{density}+fused": fused}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, one round: checks the script runs")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = TINY if args.tiny else FULL
    prefill, decode, rounds = (16, 4, 1) if args.tiny else (args.prefill, args.decode, args.rounds)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    dtype = getattr(torch, args.dtype)
    results = {}
    for mode in ("eager", *(() if args.no_compile else ("compiled",))):
        models = _models(shape, args.density, dtype, args.device)  # fresh models: compile replaces forward
        seconds = (compile_models(models, max(batches), prefill, decode, args.device, args.compile_backend)
                   if mode == "compiled" else None)
        result = bench_model_table(models, batches, prefill, decode, args.device, rounds, seconds)
        for row in result["rows"]:
            row["mode"] = mode
        results[mode] = result
        print(f"{mode}: shape {shape}, density {args.density}, threads {torch.get_num_threads()}, "
              f"prefill {prefill}, decode {decode}, rounds {rounds}")
        print(format_table(result["rows"]))
    if args.json:
        payload = {"kind": "bench-model", "benchmark": "bench_fused", "shape": shape, "density": args.density,
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                   "rows": [row for r in results.values() for row in r["rows"]],
                   "compile_backend": None if args.no_compile else args.compile_backend}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
