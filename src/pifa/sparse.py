"""Sparse baselines (magnitude, Wanda, RIA, SparseGPT): pure functions over tensors.

Notation: W is (m, n) = (out, in); G = sum over tokens x x^T is the (n, n) calibration
statistic (float64), so the input norms are ||X_j||_2 = sqrt(G_jj). "density" is the KEPT
fraction. A pattern is "unstructured" or "N:M" (keep N of every M consecutive inputs of a
row). Unstructured keeps exactly round(density * n) weights in every row (Python's round).

Channel permutation (RIA, Zhang et al. ICLR 2024) for N:M: ``prune_permuted`` chooses a per-linear
input order ``perm`` in which the N:M groups keep the most score, prunes W[:, perm] there and writes
the result back in the ORIGINAL input order, so the layer needs no runtime permutation: the stored
weight W' satisfies W' x = P x[perm] with P = W'[:, perm] N:M in every group of M consecutive inputs.
A hardware N:M kernel needs P (W' permuted), or the producer of x permuted, to run it.
"""

from __future__ import annotations

import heapq
import logging

import torch

logger = logging.getLogger(__name__)

RULES = ("magnitude", "wanda", "ria", "sparsegpt")
_TOL = 1e-9


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M) with positive integers N < M."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":")
    try:
        n_keep, group = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        n_keep, group = 0, 0
    if not 0 < n_keep < group:
        raise ValueError(f"pattern {pattern!r} needs positive integers N < M (or 'unstructured')")
    return n_keep, group


def pattern_density(pattern: str) -> float | None:
    """N/M for an "N:M" pattern, None for "unstructured"."""
    nm = parse_pattern(pattern)
    return None if nm is None else nm[0] / nm[1]


def resolve_density(pattern: str, density: float | None) -> float:
    """The kept fraction: N/M for "N:M" (a contradicting density is an error), else `density` in (0, 1]."""
    nm = parse_pattern(pattern)
    if nm is not None and density is None:
        return nm[0] / nm[1]
    return _checked_density(density, nm)


def _checked_density(density: float | None, nm: tuple[int, int] | None) -> float:
    """``density`` if it is in (0, 1] and, for an N:M pattern, equals N/M; else ``ValueError``."""
    if nm is not None:
        implied = nm[0] / nm[1]
        if density is not None and abs(density - implied) > _TOL:
            raise ValueError(f"density {density} contradicts pattern {nm[0]}:{nm[1]} (density {implied})")
        return implied
    if density is None or not 0.0 < density <= 1.0:
        raise ValueError(f"unstructured sparsity needs a density in (0, 1], got {density}")
    return float(density)


def kept_per_row(density: float, n: int) -> int:
    """Number of weights kept in a row of width n for unstructured sparsity: round(density * n)."""
    return int(round(density * n))


# ----------------------------------------------------------------------------- scores

def _input_norms(g: torch.Tensor) -> torch.Tensor:
    """||X_j||_2 = sqrt(G_jj), shape (n,), float64."""
    return torch.diagonal(g).to(torch.float64).clamp_min(0.0).sqrt()


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """|W| (m, n), float64."""
    return w.to(torch.float64).abs()


