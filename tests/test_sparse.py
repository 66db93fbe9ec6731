"""Sparse baselines: exact mask counts, identities and the SparseGPT inequality."""

from __future__ import annotations

import pytest
import torch

from pifa import sparse

METHODS = sparse.RULES


def layer(m: int = 12, n: int = 32, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random W (m, n) without exact zeros and G = X X^T of correlated inputs X (n, tokens)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen)
    w = torch.where(w.abs() < 1e-3, torch.full_like(w, 1e-2), w)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5
    scale = torch.linspace(0.2, 3.0, n, dtype=torch.float64)[:, None]
    x = scale * (mix @ torch.randn(n, tokens, generator=gen, dtype=torch.float64)
                 + 0.3 * torch.randn(n, tokens, generator=gen, dtype=torch.float64))
    return w, x @ x.T


def calib_error(w: torch.Tensor, pruned: torch.Tensor, g: torch.Tensor) -> float:
    """||(W - W') X||_F^2 = tr((W - W') G (W - W')^T)."""
    d = (w - pruned).to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", d, g, d))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", METHODS)
def test_nm_every_group_keeps_exactly_n(method: str, pattern: str) -> None:
    w, g = layer()
    nm = sparse.parse_pattern(pattern)
    density = sparse.resolve_density(pattern, None)
    out = sparse.prune(method, w, g, density, nm)
    assert out.shape == w.shape and out.dtype == w.dtype
    counts = (out != 0).reshape(w.shape[0], -1, nm[1]).sum(dim=-1)
    assert torch.all(counts == nm[0])


@pytest.mark.parametrize("density", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("method", METHODS)
def test_unstructured_exact_count_per_row(method: str, density: float) -> None:
    w, g = layer(n=40)
    out = sparse.prune(method, w, g, sparse.resolve_density("unstructured", density), None)
    assert torch.all((out != 0).sum(dim=1) == round(density * 40))


def test_sparsegpt_unstructured_exact_count_across_blocks() -> None:
    w, g = layer(n=50)
    out = sparse.sparsegpt(w, g, 0.3, None, block_size=16)
    assert torch.all((out != 0).sum(dim=1) == round(0.3 * 50))


def test_kept_weights_unchanged_except_sparsegpt() -> None:
    w, g = layer()
    for method in ("magnitude", "wanda", "ria"):
        out = sparse.prune(method, w, g, 0.5, (2, 4))
        kept = out != 0
        assert torch.equal(out[kept], w[kept])


@pytest.mark.parametrize("pattern,density", [("2:4", None), ("unstructured", 0.5)])
def test_sparsegpt_beats_magnitude_on_calibration(pattern: str, density: float | None) -> None:
    w, g = layer(m=16, n=64, tokens=512, seed=1)
    nm = sparse.parse_pattern(pattern)
    d = sparse.resolve_density(pattern, density)
    err_gpt = calib_error(w, sparse.prune("sparsegpt", w, g, d, nm), g)
    err_mag = calib_error(w, sparse.prune("magnitude", w, g, d, nm), g)
    assert err_gpt <= err_mag


def test_sparsegpt_small_blocks_and_dead_inputs() -> None:
    w, g = layer(n=24)
    g[5, :] = 0.0
    g[:, 5] = 0.0
    out = sparse.sparsegpt(w, g, 0.5, (2, 4), block_size=6)  # rounded down to 4
    assert torch.all(out[:, 5] == 0)
    assert torch.all(torch.isfinite(out))
    mask = out != 0
    assert torch.all(mask.reshape(w.shape[0], -1, 4).sum(-1) <= 2)


@pytest.mark.parametrize("nm,density", [((2, 4), 0.5), (None, 0.5), (None, 0.3)])
def test_wanda_equals_magnitude_for_isotropic_inputs(nm: tuple[int, int] | None, density: float) -> None:
    w, _ = layer()
    g = 2.5 * torch.eye(w.shape[1], dtype=torch.float64)
    mag = sparse.keep_mask(sparse.magnitude_scores(w), density, nm)
    wanda = sparse.keep_mask(sparse.wanda_scores(w, g), density, nm)
    assert torch.equal(mag, wanda)
    assert torch.equal(sparse.prune("wanda", w, g, density, nm), sparse.prune("magnitude", w, g, density, nm))


def test_ria_matches_direct_loop() -> None:
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-4.0, 5.0, -0.25, 6.0], [7.0, -1.5, 2.0, -8.0]])
    g = torch.diag(torch.tensor([1.0, 4.0, 9.0, 0.25], dtype=torch.float64))
    got = sparse.ria_scores(w, g)
    m, n = w.shape
    for i in range(m):
        for j in range(n):
            a = abs(float(w[i, j]))
            row = sum(abs(float(w[i, k])) for k in range(n))
            col = sum(abs(float(w[k, j])) for k in range(m))
            expected = (a / row + a / col) * (float(g[j, j]) ** 0.5) ** 0.5  # ||X_j||_2 ** 0.5
            assert abs(float(got[i, j]) - expected) < 1e-12


def test_keep_mask_ties_are_deterministic() -> None:
    scores = torch.ones(2, 8, dtype=torch.float64)
    mask = sparse.keep_mask(scores, 0.5, (2, 4))
    expected = torch.tensor([True, True, False, False] * 2)
    assert torch.equal(mask[0], expected) and torch.equal(mask[1], expected)
    assert torch.equal(sparse.keep_mask(scores, 0.25, None)[0], torch.tensor([True, True] + [False] * 6))


def test_parse_and_density() -> None:
    assert sparse.parse_pattern("unstructured") is None
    assert sparse.parse_pattern("2:4") == (2, 4)
    assert sparse.pattern_density("4:8") == 0.5
    assert sparse.pattern_density("unstructured") is None
    assert sparse.resolve_density("2:4", None) == 0.5
    assert sparse.resolve_density("2:4", 0.5) == 0.5
    assert sparse.resolve_density("unstructured", 0.3) == 0.3


@pytest.mark.parametrize("pattern", ["4:2", "a:b", "0:4", "2:2", "2:4:8", "dense", "-1:4"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="needs positive integers N < M") as info:
        sparse.parse_pattern(pattern)
    assert repr(pattern) in str(info.value)


def test_bad_width_density_and_method() -> None:
    w, g = layer(n=30)
    with pytest.raises(ValueError, match="input width 30 is not divisible by M=4 of pattern 2:4"):
        sparse.keep_mask(sparse.magnitude_scores(w), 0.5, (2, 4))
    for method in METHODS:
        with pytest.raises(ValueError, match="not divisible"):
            sparse.prune(method, w, g, 0.5, (2, 4))
    with pytest.raises(ValueError, match=r"density 0.6 contradicts pattern 2:4 \(density 0.5\)"):
        sparse.resolve_density("2:4", 0.6)
    for bad in (None, 0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="density in"):
            sparse.resolve_density("unstructured", bad)
    with pytest.raises(ValueError, match="'obs'"):
        sparse.prune("obs", w, g, 0.5, None)
