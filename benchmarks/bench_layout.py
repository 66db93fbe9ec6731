"""Weight layout: ``x @ W^T`` with W stored row-major (``nn.Linear``'s (out, in)) vs column-major (its
transpose contiguous), side by side; then SmolLM2's whole decode step with each layout.

    python benchmarks/bench_layout.py --threads 2 --json results/layout.json > results/layout.txt

Shapes: SmolLM2-135M's linears (576 hidden, 1536 MLP, 192 k/v) and the factors of a rank-288 layer; tokens
T = 1 (decode), 8, 128 and 512 (prefill). Weights are cold as in a model's forward (rotating copies past twice the
last-level cache, as the latency tables do). Rounds are interleaved; medians. ``speedup`` = row-major time /
column-major time. What this shows is pifa's rule, ``pifa.layers.column_major``: tall factors column-major,
wide ones row-major.

The model part times one decode step (64 tokens of context, ``pifa.latency.time_decode_step``) and a
512-token prefill of
SmolLM2-135M-Instruct and of copies whose block linears are random PIFA layers at densities 0.9/0.7/0.5,
with every factor row-major and with pifa's rule; and the dense model with the same rule applied to its own
linears (head included), which pifa does not do: it shows how much of the gain a dense model could have
from the layout alone. Every speed table of pifa compares against the stock dense model.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pifa.app.bench import random_pivot_copy
from pifa.latency import cache_bytes, time_decode_step
from pifa.layers import PivotLinear, laid_out
from pifa.tables import format_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

PREFILL = 512  # tokens of the whole-model prefill
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (288, 576), (576, 288), (288, 1536), (1536, 288)]


def _time(weights: list[torch.Tensor], x: torch.Tensor, reps: int) -> float:
    start = time.perf_counter()
    for i in range(reps):
        F.linear(x, weights[i % len(weights)])
    return (time.perf_counter() - start) / reps


def _relaid(model: nn.Module, kind: type[nn.Module], rule: bool) -> nn.Module:
    """A copy of ``model`` with the weights of every ``kind`` module row-major, or laid out by pifa's rule."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, kind):
                for name, param in module.named_parameters(recurse=False):
                    if name != "bias":
                        param.data = laid_out(param.data) if rule else param.data.contiguous()
    return model


def model_rows(rounds: int) -> list[dict]:
    from demo_smollm2 import smollm2_gguf

    from pifa.app.gguf import load_gguf

    dense, _ = load_gguf(smollm2_gguf(), "float32", "cpu")
    models = {("dense", "row-major (stock)"): dense, ("dense", "by shape"): _relaid(dense, nn.Linear, True)}
    for density in (0.9, 0.7, 0.5):
        pifa = random_pivot_copy(dense, density)
        models[(f"pifa@{density}", "row-major")] = _relaid(pifa, PivotLinear, False)
        models[(f"pifa@{density}", "by shape")] = _relaid(pifa, PivotLinear, True)
    ids = torch.arange(PREFILL).unsqueeze(0)
    decode: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    prefill: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for key, model in models.items():
                decode[key].append(time_decode_step(model, "cpu"))
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                prefill[key].append(time.perf_counter() - start)
    stock = ("dense", "row-major (stock)")
    d0, p0 = statistics.median(decode[stock]), statistics.median(prefill[stock])
    return [{"model": name, "layout": layout, "decode_ms": round(statistics.median(decode[name, layout]) * 1e3, 2),
             "decode_vs_stock_dense": round(d0 / statistics.median(decode[name, layout]), 3),
             f"prefill{PREFILL}_vs_stock_dense": round(p0 / statistics.median(prefill[name, layout]), 3)}
            for name, layout in models]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tokens", default="1,8,128,512")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-model", action="store_true", help="the shapes only (no SmolLM2)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cold = 2 * cache_bytes("cpu")
    rows = []
    with torch.inference_mode():
        for m, n in SHAPES:
            copies = max(1, math.ceil(cold / (m * n * 4)))
            row_major = [torch.randn(m, n) for _ in range(copies)]
            col_major = [w.t().contiguous().t() for w in row_major]
            for tokens in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(tokens, n)
                reps = max(copies, int(4e-3 / max(_time(row_major, x, 3), 1e-7)))
                times = {"row": [], "col": []}
                for _ in range(args.rounds):
                    times["row"].append(_time(row_major, x, reps))
                    times["col"].append(_time(col_major, x, reps))
                row_us, col_us = (statistics.median(times[k]) * 1e6 for k in ("row", "col"))
                rows.append({"out": m, "in": n, "tokens": tokens, "row_major_us": round(row_us, 2),
                             "col_major_us": round(col_us, 2), "speedup": round(row_us / col_us, 3)})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, cold weights")
    print(format_table(rows))
    for tokens in sorted({r["tokens"] for r in rows}):
        print(f"T={tokens}: median speed-up of column-major "
              f"{statistics.median(r['speedup'] for r in rows if r['tokens'] == tokens):.3f}x")
    whole = [] if args.no_model else model_rows(max(3, args.rounds // 2))
    if whole:
        print(f"\nSmolLM2-135M-Instruct, one decode step (batch 1, 64 tokens of context) and a {PREFILL}-token "
              "prefill, fp32")
        print(format_table(whole))
    if args.json:
        data = {"threads": torch.get_num_threads(), "rows": rows, "model": whole}
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