def wanda_scores(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2, shape (m, n), float64."""
    return magnitude_scores(w) * _input_norms(g).to(w.device)[None, :]


def ria_scores(w: torch.Tensor, g: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """RIA: (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** power, shape (m, n)."""
    a = magnitude_scores(w)
    tiny = torch.finfo(torch.float64).tiny
    row = a.sum(dim=1, keepdim=True).clamp_min(tiny)   # sum over inputs of row i
    col = a.sum(dim=0, keepdim=True).clamp_min(tiny)   # sum over outputs of column j
    return (a / row + a / col) * _input_norms(g).to(w.device)[None, :] ** power


# ----------------------------------------------------------------------------- masks

def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping the k largest entries along the last dim; ties go to lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, order[..., :k], True)


def _check_width(n: int, nm: tuple[int, int]) -> None:
    if n % nm[1]:
        raise ValueError(f"input width {n} is not divisible by M={nm[1]} of pattern {nm[0]}:{nm[1]}")


def keep_mask(scores: torch.Tensor, density: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Boolean keep-mask (m, n): per row the round(density * n) largest scores (nm None), or in
    every group of M consecutive inputs of every row the N largest (density must equal N/M)."""
    m, n = scores.shape
    density = _checked_density(density, nm)
    if nm is None:
        return _top_mask(scores, kept_per_row(density, n))
    _check_width(n, nm)
    return _top_mask(scores.reshape(m, n // nm[1], nm[1]), nm[0]).reshape(m, n)


def prune(method: str, w: torch.Tensor, g: torch.Tensor | None, density: float,
          nm: tuple[int, int] | None) -> torch.Tensor:
    """Prune W (m, n) with `method` in RULES; returns a tensor of W's shape and dtype with
    the pruned weights zero (SparseGPT also updates the kept ones). G (n, n) may be None
    only for magnitude."""
    if method not in RULES:
        raise ValueError(f"unknown sparsity method {method!r}; expected one of {', '.join(RULES)}")
    if method != "magnitude" and g is None:
        raise ValueError(f"sparsity method {method!r} needs the calibration statistic G")
    if method == "sparsegpt":
        return sparsegpt(w, g, density, nm)
    if method == "magnitude":
        scores = magnitude_scores(w)
    elif method == "wanda":
        scores = wanda_scores(w, g)
    else:
        scores = ria_scores(w, g)
    return w * keep_mask(scores, density, nm).to(w.device)


# ----------------------------------------------------------------------------- channel permutation

def permutation_scores(method: str, w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """The score a channel permutation maximises the kept part of: the rule's own importance score
    (magnitude, Wanda, RIA); for SparseGPT, whose mask is chosen during its solve, Wanda's |W| * ||x||."""
    if method not in RULES:
        raise ValueError(f"unknown sparsity method {method!r}; expected one of {', '.join(RULES)}")
    if method == "magnitude":
        return magnitude_scores(w)
    if g is None:
        raise ValueError(f"sparsity method {method!r} needs the calibration statistic G")
    return ria_scores(w, g) if method == "ria" else wanda_scores(w, g)


def kept_score(scores: torch.Tensor, nm: tuple[int, int], perm: torch.Tensor | None = None) -> float:
    """Sum over every row and every group of M consecutive inputs (after ``perm``: columns perm[0],
    perm[1], ...) of its N largest scores: what the N:M mask of these scores keeps."""
    m, n = scores.shape
    _check_width(n, nm)
    s = scores.to(torch.float64) if perm is None else scores.to(torch.float64)[:, perm]
    return float(s.reshape(m, n // nm[1], nm[1]).topk(nm[0], dim=-1).values.sum())


def _groups_kept(scores: torch.Tensor, groups: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Per group (G,): the summed N largest scores of its channels ``groups`` (G, M) in every row."""
    return scores[:, groups].topk(n_keep, dim=-1).values.sum(dim=(0, 2))


def _balanced_groups(scores: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """RIA's channel allocation: channels by their total score, largest first, each into the group
    (of those not yet full) with the least score so far, so heavy channels do not share a group."""
    n_groups, size = scores.shape[1] // nm[1], nm[1]
    mass = scores.sum(dim=0)
    order = torch.sort(mass, descending=True, stable=True).indices.tolist()
    heap = [(0.0, index) for index in range(n_groups)]
    members: list[list[int]] = [[] for _ in range(n_groups)]
    for channel in order:
        total, index = heapq.heappop(heap)
        members[index].append(channel)
        if len(members[index]) < size:
            heapq.heappush(heap, (total + float(mass[channel]), index))
    return torch.tensor(members, dtype=torch.long, device=scores.device)


def _gain_matrix(scores: torch.Tensor, rest: torch.Tensor, out: torch.Tensor, n_keep: int) -> torch.Tensor:
    """C (G, G): C[g, c] = kept score of group g's remaining channels ``rest[g]`` (M - 1) plus channel
    ``out[c]``. A row keeps its N largest; with the N-th largest remaining value t, adding v changes the
    kept sum by max(0, v - t)."""
    values = scores[:, rest]                                  # (m, G, M - 1)
    top = values.topk(n_keep, dim=-1).values                  # (m, G, N)
    base = top.sum(dim=(0, 2))                                # (G,)
    threshold = top[..., -1].float()                          # (m, G): the N-th largest remaining
    candidates = scores[:, out].float()                       # (m, G); float32 only ranks the assignments
    m, n_groups = threshold.shape
    gain = torch.zeros(n_groups, n_groups, dtype=torch.float32, device=scores.device)
    chunk = max(1, (1 << 22) // max(1, n_groups * n_groups))
    for start in range(0, m, chunk):
        t, v = threshold[start:start + chunk], candidates[start:start + chunk]
        gain += (v[:, None, :] - t[:, :, None]).clamp_min_(0.0).sum(dim=0)
    return base[:, None] + gain.double()


def nm_permutation(scores: torch.Tensor, nm: tuple[int, int], rounds: int | None = None) -> torch.Tensor:
    """A permutation ``perm`` (n,) of the inputs whose N:M groups (columns perm[k*M:(k+1)*M]) keep at
    least as much of ``scores`` (m, n) as the identity, and usually more. Deterministic.

    Start: the better of the identity and RIA's balanced allocation (:func:`_balanced_groups`). Then
    rounds of RIA's refinement: take the channel at position r mod M out of every group and put the
    G taken channels back, one per group, by a linear sum assignment that maximises the kept score
    (keeping them where they were is one of the assignments, so no round lowers it); a round is
    accepted only if the kept score rises. Stops after M rounds in a row without a gain or after
    ``rounds`` rounds (default 4 M). Groups are finally listed by their smallest channel, each in
    ascending order, so a permutation that changes nothing is the identity.
    """
    from scipy.optimize import linear_sum_assignment

    m, n = scores.shape
    _check_width(n, nm)
    n_keep, size = nm
    s = scores.detach().to(torch.float64)
    identity = torch.arange(n, device=s.device).reshape(n // size, size)
    balanced = _balanced_groups(s, nm)
    kept_identity = float(_groups_kept(s, identity, n_keep).sum())
    kept_balanced = float(_groups_kept(s, balanced, n_keep).sum())
    groups, best = (balanced, kept_balanced) if kept_balanced > kept_identity else (identity, kept_identity)
    rounds = 4 * size if rounds is None else rounds
    idle = 0
    for r in range(rounds):
        if idle >= size or groups.shape[0] < 2:
            break
        position = r % size
        keep = [p for p in range(size) if p != position]
        rest, out = groups[:, keep], groups[:, position]
        gain = _gain_matrix(s, rest, out, n_keep)
        rows, cols = linear_sum_assignment(gain.cpu().numpy(), maximize=True)
        candidate = groups.clone()
        candidate[torch.as_tensor(rows, device=s.device), position] = out[torch.as_tensor(cols, device=s.device)]
        total = float(_groups_kept(s, candidate, n_keep).sum())  # recomputed exactly: accept only a real gain
        if total > best * (1 + 1e-12):
            groups, best, idle = candidate, total, 0
        else:
            idle += 1
    groups = torch.sort(groups, dim=1).values
    groups = groups[torch.argsort(groups[:, 0])]
    return groups.reshape(n)


def is_nm(weight: torch.Tensor, nm: tuple[int, int]) -> bool:
    """Whether every group of M consecutive inputs of every row of ``weight`` has at most N non-zeros."""
    m, n = weight.shape
    return n % nm[1] == 0 and bool(((weight != 0).reshape(m, n // nm[1], nm[1]).sum(dim=-1) <= nm[0]).all())


def prune_permuted(method: str, w: torch.Tensor, g: torch.Tensor | None, density: float,
                   nm: tuple[int, int] | None, permute: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`prune` after RIA's channel permutation: (W', perm). W' has W's shape, dtype and input order;
    W'[:, perm] is N:M (perm chosen by :func:`nm_permutation` on :func:`permutation_scores`; SparseGPT
    solves column by column in the permuted order, with G permuted alike). perm is None when it is the
    identity or ``permute`` is false (then W' = prune(...) is N:M as stored)."""
    if not permute:
        return prune(method, w, g, density, nm), None
    if nm is None:
        raise ValueError("the channel permutation needs an N:M pattern (unstructured masks have no groups)")
    _checked_density(density, nm)
    _check_width(w.shape[1], nm)
    perm = nm_permutation(permutation_scores(method, w, g), nm).to(w.device)
    if torch.equal(perm, torch.arange(w.shape[1], device=w.device)):
        return prune(method, w, g, density, nm), None
    permuted = prune(method, w[:, perm], None if g is None else g[perm][:, perm], density, nm)
    out = torch.empty_like(permuted)
    out[:, perm] = permuted
    return out, perm


# ----------------------------------------------------------------------------- SparseGPT

def _hessian_inverse_chol(g: torch.Tensor, dead: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor U (n, n) of H^-1, H = G (dead H_jj := 1) + damping * mean(diag) * I."""
    h = g.to(torch.float64).clone()
    h[dead, dead] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    delta = max(damping, 1e-12) * float(torch.diagonal(h).mean())
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + delta * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        delta *= 10.0
        logger.warning("SparseGPT: Cholesky failed; raising the damping to %.3g", delta)
    raise ValueError("SparseGPT: the calibration statistic is not positive definite even after damping")


def _block_keep_counts(k_total: int, n: int, start: int, stop: int) -> int:
    """Kept weights per row in columns [start, stop): differences of round(k_total * c / n),
    which telescope to exactly k_total over the whole row."""
    def cum(c: int) -> int:
        return (2 * k_total * c + n) // (2 * n)
    return cum(stop) - cum(start)


def _sparsegpt_block(w1: torch.Tensor, hinv1: torch.Tensor, mask1: torch.Tensor | None,
                     nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune one column block W1 (m, c) column by column with OBS compensation inside the block.

    Hinv1 (c, c) is the block of the upper Cholesky factor of H^-1. For N:M the keep-mask is
    chosen adaptively per group of M columns; else `mask1` (m, c) is given. Returns the pruned
    block Q1, the scaled errors Err1 (m, c) and the keep-mask.
    """
    w1 = w1.clone()
    q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
    diag = torch.diagonal(hinv1)
    if mask1 is None:
        mask1 = torch.zeros(w1.shape, dtype=torch.bool, device=w1.device)
    for i in range(w1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            cols = slice(i, i + nm[1])
            scores = w1[:, cols] ** 2 / diag[cols][None, :] ** 2
            mask1[:, cols] = _top_mask(scores, nm[0])
        col = w1[:, i]
        q = torch.where(mask1[:, i], col, torch.zeros_like(col))
        q1[:, i] = q
        err = (col - q) / hinv1[i, i]
        w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
        err1[:, i] = err
    return q1, err1, mask1


def sparsegpt(w: torch.Tensor, g: torch.Tensor, density: float, nm: tuple[int, int] | None,
              block_size: int = 128, damping: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with error compensation, lazy batch updates.

    W (m, n), G (n, n). Mask score w^2 / U_jj^2 (U the upper Cholesky factor of H^-1); per block
    of columns, unstructured keeps the same per-row share of round(density * n) in every row,
    N:M keeps the N best of every M. Float64 on W's device; returns W's shape and dtype.
    """
    m, n = w.shape
    density = _checked_density(density, nm)
    if nm is not None:
        _check_width(n, nm)
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # groups never straddle blocks
    weight = w.detach().to(torch.float64).clone()
    g = g.to(device=w.device, dtype=torch.float64)
    dead = torch.diagonal(g) == 0
    weight[:, dead] = 0.0
    hinv = _hessian_inverse_chol(g, dead, damping)
    k_total = kept_per_row(density, n)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        w1, hinv1 = weight[:, start:stop], hinv[start:stop, start:stop]
        mask1 = None
        if nm is None:
            scores = w1 ** 2 / torch.diagonal(hinv1)[None, :] ** 2
            mask1 = _top_mask(scores, _block_keep_counts(k_total, n, start, stop))
        q1, err1, _ = _sparsegpt_block(w1, hinv1, mask1, nm)
        weight[:, start:stop] = q1
        weight[:, stop:] -= err1 @ hinv[start:stop, stop:]
    logger.debug("SparseGPT pruned a %dx%d layer to density %.4f", m, n, density)
    return weight.to(w.dtype)
