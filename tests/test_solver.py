"""The maths of the pipeline as inequalities and identities (pure functions, random data)."""

import logging

import pytest
import torch

from pifa import solver
from pifa.layers import build_layer


def problem(m=24, n=16, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=g, dtype=torch.float64)
    # correlated, anisotropic inputs, like real activations
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    x_dense = x + 0.1 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return weight, x, x.T @ x, x_dense.T @ x


@pytest.mark.parametrize("rank", [1, 4, 8, 15])
def test_whitened_truncation_beats_plain_svd_on_calibration_data(rank):
    weight, _, g, _ = problem()
    plain = solver.truncate(weight, None, rank)
    whitened = solver.truncate(weight, solver.whitening(g, 1e-9), rank)
    err_plain = solver.output_error(weight, plain[0] @ plain[1], g)
    err_white = solver.output_error(weight, whitened[0] @ whitened[1], g)
    assert err_white <= err_plain + 1e-12


def test_whitened_error_is_non_increasing_in_rank():
    weight, _, g, _ = problem()
    chol = solver.whitening(g, 1e-9)
    errors = [solver.output_error(weight, torch.matmul(*solver.truncate(weight, chol, r)), g) for r in range(1, 17)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10  # full rank is exact


def test_truncation_error_equals_discarded_singular_values():
    weight, _, g, _ = problem()
    chol = solver.whitening(g, 0.0)
    s = torch.linalg.svdvals(weight @ chol)
    up, down = solver.truncate(weight, chol, 5)
    err = solver.output_error(weight, up @ down, g) * float(torch.einsum("ij,jk,ik->", weight, g, weight))
    assert err == pytest.approx(float(s[5:].square().sum()), rel=1e-6)


@pytest.mark.parametrize("mix", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_m_objective_never_exceeds_the_whitened_start(mix, steps):
    weight, _, g, h = problem(seed=3)
    up, down = solver.truncate(weight, solver.whitening(g, 1e-6), 6)
    ridge = 1e-3
    mu = ridge * float(torch.diagonal(g).mean())
    cross = (1 - mix) * g + mix * h
    start = solver.m_objective(weight, up @ down, g, cross, mu)
    previous = start
    for k in range(1, steps + 1):
        u2, d2 = solver.m_reconstruct(weight, up, down, g, h, mix, k, ridge)
        value = solver.m_objective(weight, u2 @ d2, g, cross, mu)
        assert value <= previous + 1e-9 * abs(previous)
        previous = value
    assert previous <= start


def test_pifa_conversion_of_m_factors_is_round_off():
    weight, x, g, h = problem()
    up, down = solver.truncate(weight, solver.whitening(g, 1e-6), 6)
    up, down = solver.m_reconstruct(weight, up, down, g, h, 0.25, 2, 1e-3)
    low = build_layer("lowrank", up, down, None, torch.float32)
    piv = build_layer("pivot", up, down, None, torch.float32)
    xf = x.float()
    with torch.no_grad():
        a, b = low(xf), piv(xf)
    assert float((a - b).norm() / a.norm()) <= 1e-5


def test_cholesky_failure_is_damped_and_logged(caplog):
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    g = q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, -0.5], dtype=torch.float64)) @ q.T  # indefinite
    with caplog.at_level(logging.WARNING, logger="pifa.solver"):
        chol = solver.whitening(g, 0.0)
    assert torch.isfinite(chol).all()
    assert "Cholesky failed" in caplog.text
