"""Pivoting factorization (PIFA) maths: pure functions over tensors, no modules.

A rank-r matrix ``W = up @ down`` (``up``: m x r, ``down``: r x n) has r linearly
independent rows ``P`` (the pivot rows); every other row is a fixed combination of
them: ``W[NP] = coeff @ W[P]`` with ``coeff`` of shape (m - r) x r.  Because ``down``
has full row rank, rows of ``W`` are independent exactly when the same rows of ``up``
are, so pivots are chosen on ``up`` (O(m r^2)), never on the dense m x n product.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch

from .solver import scipy_threads
from .validate import all_finite

logger = logging.getLogger(__name__)

PivotMethod = Literal["lu", "qr"]
PIVOT_METHODS: tuple[str, ...] = ("lu", "qr")
DEFAULT_PIVOT_METHOD: PivotMethod = "lu"
# Coefficients above this magnitude amplify rounding error in low precision.
LARGE_COEFF = 1e3


@dataclass(frozen=True)
class Pivoting:
    """Result of pivot selection, in float64.

    Attributes:
        pivot_index: (r,) int64, the pivot rows ``P`` of ``W``.
        other_index: (m - r,) int64, the remaining rows ``NP``, in increasing order.
        coeff: (m - r, r) float64, ``W[NP] = coeff @ W[P]``.
    """

    pivot_index: torch.Tensor
    other_index: torch.Tensor
    coeff: torch.Tensor


def check_factors(up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` unless ``up`` (m x r), ``down`` (r x n) and ``bias`` (m,) are floating-point tensors
    holding values (not on the meta device) that agree and are finite."""
    for name, tensor in (("up", up), ("down", down), ("bias", bias)):
        if tensor is None and name == "bias":
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"factor '{name}' must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"factor '{name}' is {str(tensor.dtype).removeprefix('torch.')}; factors must be "
                             "floating point (float32, float64, bfloat16 or float16)")
        if tensor.is_meta:
            raise ValueError(f"factor '{name}' is on the meta device and holds no values")
    if up.dim() != 2 or down.dim() != 2:
        raise ValueError(f"factors must be 2-D, got up {tuple(up.shape)} and down {tuple(down.shape)}")
    if up.shape[1] != down.shape[0]:
        raise ValueError(
            f"factor shapes disagree: up {tuple(up.shape)} needs down with {up.shape[1]} rows, "
            f"got down {tuple(down.shape)}"
        )
    m, r = up.shape
    n = down.shape[1]
    if r < 1 or r > min(m, n):
        raise ValueError(f"rank {r} is outside [1, min(out, in) = {min(m, n)}]")
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features {m}")
    for name, tensor in (("up", up), ("down", down), ("bias", bias)):
        if tensor is not None and not all_finite(tensor):
            raise ValueError(f"factor '{name}' has non-finite values (NaN or Inf)")


