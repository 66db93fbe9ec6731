"""Fixtures shared by every test (helpers, imported by the tests, are in helpers.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_CONFIGS


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state: a CI run cannot differ from a local one."""
    torch.manual_seed(0)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
