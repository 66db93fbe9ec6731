"""Conversion cost: PIFA from rank-r factors (factor space) vs pivoting the dense product.

    python benchmarks/bench_convert.py        # 4096 x 4096, rank 2048, 3 rounds

The dense reference does what the paper's code does: QR with column pivoting of the
dense W^T (SciPy), then a least-squares solve for the coefficients against the full W.
pifa pivots the m x r factor instead (LU with partial pivoting, or QR with column
pivoting), O(m r^2) instead of O(m n min(m, n)). Errors are relative to the exact
low-rank output on random inputs, computed in float64; layers run in float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import scipy.linalg
import torch

from pifa import PivotLinear
from pifa.tables import format_table


def dense_reference(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pivot rows of the dense W (m x n, float32): pivot indices, pivot rows, coefficients."""
    _, _, perm = scipy.linalg.qr(w.T, mode="economic", pivoting=True)
    pivots, others = np.sort(perm[:r]), np.sort(perm[r:])
    coeff_t, *_ = scipy.linalg.lstsq(w[pivots].T, w[others].T)
    return pivots, w[pivots], coeff_t.T


def output_error(pivots, pivot_rows, coeff, reference: torch.Tensor, x: torch.Tensor) -> float:
    """Relative error of the float32 PIFA forward against the float64 low-rank output."""
    z = x @ torch.as_tensor(pivot_rows, dtype=torch.float32).T
    y = torch.empty(x.shape[0], reference.shape[1])
    others = torch.as_tensor(np.setdiff1d(np.arange(reference.shape[1]), pivots))
    y[:, torch.as_tensor(pivots)] = z
    y[:, others] = z @ torch.as_tensor(coeff, dtype=torch.float32).T
    return float((y.double() - reference).norm() / reference.norm())


def run(m: int, n: int, r: int, rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(m, r, generator=g) / r**0.5, torch.randn(r, n, generator=g) / n**0.5
    x = torch.randn(64, n, generator=g)
    reference = x.double() @ down.double().T @ up.double().T
    times: dict[str, list[float]] = {"dense-qr+lstsq": [], "pifa-lu": [], "pifa-qr": []}
    errors: dict[str, float] = {}
    for _ in range(rounds):
        start = time.perf_counter()
        w = (up @ down).numpy()  # the reference needs the dense product
        result = dense_reference(w, r)
        times["dense-qr+lstsq"].append(time.perf_counter() - start)
        errors["dense-qr+lstsq"] = output_error(*result, reference, x)
        for method in ("lu", "qr"):
            start = time.perf_counter()
            layer = PivotLinear.from_factors(up, down, method=method)
            times[f"pifa-{method}"].append(time.perf_counter() - start)
            with torch.no_grad():
                errors[f"pifa-{method}"] = float((layer(x).double() - reference).norm() / reference.norm())
    base = statistics.median(times["dense-qr+lstsq"])
    return [
        {"method": name, "seconds": round(statistics.median(t), 3), "speedup": round(base / statistics.median(t), 2),
         "rel_output_error": f"{errors[name]:.2e}"}
        for name, t in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, {args.out_features} x {args.in_features}, rank {args.rank}, "
          f"median of {args.rounds} rounds")
    rows = run(args.out_features, args.in_features, args.rank, args.rounds)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
