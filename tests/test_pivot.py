"""pifa.pivot: pivot selection."""

from __future__ import annotations

import logging

import torch

from pifa import PivotLinear


def test_large_pivot_coefficients_are_warned(caplog, monkeypatch):
    import pifa.pivot

    monkeypatch.setattr(pifa.pivot, "LARGE_COEFF", 0.5)  # any real layer has some coefficient above 0.5
    with caplog.at_level(logging.WARNING, logger="pifa"):
        PivotLinear.from_factors(torch.randn(40, 4), torch.randn(4, 8))
    assert "pivot coefficients reach" in caplog.text
