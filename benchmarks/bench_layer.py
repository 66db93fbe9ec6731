"""Layer speed: dense vs low-rank (U V) vs PIFA at the same rank, timed side by side.

    python benchmarks/bench_layer.py                      # 4096 x 4096, rank 2048, fp32 + bf16
    python benchmarks/bench_layer.py --device cuda        # on a GPU

Prints milliseconds per forward and the speed ratios low-rank / PIFA and dense / PIFA.
The FLOP ideal of low-rank / PIFA is (m + n) / (m + n - r) = 1.33 at r = n / 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from pifa import LowRankLinear, PivotLinear
from pifa.cli import format_table
from pifa.timing import interleaved_medians


def build_layers(m: int, n: int, r: int, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(m, r, generator=g) / r**0.5, torch.randn(r, n, generator=g) / n**0.5
    low = LowRankLinear.from_factors(up, down)
    dense = nn.Linear(n, m, bias=False)
    dense.weight.data = torch.randn(m, n, generator=g) / n**0.5
    layers = {"dense": dense, "lowrank": low, "pifa": PivotLinear.from_low_rank(low)}
    return {k: v.to(device=device, dtype=dtype).eval() for k, v in layers.items()}


def bench(m: int, n: int, r: int, tokens: list[int], dtype: torch.dtype, device: str, rounds: int) -> list[dict]:
    layers = build_layers(m, n, r, dtype, device)
    rows = []
    for t in tokens:
        x = torch.randn(t, n, device=device, dtype=dtype)
        with torch.inference_mode():
            ms = interleaved_medians({k: (lambda f=f: f(x)) for k, f in layers.items()}, rounds=rounds, device=device)
        rows.append({
            "dtype": str(dtype).removeprefix("torch."), "tokens": t,
            "dense_ms": round(ms["dense"], 3), "lowrank_ms": round(ms["lowrank"], 3), "pifa_ms": round(ms["pifa"], 3),
            "lowrank/pifa": round(ms["lowrank"] / ms["pifa"], 3), "dense/pifa": round(ms["dense"] / ms["pifa"], 3),
        })
        print(f"  {rows[-1]}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=2048)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    m, n, r = args.out_features, args.in_features, args.rank
    print(f"device {args.device}, threads {torch.get_num_threads()}, {m} x {n}, rank {r}, "
          f"FLOP ideal lowrank/pifa {(m + n) / (m + n - r):.3f}")
    rows = [row for name in args.dtypes for row in bench(m, n, r, args.tokens, getattr(torch, name), args.device, args.rounds)]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": args.device, "shape": [m, n], "rank": r, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
