"""Low-rank solvers: pure functions over tensors (float64), no modules, no hooks.

Notation: W is (m, n); statistics over calibration tokens are
G = sum x~ x~^T (n, n) on the compressed stream and H = sum x x~^T (n, n) pairing the
dense stream x with the compressed stream x~. Factors: up (m, r), down (r, n).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def _mean_diag(g: torch.Tensor) -> float:
    value = float(torch.diagonal(g).mean())
    return value if value > 0 else 1.0


def whitening(g: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor L (n, n) of G + delta I, delta = damping * mean(diag G).

    A failed factorization is not an error: the matrix is shifted by its smallest
    eigenvalue (plus the damping) and the shift is logged.
    """
    g = g.to(torch.float64)
    dead = int((torch.diagonal(g) <= 0).sum())
    if dead:
        logger.warning("%d of %d input channels are always zero (dead): X X^T is singular, damping it",
                       dead, g.shape[0])
    delta = max(damping, 1e-12) * _mean_diag(g)
    chol, info = torch.linalg.cholesky_ex(_shifted(g, delta))
    if int(info) == 0:
        return chol
    smallest = float(torch.linalg.eigvalsh(g).min())
    shift = -smallest + delta * 10
    logger.warning("Cholesky failed (smallest eigenvalue %.3g); shifting the statistics by %.3g", smallest, shift)
    chol, info = torch.linalg.cholesky_ex(_shifted(g, shift))
    if int(info) != 0:
        logger.warning("Cholesky failed again; falling back to plain SVD (no whitening) for this layer")
        return torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return chol


def _shifted(g: torch.Tensor, shift: float) -> torch.Tensor:
    """G + shift I as one new (n, n) matrix (no identity matrix is materialised)."""
    out = g.clone()
    out.diagonal().add_(shift)
    return out


def truncate(weight: torch.Tensor, chol: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors minimising ||(W - up down) X||_F for X X^T = L L^T (plain SVD when L is None).

    With A = W L = U S V^T: up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T L^-1. The top-r singular
    triplets come from the eigen-decomposition of the smaller Gram matrix (A^T A or A A^T),
    several times cheaper than a full SVD and exact to round-off on the kept values.
    """
    whitened = weight.to(torch.float64) if chol is None else weight.to(torch.float64) @ chol
    wide = whitened.shape[0] < whitened.shape[1]  # decompose A A^T (m x m) rather than A^T A (n x n)
    values, vectors = torch.linalg.eigh(whitened @ whitened.T if wide else whitened.T @ whitened)
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    s = values.clamp_min(0.0).sqrt()
    if float(s[-1]) <= float(s[0]) * 1e-6:  # tiny singular values: the Gram squares them away, use the SVD
        up, down = _svd_factors(whitened, rank)
    elif wide:  # vectors are U_r; sqrt(S_r) V_r^T = U_r^T A / sqrt(S_r)
        up, down = vectors * s.sqrt(), (vectors.T @ whitened) / s.sqrt()[:, None]
    else:  # vectors are V_r; U_r sqrt(S_r) = A V_r / sqrt(S_r)
        up, down = (whitened @ vectors) / s.sqrt(), s.sqrt()[:, None] * vectors.T
    if chol is not None:  # down L = B  <=>  L^T down^T = B^T
        down = torch.linalg.solve_triangular(chol.T, down.T, upper=True).T
    return up, down


def _svd_factors(whitened: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` factors of ``whitened`` by a full SVD, robust to zero singular values."""
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    s = s[:rank]
    # sqrt(S) on each side; a zero singular value keeps its unit column in ``up`` (and a zero
    # row in ``down``), so ``up`` always has full column rank and PIFA can pivot it.
    root = s.clamp_min(float(s[0]) * 1e-12 if float(s[0]) > 0 else 1.0).sqrt()
    return u[:, :rank] * root, (s / root)[:, None] * vh[:rank]


def singular_values(weight: torch.Tensor, chol: torch.Tensor | None) -> torch.Tensor:
    """Singular values of W L (of W when L is None), descending, float64: from the smaller Gram's eigenvalues."""
    whitened = weight.to(torch.float64) if chol is None else weight.to(torch.float64) @ chol
    gram = whitened @ whitened.T if whitened.shape[0] < whitened.shape[1] else whitened.T @ whitened
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0).sqrt()