def _deficiency_tolerance(diag: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """numpy.linalg.matrix_rank's tolerance at float32 precision (float64 for float64 factors).

    Low-precision factors (bf16/fp16) are stored coarsely but their rows are still
    independent: judging them at their own epsilon would call almost everything deficient.
    """
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return float(diag.abs().max()) * max(shape) * eps


def _raise_if_deficient(diag: torch.Tensor, up64: torch.Tensor, dtype: torch.dtype) -> None:
    """Detect deficiency on the LU/QR diagonal; count independent rows with singular values.

    The triangular diagonal is a cheap detector but not rank-revealing (LU can report 3
    "independent" rows of a rank-2 matrix), so the count in the message comes from an SVD,
    computed only on this error path.
    """
    shape = tuple(up64.shape)
    if int((diag.abs() > _deficiency_tolerance(diag, shape, dtype)).sum()) == diag.numel():
        return
    singular = torch.linalg.svdvals(up64)
    independent = int((singular > _deficiency_tolerance(singular, shape, dtype)).sum())
    raise ValueError(
        f"rank-deficient factors: 'up' {shape} has only {independent} independent rows "
        f"for rank {diag.numel()}; use a smaller rank"
    )


def _lu_pivots(up64: torch.Tensor, dtype: torch.dtype) -> Pivoting:
    """LU with partial pivoting of ``up`` (m x r): ``up[perm] = L U``; C = L21 L11^-1."""
    m, r = up64.shape
    lu, pivots, _ = torch.linalg.lu_factor_ex(up64)  # exact zero pivots: reported below
    _raise_if_deficient(torch.diagonal(lu), up64, dtype)
    perm = _swaps_to_permutation(pivots.cpu().numpy() - 1, m)
    unit_lower = torch.tril(lu, diagonal=-1) + torch.eye(m, r, dtype=lu.dtype, device=lu.device)
    l11, l21 = unit_lower[:r], unit_lower[r:]
    # C L11 = L21  <=>  L11^T C^T = L21^T (upper triangular solve).
    coeff = torch.linalg.solve_triangular(l11.T, l21.T, upper=True, unitriangular=True).T
    perm_t = torch.from_numpy(perm).to(up64.device)
    return _ordered(perm_t[:r], perm_t[r:], coeff)


def _swaps_to_permutation(swaps: np.ndarray, m: int) -> np.ndarray:
    """LAPACK row interchanges (0-based, applied in order) -> row permutation of length m."""
    perm = np.arange(m)
    for i, j in enumerate(swaps):
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _qr_pivots(up64: torch.Tensor, dtype: torch.dtype) -> Pivoting:
    """QR with column pivoting of ``up^T`` (r x m): ``up^T Pi = Q [R11 R12]``; C = (R11^-1 R12)^T."""
    m, r = up64.shape
    with scipy_threads():
        rmat, perm = scipy.linalg.qr(up64.T.cpu().numpy(), mode="r", pivoting=True, check_finite=False)
    rmat = torch.from_numpy(rmat[:r]).to(up64.device)
    _raise_if_deficient(torch.diagonal(rmat), up64, dtype)
    coeff = torch.linalg.solve_triangular(rmat[:, :r], rmat[:, r:], upper=True).T
    perm_t = torch.from_numpy(perm.astype(np.int64)).to(up64.device)
    return _ordered(perm_t[:r], perm_t[r:], coeff)


def _ordered(pivot_index: torch.Tensor, other_index: torch.Tensor, coeff: torch.Tensor) -> Pivoting:
    """Sort the pivot set and the non-pivot set (a canonical order), permuting coeff to match."""
    pivot_sorted, pivot_order = torch.sort(pivot_index)
    other_sorted, other_order = torch.sort(other_index)
    coeff = coeff[other_order][:, pivot_order].contiguous()
    return Pivoting(pivot_sorted, other_sorted, coeff)


def select_pivots(up: torch.Tensor, method: PivotMethod = DEFAULT_PIVOT_METHOD) -> Pivoting:
    """Choose r pivot rows of ``up`` (m x r) and the coefficients of the other rows.

    The maths runs in float64 on ``up``'s device (QR runs on the CPU through SciPy).
    Raises ``ValueError`` when ``up`` has fewer than r independent rows.
    """
    if method not in PIVOT_METHODS:
        raise ValueError(f"unknown pivot method {method!r}; choose one of {PIVOT_METHODS}")
    up64 = up.detach().to(torch.float64)
    pivoting = _lu_pivots(up64, up.dtype) if method == "lu" else _qr_pivots(up64, up.dtype)
    if pivoting.coeff.numel():
        largest = float(pivoting.coeff.abs().max())
        if largest > LARGE_COEFF:
            logger.warning("pivot coefficients reach %.3g: low-precision outputs may lose accuracy", largest)
    return pivoting


def pivot_factorize(
    up: torch.Tensor, down: torch.Tensor, method: PivotMethod = DEFAULT_PIVOT_METHOD
) -> tuple[Pivoting, torch.Tensor]:
    """PIFA of ``W = up @ down``: returns the pivoting and the pivot rows ``W[P] = up[P] @ down`` (r x n, float64)."""
    check_factors(up, down)
    pivoting = select_pivots(up, method)
    up64 = up.detach().to(torch.float64)
    pivot_rows = up64[pivoting.pivot_index.to(up.device)] @ down.detach().to(torch.float64)
    return pivoting, pivot_rows
