"""The maths of the pipeline as inequalities and identities (pure functions, random data)."""

import logging

import numpy as np
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
    errors = [solver.output_error(weight, torch.matmul(*solver.truncate(weight, chol, r)[:2]), g) for r in range(1, 17)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10  # full rank is exact


def test_truncation_error_equals_discarded_singular_values():
    weight, _, g, _ = problem()
    chol = solver.whitening(g, 0.0)
    s = torch.linalg.svdvals(weight @ chol)
    up, down, _ = solver.truncate(weight, chol, 5)
    err = solver.output_error(weight, up @ down, g) * float(torch.einsum("ij,jk,ik->", weight, g, weight))
    assert err == pytest.approx(float(s[5:].square().sum()), rel=1e-6)


@pytest.mark.parametrize("mix", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_m_objective_never_exceeds_the_whitened_start(mix, steps):
    weight, _, g, h = problem(seed=3)
    up, down, _ = solver.truncate(weight, solver.whitening(g, 1e-6), 6)
    ridge = 1e-3
    mu = ridge * float(torch.diagonal(g).mean())
    cross = (1 - mix) * g + mix * h
    start = solver.m_objective(weight, up @ down, g, cross, mu)
    previous = start
    for k in range(1, steps + 1):
        u2, d2, _ = solver.m_reconstruct(weight, up, down, g, h, mix, k, ridge)
        value = solver.m_objective(weight, u2 @ d2, g, cross, mu)
        assert value <= previous + 1e-9 * abs(previous)
        previous = value
    assert previous <= start


def test_pifa_conversion_of_m_factors_is_round_off():
    weight, x, g, h = problem()
    up, down, _ = solver.truncate(weight, solver.whitening(g, 1e-6), 6)
    up, down, _ = solver.m_reconstruct(weight, up, down, g, h, 0.25, 2, 1e-3)
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


real_eigh = torch.linalg.eigh


def big_problem(m=1200, n=1100, tokens=3000, seed=5):
    """Large enough for the fast paths (1024 columns and more), with a steep, real-like spectrum."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, n, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * scales
    x = x @ torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    weight = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
    return weight, x


def test_fast_top_eigenpairs_equal_the_float64_decomposition(monkeypatch):
    weight, x = big_problem()
    gram = (weight @ x.T) @ (x @ weight.T) / x.shape[0]
    k = 400
    calls = []
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **kw: calls.append(1) or real_eigh(*a, **kw))
    values, vectors = solver.top_eigenpairs(gram, k)
    assert not calls, "the float32 path was not taken"
    ref_values, ref_vectors = torch.linalg.eigh(gram)
    ref_values, ref_vectors = ref_values.flip(0)[:k], ref_vectors.flip(1)[:, :k]
    assert torch.allclose(values, ref_values, rtol=1e-5, atol=1e-6 * float(ref_values[0]))  # float32 values
    assert float((vectors.T @ vectors - torch.eye(k, dtype=torch.float64)).abs().max()) < 1e-12  # orthonormal
    # the same subspace, to float32 round-off
    assert float((vectors @ vectors.T - ref_vectors @ ref_vectors.T).abs().max()) < 1e-4
    assert float((gram @ vectors - vectors * values).norm() / values[0]) < 1e-4


def test_truncation_on_the_fast_path_gives_the_float64_error_to_many_digits(monkeypatch):
    weight, x = big_problem()
    g = x.T @ x
    chol = solver.whitening(g, 1e-6)
    fast = solver.truncate(weight, chol, 300)
    monkeypatch.setattr(solver, "FAST_EIGH_MIN", 10**9)  # the float64 decomposition only
    reference = solver.truncate(weight, chol, 300)
    errors = [solver.output_error(weight, t.up @ t.down, g) for t in (fast, reference)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-9)
    assert fast.energy == pytest.approx(reference.energy, rel=1e-12)


@pytest.mark.parametrize("shape", [(24, 16), (1200, 1100), (700, 1100)])
def test_lowrank_error_and_energy_equal_the_direct_formula(shape):
    weight, x = big_problem(*shape)
    g = x.T @ x
    chol = solver.whitening(g, 1e-4)
    start = solver.truncate(weight, chol, 7)
    energy = solver.output_energy(weight, g, chol, start.energy)
    assert energy == pytest.approx(float(torch.einsum("ij,jk,ik->", weight, g, weight)), rel=1e-10)
    assert solver.output_energy(weight, g) == pytest.approx(energy, rel=1e-10)
    direct = solver.output_error(weight, start.up @ start.down, g)
    assert solver.lowrank_error(weight, start.up, start.down, g, energy) == pytest.approx(direct, rel=1e-9)


def test_wide_and_tall_truncations_agree_with_the_svd_of_the_whitened_weight():
    for m, n in ((1100, 1030), (1030, 1100), (20, 30), (30, 20)):
        weight, x = big_problem(m, n, tokens=2 * n)
        g = x.T @ x
        chol = solver.whitening(g, 1e-8)
        up, down, _ = solver.truncate(weight, chol, 9)
        s = torch.linalg.svdvals(weight @ chol)
        damped = chol @ chol.T  # G + delta I, what the truncation is optimal for
        err = solver.output_error(weight, up @ down, damped) * float(torch.einsum("ij,jk,ik->", weight, damped, weight))
        assert err == pytest.approx(float(s[9:].square().sum()), rel=1e-6)


@pytest.mark.parametrize("n", [30, 1100])
def test_symmetric_statistics_and_triangular_products_equal_dense_products(n):
    x = torch.randn(257, n, generator=torch.Generator().manual_seed(1))
    acc = solver.add_gram(solver.add_gram(None, x), 2 * x)
    expected = 5 * (x.double().T @ x.double())
    assert torch.allclose(acc, expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(acc, acc.T)  # exactly symmetric
    lower = torch.tril(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    a = torch.randn(40, n, dtype=torch.float64)
    assert torch.allclose(solver.times_lower(a, lower), a @ lower, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("steps", [0, 2])
def test_m_from_w_h_equals_m_from_h_and_its_down_g_is_down_times_g(steps):
    weight, _, g, h = problem(seed=4)
    up, down, _ = solver.truncate(weight, solver.whitening(g, 1e-6), 6)
    from_h = solver.m_reconstruct(weight, up, down, g, h, 0.25, steps, 1e-3)
    from_wh = solver.m_reconstruct(weight, up, down, g, None, 0.25, steps, 1e-3, wh=weight.double() @ h)
    for a, b in zip(from_h, from_wh):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    assert torch.allclose(from_h.down_g, from_h.down @ g, rtol=1e-8, atol=1e-8 * float(g.abs().max()))
    energy = solver.output_energy(weight, g)
    direct = solver.output_error(weight, from_h.up @ from_h.down, g)
    assert solver.lowrank_error(weight, from_h.up, from_h.down, g, energy, from_h.down_g) == pytest.approx(direct,
                                                                                                         rel=1e-9)


def test_a_cut_far_down_the_spectrum_takes_float64_mrrr(monkeypatch):
    q = torch.linalg.qr(torch.randn(1100, 1100, dtype=torch.float64, generator=torch.Generator().manual_seed(3))).Q
    spectrum = torch.logspace(0, -8, 1100, dtype=torch.float64)
    matrix = (q * spectrum) @ q.T
    dtypes = []
    real_mrrr = solver._mrrr_top
    monkeypatch.setattr(solver, "_mrrr_top", lambda a, k: dtypes.append(a.dtype) or real_mrrr(a, k))
    values, vectors = solver.top_eigenpairs(matrix, 600)  # the 600th eigenvalue is about 1e-4.4 of the first
    assert dtypes == [np.float32, np.float64]  # float32 cannot place the cut: float64 on the top 600 only
    assert torch.allclose(values, spectrum[:600], rtol=1e-9)
    assert float((vectors.T @ vectors - torch.eye(600, dtype=torch.float64)).abs().max()) < 1e-12
    top = q[:, :600]
    assert float((vectors @ vectors.T - top @ top.T).abs().max()) < 1e-8  # the top subspace to float64 round-off


def test_top_eigenpairs_fall_back_to_torch_when_lapack_fails(monkeypatch):
    q = torch.linalg.qr(torch.randn(1100, 1100, dtype=torch.float64, generator=torch.Generator().manual_seed(4))).Q
    spectrum = torch.linspace(2, 1, 1100, dtype=torch.float64)
    monkeypatch.setattr(solver, "_mrrr_top", lambda a, k: None)
    values, vectors = solver.top_eigenpairs((q * spectrum) @ q.T, 300)
    assert torch.allclose(values, spectrum[:300], rtol=1e-12)
    assert float((vectors @ vectors.T - q[:, :300] @ q[:, :300].T).abs().max()) < 1e-10


@pytest.mark.parametrize("layout", ["torch", "row-major"])
def test_cholesky_solve_equals_torchs(layout):
    n = solver.FAST_EIGH_MIN + 76  # large enough for SciPy's solves
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(n, n, dtype=torch.float64, generator=gen)
    lower = torch.linalg.cholesky(a @ a.T + n * torch.eye(n, dtype=torch.float64))  # column-major
    if layout == "row-major":
        lower = lower.contiguous()
    rhs = torch.randn(40, n, dtype=torch.float64, generator=gen).T  # a transposed view, as M passes it
    solution = solver.cholesky_solve(rhs, lower)
    reference = torch.cholesky_solve(rhs, lower)
    assert solution.shape == reference.shape
    assert float((solution - reference).abs().max() / reference.abs().max()) < 1e-12
