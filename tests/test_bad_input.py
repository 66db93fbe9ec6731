"""Bad input to the layers and the pivoting: a ValueError naming the problem."""

import pytest
import torch
from torch import nn

from pifa import LowRankLinear, PivotLinear, select_pivots


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
@pytest.mark.parametrize("rank", [0, -1, 17, 2.5])
def test_rank_out_of_range(cls, rank):
    with pytest.raises(ValueError, match="rank"):
        cls.from_linear(nn.Linear(16, 32), rank)


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
def test_factor_shapes_disagree(cls):
    with pytest.raises(ValueError, match="disagree"):
        cls.from_factors(torch.randn(10, 3), torch.randn(4, 8))
    with pytest.raises(ValueError, match="bias"):
        cls.from_factors(torch.randn(10, 3), torch.randn(3, 8), torch.randn(9))
    with pytest.raises(ValueError, match="2-D"):
        cls.from_factors(torch.randn(10), torch.randn(3, 8))


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
@pytest.mark.parametrize("where", ["up", "down", "bias"])
def test_non_finite_factors(cls, where):
    tensors = {"up": torch.randn(10, 3), "down": torch.randn(3, 8), "bias": torch.randn(10)}
    tensors[where][0] = float("nan")
    with pytest.raises(ValueError, match=f"'{where}' has non-finite"):
        cls.from_factors(tensors["up"], tensors["down"], tensors["bias"])


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
def test_non_finite_weight(cls):
    linear = nn.Linear(8, 8)
    with torch.no_grad():
        linear.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        cls.from_linear(linear, 2)


@pytest.mark.parametrize("method", ["lu", "qr"])
@pytest.mark.parametrize("seed", range(20))
def test_rank_deficient_factors(method, seed):
    torch.manual_seed(seed)
    up = torch.randn(20, 2) @ torch.randn(2, 4)  # rank 2, claimed rank 4
    with pytest.raises(ValueError, match="rank-deficient.*only 2 independent rows"):
        PivotLinear.from_factors(up, torch.randn(4, 12), method=method)
    up = torch.randn(20, 4)
    up[:, 3] = up[:, 0]
    with pytest.raises(ValueError, match="rank-deficient"):
        select_pivots(up, method)


def test_unknown_pivot_method():
    with pytest.raises(ValueError, match="pivot method 'svd'"):
        PivotLinear.from_factors(torch.randn(6, 2), torch.randn(2, 5), method="svd")
