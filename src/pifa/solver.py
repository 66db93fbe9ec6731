"""Low-rank solvers: pure functions over tensors (float64), no modules, no hooks.

Notation: W is (m, n); statistics over calibration tokens are
G = sum x~ x~^T (n, n) on the compressed stream and H = sum x x~^T (n, n) pairing the
dense stream x with the compressed stream x~. Factors: up (m, r), down (r, n).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from .validate import all_finite

logger = logging.getLogger(__name__)


def scipy_threads() -> threadpool_limits:
    """SciPy's BLAS/LAPACK limited to torch's thread count (``--threads``), which it does not follow by itself."""
    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


def _blocks(n: int, blocks: int = 4) -> list[tuple[int, int]]:
    edges = [n * i // blocks for i in range(blocks + 1)]
    return list(zip(edges, edges[1:]))


def gram(a: torch.Tensor) -> torch.Tensor:
    """a^T a, exactly symmetric, in a's dtype: from 1024 columns on, only the blocks on and above the
    diagonal are multiplied (10 of 16) and mirrored."""
    n = a.shape[1]
    if n < 1024:
        return a.T @ a
    out = torch.empty(n, n, dtype=a.dtype, device=a.device)
    spans = _blocks(n)
    for i, (p, q) in enumerate(spans):
        for r, t in spans[i:]:
            torch.matmul(a[:, p:q].T, a[:, r:t], out=out[p:q, r:t])
            if r != p:
                out[r:t, p:q] = out[p:q, r:t].T
    return out


def add_gram(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """acc + x^T x in float64 for tokens x (t, n), the product in float32 (``gram``)."""
    product = gram(x.float())
    return product.double() if acc is None else acc.add_(product)


def times_lower(a: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """a @ lower for a lower-triangular ``lower``, skipping its zero upper blocks (about 40 % fewer
    flops than a dense product); one dense product below 1024 columns."""
    n = lower.shape[0]
    if n < 1024:
        return a @ lower
    out = torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device)
    for start, stop in _blocks(n):  # column block: the rows of ``lower`` above ``start`` are zero there
        torch.matmul(a[:, start:], lower[start:, start:stop], out=out[:, start:stop])
    return out


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


class Truncation(NamedTuple):
    """Rank-r factors of a truncation and the energy ||W L||_F^2 of the matrix it truncated.

    ``energy`` is the trace of W L L^T W^T (||W||_F^2 without whitening): with the statistics and the
    whitening factor it gives ||W X||^2 at no extra cost (``output_energy``).
    """

    up: torch.Tensor
    down: torch.Tensor
    energy: float


def truncate(weight: torch.Tensor, chol: torch.Tensor | None, rank: int) -> Truncation:
    """Rank-r factors minimising ||(W - up down) X||_F for X X^T = L L^T (plain SVD when L is None).

    With A = W L = U S V^T: up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T L^-1. The top-r singular
    triplets come from the eigen-decomposition of the smaller Gram matrix (A^T A or A A^T),
    several times cheaper than a full SVD and exact to round-off on the kept values. For a wide
    W, sqrt(S_r) V_r^T L^-1 = U_r^T W / sqrt(S_r): no triangular solve.
    """
    weight = weight.to(torch.float64)
    whitened = weight if chol is None else times_lower(weight, chol.to(torch.float64))
    wide = whitened.shape[0] < whitened.shape[1]  # decompose A A^T (m x m) rather than A^T A (n x n)
    product = gram(whitened.T) if wide else gram(whitened)
    energy = float(torch.diagonal(product).sum())
    values, vectors = top_eigenpairs(product, rank)
    del product
    s = values.clamp_min(0.0).sqrt()
    if wide and float(s[-1]) > float(s[0]) * 1e-6:  # vectors are U_r: sqrt(S_r) V_r^T L^-1 = U_r^T W / sqrt(S_r)
        return Truncation(vectors * s.sqrt(), (vectors.T @ weight) / s.sqrt()[:, None], energy)
    if float(s[-1]) <= float(s[0]) * 1e-6:  # tiny singular values: the Gram squares them away, use the SVD
        up, down = _svd_factors(whitened, rank)
    else:  # vectors are V_r; U_r sqrt(S_r) = A V_r / sqrt(S_r)
        up, down = (whitened @ vectors) / s.sqrt(), s.sqrt()[:, None] * vectors.T
    if chol is not None:  # down L = B  <=>  L^T down^T = B^T
        down = torch.linalg.solve_triangular(chol.T.to(torch.float64), down.T, upper=True).T
    return Truncation(up, down, energy)


FAST_EIGH_MIN = 1024  # below this size one float64 eigh of every eigenpair (or torch's Cholesky solve) is cheap


def top_eigenpairs(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues (descending) and orthonormal eigenvectors of a symmetric PSD float64 matrix.

    For a matrix of 1024 rows or more and k below its size: LAPACK's MRRR on the top k eigenpairs only, in
    float32 (two to three times faster than the float64 decomposition of all of them), the vectors then
    made orthonormal in float64 (Cholesky QR). A truncation onto them is an exact projection onto a
    subspace within float32 round-off of the top one; its error differs from the float64 truncation's
    only at second order (the relative difference is below 1e-6, see tests/test_solver.py). When the k-th
    eigenvalue is below 1e-3 of the largest (float32 cannot place such a cut) or LAPACK fails: MRRR on the
    top k in float64 (about 1.7 times faster than torch's decomposition of all of them, the same pairs to
    float64 round-off), and torch's decomposition when that fails too.
    """
    n = matrix.shape[0]
    if n >= FAST_EIGH_MIN and k < n and matrix.device.type == "cpu":
        top = _mrrr_top(matrix.float().numpy(), k)
        # float32 resolves eigenvalues to about 1e-6 of the largest: near a cut far below that, use float64
        if top is not None and top[0][-1] >= 1e-3 * top[0][0] > 0:
            values, q = (torch.from_numpy(a.copy()).to(torch.float64) for a in top)
            factor, info = torch.linalg.cholesky_ex(q.T @ q)
            if int(info) == 0:
                return values, torch.linalg.solve_triangular(factor.T, q, upper=True, left=False)  # q R^-1
        logger.debug("float32 top eigenpairs failed or cannot resolve the cut; float64 MRRR")
        top = _mrrr_top(matrix.numpy(), k)
        if top is not None:
            return torch.from_numpy(top[0].copy()), torch.from_numpy(top[1].copy())
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


