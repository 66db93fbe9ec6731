"""Compress one linear layer to density 0.5 three ways and print size and error.

    python examples/quickstart.py

A 1024 x 1024 layer with a decaying spectrum (like trained weights) is compressed to
half its parameters as (a) a low-rank U V layer and (b) a PIFA layer. At the same
parameter budget PIFA affords a higher rank (r (m + n - r) instead of r (m + n)), so its
error is lower; at the same rank it is lossless against U V and r^2 parameters smaller.
"""

import torch
from torch import nn

import pifa


def spectral_linear(m: int, n: int, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -0.7
    linear = nn.Linear(n, m)
    linear.weight.data = (u[:, : len(s)] * s) @ v[:, : len(s)].T
    return linear


def main() -> None:
    m = n = 1024
    linear = spectral_linear(m, n)
    x = torch.randn(256, n)
    with torch.no_grad():
        y = linear(x)
        rank_lr = pifa.rank_for_density(m, n, 0.5, kind="lowrank")
        rank_pifa = pifa.rank_for_density(m, n, 0.5, kind="pifa")
        layers = {
            f"LowRankLinear rank {rank_lr}": pifa.LowRankLinear.from_linear(linear, rank_lr),
            f"PivotLinear rank {rank_pifa}": pifa.PivotLinear.from_linear(linear, rank_pifa),
            f"LowRankLinear rank {rank_pifa}": pifa.LowRankLinear.from_linear(linear, rank_pifa),
        }
        dense = linear.weight.numel() + linear.bias.numel()
        print(f"dense nn.Linear {m} x {n}: {dense:,} parameters")
        for name, layer in layers.items():
            err = float((layer(x) - y).norm() / y.norm())
            print(f"{name:<26} {layer.num_parameters():>9,} parameters ({layer.num_parameters() / dense:6.1%})  "
                  f"relative output error {err:.4f}")
        same_rank = layers[f"LowRankLinear rank {rank_pifa}"]
        lossless = pifa.PivotLinear.from_low_rank(same_rank)
        diff = float((lossless(x) - same_rank(x)).norm() / same_rank(x).norm())
        print(f"PIFA vs U V at rank {rank_pifa}: relative difference {diff:.1e} "
              f"with {same_rank.num_parameters() - lossless.num_parameters():,} fewer parameters")


if __name__ == "__main__":
    main()
