"""Speed of compressed SmolLM2-135M-Instruct against the dense model: the issue-27 table. For each plan
(sensitivity ranks at density 0.9 / 0.7 / 0.5 and latency-budget plans), its density, predicted speed-up of
the block linears and of the whole model's decode step, WikiText-2 perplexity and the measured decode and
prefill speed-up of the whole model, eager and compiled, side by side in one run.

    OMP_NUM_THREADS=2 python benchmarks/bench_speed_smollm2.py --threads 2 --json results/speed_smollm2.json \\
        > results/speed_smollm2.txt
    python benchmarks/bench_speed_smollm2.py --plans sens@0.5 --no-compile --rounds 1       # a quicker look

Every plan is MPIFA with a latency table of this machine (``--latency-table``, measured there when missing:
no linear is planned at a rank whose PIFA form decodes slower than its dense form) and is compressed from a
copy of the dense model on the demo's calibration (32 x 256 tokens of WikiText-2 valid as chat replies).
Sensitivity plans share one ``pifa.SensitivityCache`` (``--sensitivity-cache``, kept between invocations: the
first run measures every candidate rank, about 17 minutes on 2 cores). Perplexity: 16 evenly spaced 512-token
WikiText-2 test windows. Speed: batch 1, prefill ``--prefill`` tokens, decode 32 tokens, median of
``--rounds`` rounds interleaved across models; eager models run with fused siblings (``pifa.fuse_siblings``),
then the same models compiled (``torch.compile``, inductor; the warm-up time is ``compile_s``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import pifa
from pifa.app.bench import bench_model_table, compile_models
from pifa.app.gguf import load_gguf
from pifa.data import calibration_batches, chat_documents, load_texts
from pifa.evaluate import perplexity_of_text
from pifa.tables import format_table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from demo_smollm2 import seeded_cache, smollm2_gguf  # noqa: E402

# name -> CompressionConfig fields beside method="mpifa" and the latency table
PLANS: dict[str, dict[str, Any]] = {
    "sens@0.9": dict(density=0.9, allocation="sensitivity"),
    "sens@0.7": dict(density=0.7, allocation="sensitivity"),
    "sens@0.5": dict(density=0.5, allocation="sensitivity"),
    # a speedup is the predicted speed-up of the whole model's decode step (timed on the dense model)
    "sens/speedup1.05": dict(speedup=1.05, allocation="sensitivity"),
    "sens/speedup1.08": dict(speedup=1.08, allocation="sensitivity"),
    "sens/speedup1.2": dict(speedup=1.2, allocation="sensitivity"),
    "uniform/speedup1.2": dict(speedup=1.2, allocation="uniform"),
    "sens/speedup1.3": dict(speedup=1.3, allocation="sensitivity"),
    "uniform/speedup1.3": dict(speedup=1.3, allocation="uniform"),
}


def compress_plans(dense: torch.nn.Module, tokenizer: Any, calib: torch.Tensor, test_text: str,
                   args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module], list[dict[str, Any]]]:
    cache = seeded_cache(args.sensitivity_cache)  # a copy of the demo's shipped measurements when missing
    models, rows = {"dense": dense}, []
    ppl = perplexity_of_text(dense, tokenizer, test_text, 512, 4, 16)["ppl"]
    rows.append({"plan": "dense", "density": 1.0, "pred_decode_x": 1.0, "pred_prefill_x": 1.0,
                 "pred_model_decode_x": 1.0, "ppl": round(ppl, 2)})
    for name in args.plans:
        model = copy.deepcopy(dense)
        config = pifa.CompressionConfig(method="mpifa", latency_table=args.latency_table, **PLANS[name])
        start = time.perf_counter()
        report = pifa.compress(model, config, calib, device="cpu", sensitivity_cache=cache, progress=False)
        ppl = perplexity_of_text(model, tokenizer, test_text, 512, 4, 16)["ppl"]
        rows.append({"plan": name, "density": round(report.density, 4),
                     "pred_decode_x": round(report.predicted_speedup["decode"], 3),
                     "pred_prefill_x": round(report.predicted_speedup["prefill"], 3),
                     "pred_model_decode_x": round(report.predicted_speedup.get("decode_model", float("nan")), 3),
                     "ppl": round(ppl, 2),
                     "dense_linears": sum(m.kind == "dense" for m in report.modules),
                     "compress_s": round(time.perf_counter() - start, 1)})
        print(f"{name}: {rows[-1]}", flush=True)
        pifa.fuse_siblings(model)  # eager inference: q/k/v and gate/up share one first GEMM
        models[name] = model
    return models, rows


def measure(models: dict[str, torch.nn.Module], rows: list[dict[str, Any]], args: argparse.Namespace,
            checkpoint: Any) -> None:
    """Adds eager and compiled decode / prefill speed-ups to ``rows`` (the same models, eager first)."""
    modes = ("eager",) if args.no_compile else ("eager", "compiled")
    for mode in modes:
        seconds = compile_models(models, 1, args.prefill, 32, "cpu") if mode == "compiled" else None
        result = bench_model_table(models, [1], args.prefill, 32, "cpu", args.rounds, seconds)
        for row, speed in zip(rows, result["rows"]):
            row[f"{mode}_decode_x"] = speed["decode_x"]
            row[f"{mode}_prefill_x"] = speed["prefill_x"]
            row[f"{mode}_decode_tok_s"] = speed["decode_tok_s"]
            if seconds is not None:
                row["compile_s"] = speed["compile_s"]
        print(f"{mode} done: " + json.dumps([{k: v for k, v in r.items() if mode in k} for r in rows]), flush=True)
        checkpoint()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--latency-table", default=".cache/latency.json")
    parser.add_argument("--sensitivity-cache", default=".cache/sensitivity_smollm2.json")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (args.latency_table, args.sensitivity_cache):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    dense, tokenizer = load_gguf(smollm2_gguf(), "float32", "cpu")
    documents = chat_documents(tokenizer, load_texts(Path(args.data) / "valid.txt"))
    calib = calibration_batches(tokenizer, documents, 32, 256, seed=0)
    test_text = "\n\n".join(load_texts(Path(args.data) / "test.txt"))
    models, rows = compress_plans(dense, tokenizer, calib, test_text, args)
    measure(models, rows, args, lambda: write(args, rows))
    print(f"\nSmolLM2-135M-Instruct, MPIFA plans with a latency table; {torch.get_num_threads()} threads, batch 1, "
          f"prefill {args.prefill}, decode 32, median of {args.rounds} interleaved rounds; pred_decode_x, "
          "pred_prefill_x: the latency table's prediction for the block linears; pred_model_decode_x: for the whole "
          "model's decode step (the dense step timed, the rest assumed unchanged); *_x: measured on the whole model "
          "(head included)")
    print(format_table(rows))
    write(args, rows)
    return 0


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The rows so far as JSON (after the eager measurement and again at the end)."""
    if args.json:
        Path(args.json).write_text(json.dumps({
            "kind": "bench-speed", "benchmark": "bench_speed_smollm2", "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor(),
            "prefill": args.prefill, "decode": 32, "rounds": args.rounds, "plans": {n: PLANS[n] for n in args.plans},
            "rows": rows, "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