def _mrrr_top(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The top ``k`` eigenpairs of a symmetric ``matrix`` by LAPACK's MRRR (``syevr``) in its dtype, values
    descending, or None when LAPACK fails or returns non-finite vectors."""
    n = matrix.shape[0]
    try:
        with scipy_threads():  # the transpose is the same symmetric matrix, and Fortran-ordered: no copy
            values, vectors = scipy.linalg.eigh(matrix.T, subset_by_index=[n - k, n - 1], driver="evr",
                                                check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return None
    if not np.isfinite(vectors).all():
        return None
    return values[::-1], vectors[:, ::-1]


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
    product = gram(whitened.T) if whitened.shape[0] < whitened.shape[1] else gram(whitened)
    return torch.linalg.eigvalsh(product).flip(0).clamp_min(0.0).sqrt()


def output_error(weight: torch.Tensor, approx: torch.Tensor, g: torch.Tensor) -> float:
    """Relative calibration error ||(W - A) X||^2 / ||W X||^2 from G = X X^T."""
    weight, approx, g = weight.to(torch.float64), approx.to(torch.float64), g.to(torch.float64)
    diff = weight - approx
    denom = float(torch.einsum("ij,jk,ik->", weight, g, weight))
    return float(torch.einsum("ij,jk,ik->", diff, g, diff)) / max(denom, 1e-300)


def output_energy(weight: torch.Tensor, g: torch.Tensor, chol: torch.Tensor | None = None,
                  whitened_energy: float | None = None) -> float:
    """||W X||^2 = tr(W G W^T). Given the whitening factor L (L L^T = G + shift I) and ||W L||_F^2
    (``Truncation.energy``), from those in O(n^2): ||W L||^2 - shift ||W||^2, shift = (||L||^2 - tr G) / n."""
    weight, g = weight.to(torch.float64), g.to(torch.float64)
    if chol is None or whitened_energy is None:
        return float(torch.einsum("ij,jk,ik->", weight, g, weight))
    shift = (float(chol.to(torch.float64).square().sum()) - float(torch.diagonal(g).sum())) / g.shape[0]
    return whitened_energy - shift * float(weight.square().sum())


def lowrank_error(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, g: torch.Tensor,
                  energy: float, down_g: torch.Tensor | None = None) -> float:
    """``output_error`` of A = up down given ``energy`` = ||W X||^2, in O(r n^2) instead of O(m n^2)
    (in O(r m n) given ``down_g`` = down G): ||(W - A) X||^2 = tr(W G W^T) - 2 <W (down G)^T, up> +
    <up^T up, (down G) down^T>."""
    weight, up, down = (t.to(torch.float64) for t in (weight, up, down))
    down_g = down @ g.to(torch.float64) if down_g is None else down_g.to(torch.float64)  # (r, n)
    cross = float(torch.einsum("ij,ij->", weight @ down_g.T, up))
    inner = float(torch.einsum("ij,ij->", up.T @ up, down_g @ down.T))
    return max(energy - 2 * cross + inner, 0.0) / max(energy, 1e-300)


def m_objective(
    weight: torch.Tensor, approx: torch.Tensor, g: torch.Tensor, cross: torch.Tensor, ridge: float
) -> float:
    """M's objective up to a constant: ||A X~ - Y||^2 + mu ||A - W||^2 with Y X~^T = W K.

    ``cross`` is K = (1 - lam) G + lam H; ``ridge`` mu is absolute here.
    """
    a = approx.to(torch.float64)
    fit = torch.einsum("ij,jk,ik->", a, g, a) - 2 * torch.einsum("ij,ij->", a, weight @ cross)
    return float(fit + ridge * (a - weight).square().sum())


def cholesky_solve(rhs: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """X with L L^T X = rhs for a lower Cholesky factor L, as ``torch.cholesky_solve``. On CPU, for an L of
    1024 rows or more, by SciPy's LAPACK: its two triangular solves take about half of torch's time on this
    project's machines (the same solution to round-off). Smaller systems stay with torch: there the time
    is in the calls, and SciPy's BLAS threads would compete with torch's for the cores."""
    if lower.device.type != "cpu" or lower.shape[0] < FAST_EIGH_MIN:
        return torch.cholesky_solve(rhs, lower)
    # LAPACK reads a Fortran-ordered array without a copy: L itself (torch's factors are) or else L^T
    factor = (lower.numpy(), True) if lower.T.is_contiguous() else (lower.numpy().T, False)
    with scipy_threads():
        solution = scipy.linalg.cho_solve(factor, rhs.numpy(), check_finite=False)
    return torch.from_numpy(solution)


class SingularSystem(ValueError):
    """A normal-equation system of M was singular (e.g. a dead layer); the caller keeps its start."""


def _solve_left(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """system^-1 @ rhs for a symmetric positive (semi)definite system: Cholesky, LU if that fails.

    A singular system raises ``SingularSystem``.
    """
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution = cholesky_solve(rhs, factor)
    else:
        solution, info = torch.linalg.solve_ex(system, rhs)
        if int(info) != 0:
            raise SingularSystem("singular system in the M reconstruction")
    if not all_finite(solution):
        raise SingularSystem("singular system in the M reconstruction")
    return solution


def m_target(weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None, mix: float,
             ridge: float, wh: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(Y X~^T + mu W, mu) for M: W ((1 - mix) G + mix H) + mu W, mu = ridge * mean(diag G).

    ``wh``, when given, is W H itself (m, n), e.g. summed from the dense outputs as sum y x~^T, which is
    cheaper than H for a layer whose outputs are narrower than its inputs; ``h`` is then not needed.
    """
    weight = weight.to(torch.float64)
    mu = ridge * _mean_diag(g)
    if wh is not None:
        base = wh.to(torch.float64, copy=True).mul_(mix).add_(weight, alpha=mu)
        return torch.addmm(base, weight, g.to(torch.float64), alpha=1 - mix), mu
    if h is None:
        raise ValueError("M needs the dense stream's statistics H or W H")
    cross = h.to(torch.float64, copy=True).mul_(mix).add_(g.to(torch.float64), alpha=1 - mix)  # one (n, n) temporary
    return torch.addmm(weight, weight, cross, beta=mu), mu


class Reconstruction(NamedTuple):
    """M's factors, and down G (r, n), which the calibration error needs (``lowrank_error``), for free."""

    up: torch.Tensor
    down: torch.Tensor
    down_g: torch.Tensor


def m_reconstruct(
    weight: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor | None,
    mix: float,
    steps: int,
    ridge: float,
    wh: torch.Tensor | None = None,
) -> Reconstruction:
    """M: alternate U- and V-steps toward Y = (1 - mix) W x~ + mix W x.

    Both steps minimise the same objective ||U V X~ - Y||^2 + mu ||U V - W||^2
    (mu = ridge * mean(diag G)) exactly in one factor, so it never increases.
    Shapes: weight (m, n), up (m, r), down (r, n), g and h (n, n) (or wh = W H (m, n), see
    ``m_target``). Every system is symmetric positive definite and solved by Cholesky; G + mu I is
    factorised once. Raises ``SingularSystem`` when a step's system is singular (a rank-deficient layer).
    """
    g = g.to(torch.float64)
    up, down = up.to(torch.float64), down.to(torch.float64)
    target, mu = m_target(weight, g, h, mix, ridge, wh)  # Y X~^T + mu W, (m, n)
    g_mu = _shifted(g, mu)  # G + mu I, the only extra (n, n) matrix
    g_factor, info = torch.linalg.cholesky_ex(g_mu)
    if int(info) != 0:
        raise SingularSystem("G + mu I is not positive definite in the M reconstruction")
    down_g = down @ g_mu  # V (G + mu I)
    del g_mu  # one (n, n) matrix less from here on
    for _ in range(steps):
        # U-step: U (V (G + mu I) V^T) = (Y X~^T + mu W) V^T
        system = down_g @ down.T
        up = _solve_left((system + system.T) / 2, down @ target.T).T
        # V-step: (U^T U) V (G + mu I) = U^T (Y X~^T + mu W)
        rhs = _solve_left(up.T @ up, up.T @ target)  # (U^T U)^-1 U^T (...); lstsq is not deterministic on CPU
        down = cholesky_solve(rhs.T, g_factor).T
        down_g = rhs  # V (G + mu I) = rhs by construction: the next U-step needs no (r, n) x (n, n) product
        if not all_finite(down):
            raise SingularSystem("singular system in the M reconstruction")
    return Reconstruction(up, down, down_g.sub_(down, alpha=mu) if steps else down_g - mu * down)