def output_error(weight: torch.Tensor, approx: torch.Tensor, g: torch.Tensor) -> float:
    """Relative calibration error ||(W - A) X||^2 / ||W X||^2 from G = X X^T."""
    weight, approx, g = weight.to(torch.float64), approx.to(torch.float64), g.to(torch.float64)
    diff = weight - approx
    denom = float(torch.einsum("ij,jk,ik->", weight, g, weight))
    return float(torch.einsum("ij,jk,ik->", diff, g, diff)) / max(denom, 1e-300)


def m_objective(
    weight: torch.Tensor, approx: torch.Tensor, g: torch.Tensor, cross: torch.Tensor, ridge: float
) -> float:
    """M's objective up to a constant: ||A X~ - Y||^2 + mu ||A - W||^2 with Y X~^T = W K.

    ``cross`` is K = (1 - lam) G + lam H; ``ridge`` mu is absolute here.
    """
    a = approx.to(torch.float64)
    fit = torch.einsum("ij,jk,ik->", a, g, a) - 2 * torch.einsum("ij,ij->", a, weight @ cross)
    return float(fit + ridge * (a - weight).square().sum())


class SingularSystem(ValueError):
    """A normal-equation system of M was singular (e.g. a dead layer); the caller keeps its start."""


def _solve_left(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """system^-1 @ rhs for a symmetric positive (semi)definite system: Cholesky, LU if that fails.

    A singular system raises ``SingularSystem``.
    """
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
    else:
        solution, info = torch.linalg.solve_ex(system, rhs)
        if int(info) != 0:
            raise SingularSystem("singular system in the M reconstruction")
    if not bool(torch.isfinite(solution).all()):
        raise SingularSystem("singular system in the M reconstruction")
    return solution


def m_target(weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor, mix: float,
             ridge: float) -> tuple[torch.Tensor, float]:
    """(Y X~^T + mu W, mu) for M: W ((1 - mix) G + mix H) + mu W, mu = ridge * mean(diag G)."""
    weight = weight.to(torch.float64)
    mu = ridge * _mean_diag(g)
    cross = h.to(torch.float64, copy=True).mul_(mix).add_(g.to(torch.float64), alpha=1 - mix)  # one (n, n) temporary
    return torch.addmm(weight, weight, cross, beta=mu), mu


def m_reconstruct(
    weight: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    mix: float,
    steps: int,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M: alternate U- and V-steps toward Y = (1 - mix) W x~ + mix W x.

    Both steps minimise the same objective ||U V X~ - Y||^2 + mu ||U V - W||^2
    (mu = ridge * mean(diag G)) exactly in one factor, so it never increases.
    Shapes: weight (m, n), up (m, r), down (r, n), g and h (n, n). Every system is symmetric
    positive definite and solved by Cholesky; G + mu I is factorised once.
    Raises ``SingularSystem`` when a step's system is singular (a rank-deficient layer).
    """
    g = g.to(torch.float64)
    up, down = up.to(torch.float64), down.to(torch.float64)
    target, mu = m_target(weight, g, h, mix, ridge)  # Y X~^T + mu W, (m, n)
    g_mu = _shifted(g, mu)  # G + mu I, the only extra (n, n) matrix
    g_factor, info = torch.linalg.cholesky_ex(g_mu)
    if int(info) != 0:
        raise SingularSystem("G + mu I is not positive definite in the M reconstruction")
    for _ in range(steps):
        # U-step: U (V (G + mu I) V^T) = (Y X~^T + mu W) V^T
        up = _solve_left(down @ g_mu @ down.T, down @ target.T).T
        # V-step: (U^T U) V (G + mu I) = U^T (Y X~^T + mu W)
        rhs = _solve_left(up.T @ up, up.T @ target)  # (U^T U)^-1 U^T (...); lstsq is not deterministic on CPU
        down = torch.cholesky_solve(rhs.T, g_factor).T
        if not bool(torch.isfinite(down).all()):
            raise SingularSystem("singular system in the M reconstruction")
    return up, down
