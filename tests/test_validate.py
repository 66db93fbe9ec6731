"""pifa.validate: the shared argument and tensor checks."""

from __future__ import annotations

import pytest
import torch

from pifa.validate import all_finite


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_the_elementwise_check_even_when_the_sum_overflows(dtype):
    big = torch.finfo(dtype).max
    inf, nan = float("inf"), float("nan")
    cases = [[], [1.0, -2.5], [big] * 12, [big, -big, big], [1.0, nan], [inf, 2.0], [-inf],
             [inf, -inf]]  # the sum of [big] * 12 overflows to Inf; of the last is NaN
    for case in cases:
        tensor = torch.tensor(case, dtype=dtype)
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all()), tensor
    assert all_finite(torch.randn(64, 33, dtype=dtype))
    assert all_finite(torch.arange(5))  # integers are always finite
