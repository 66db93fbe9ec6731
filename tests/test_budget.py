"""The budget's pure functions, directly: rank allocation, OWL densities, spectrum allocation, group inference."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import tiny_model
from pifa.budget import allocate_ranks, layer_parameters, owl_block_densities, rank_for_density
from pifa.capture import capture_block_inputs, infer_groups
from pifa.model import find_blocks, target_linears
from pifa.rank_search import spectrum_ranks

SHAPES = {"a": (64, 32), "b": (32, 32), "c": (96, 48), "d": (17, 40)}


@pytest.mark.parametrize("kind", ["pifa", "lowrank"])
@pytest.mark.parametrize("density", [0.2, 0.37, 0.5, 0.81])
def test_allocate_ranks_stays_within_budget_and_spends_it(kind, density):
    """Within budget; every rank is its floor or one step above; no module left at its floor could still
    take its step from what is left (one greedy pass over the fractional remainders)."""
    densities = dict(zip(SHAPES, [density, density * 0.9, min(1.0, density * 1.1), density]))
    ranks = allocate_ranks(SHAPES, densities, kind)
    budget = sum(densities[n] * m * k for n, (m, k) in SHAPES.items())
    used = sum(layer_parameters(m, k, ranks[n], kind) for n, (m, k) in SHAPES.items())
    assert used <= budget
    for name, (m, k) in SHAPES.items():
        floor = rank_for_density(m, k, densities[name], kind)
        assert ranks[name] in (floor, floor + 1)
        if ranks[name] == floor and floor < min(m, k):
            extra = layer_parameters(m, k, floor + 1, kind) - layer_parameters(m, k, floor, kind)
            assert used + extra > budget


@pytest.mark.parametrize("ratios, params", [([0.1, 0.3, 0.2], [10, 10, 10]), ([0.05, 0.5, 0.9, 0.2], [3, 1, 2, 5])])
def test_owl_block_densities_keep_the_weighted_mean(ratios, params):
    densities = owl_block_densities(ratios, params, 0.5, 0.08)
    mean = sum(d * p for d, p in zip(densities, params)) / sum(params)
    assert mean == pytest.approx(0.5, abs=1e-12)
    assert max(densities) - min(densities) == pytest.approx(2 * 0.08)  # spread over a range of 2 l
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    assert [densities[i] for i in order] == sorted(densities)  # more outliers keep more


def test_owl_without_spread_is_uniform():
    assert owl_block_densities([0.1, 0.2], [1, 1], 0.5, 0.0) == [0.5, 0.5]


def test_spectrum_gives_a_flat_spectrum_more_rank_than_a_cliff():
    shapes = {"flat": (32, 32), "cliff": (32, 32)}
    spectra = {"flat": torch.ones(32, dtype=torch.float64),
               "cliff": torch.cat([torch.full((4,), 10.0), torch.full((28,), 1e-3)]).double()}
    ranks, scores = spectrum_ranks(shapes, spectra, {"flat": 0.5, "cliff": 0.5}, "pifa")
    assert ranks["flat"] > ranks["cliff"] >= rank_for_density(32, 32, 0.1, "pifa")
    assert sum(layer_parameters(32, 32, r, "pifa") for r in ranks.values()) <= 0.5 * 2 * 32 * 32
    assert scores["cliff"] < 1e-6 < scores["flat"]


def test_spectrum_allocation_is_deterministic_and_respects_pools():
    g = torch.Generator().manual_seed(0)
    shapes = {f"l{i}": (48, 24 + 8 * i) for i in range(4)}
    spectra = {n: torch.rand(min(s), generator=g, dtype=torch.float64).sort(descending=True).values ** (i + 1)
               for i, (n, s) in enumerate(shapes.items())}
    densities = dict.fromkeys(shapes, 0.5)
    pools = {"l0": "x", "l1": "x", "l2": "y", "l3": "y"}
    first = spectrum_ranks(shapes, spectra, densities, "lowrank", pools=pools)
    assert spectrum_ranks(dict(reversed(shapes.items())), spectra, densities, "lowrank", pools=pools) == first
    for pool in ("x", "y"):
        names = [n for n in shapes if pools[n] == pool]
        used = sum(layer_parameters(*shapes[n], first[0][n], "lowrank") for n in names)
        assert used <= sum(0.5 * shapes[n][0] * shapes[n][1] for n in names)


def test_infer_groups_on_llama_follows_execution_order():
    model = tiny_model("llama")
    name, blocks = find_blocks(model)
    linears = target_linears(blocks[0], f"{name}.0", (), ())
    local = {n.removeprefix(f"{name}.0."): m for n, m in linears.items()}
    inputs = capture_block_inputs(model, blocks, [torch.randint(0, 128, (2, 8))], torch.device("cpu"))
    with torch.no_grad():
        groups = infer_groups(0, blocks[0], local, inputs[0], torch.device("cpu"))
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_rank_formula_matches_brute_force():
    for m, n, density, kind in itertools.product([7, 32, 50], [9, 32], [0.1, 0.5, 0.9], ["pifa", "lowrank"]):
        best = max((r for r in range(1, min(m, n) + 1) if layer_parameters(m, n, r, kind) <= density * m * n),
                   default=None)
        if best is None:
            with pytest.raises(ValueError):
                rank_for_density(m, n, density, kind)
        else:
            assert rank_for_density(m, n, density, kind) == best


def test_spectrum_allocation_in_compress_is_within_budget_and_deterministic():
    import pifa

    calib = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    reports = [pifa.compress(tiny_model("llama"), pifa.CompressionConfig(density=0.5, allocation="spectrum"), calib,
                             batch_size=4, progress=False) for _ in range(2)]
    first, second = ({m.name: m.rank for m in r.modules} for r in reports)
    assert first == second
    assert 0.45 <= reports[0].density <= 0.5
    assert all(m.allocation_score is not None and 0 <= m.allocation_score <= 1 for m in reports[0].modules)
    uniform = pifa.compress(tiny_model("llama"), pifa.CompressionConfig(density=0.5), calib, batch_size=4,
                            progress=False)
    assert {m.name: m.rank for m in uniform.modules} != first  # the spectra moved rank between linears


def test_spectrum_allocation_needs_a_low_rank_method():
    import pifa

    with pytest.raises(ValueError, match="spectrum"):
        pifa.CompressionConfig(method="wanda", allocation="spectrum")


@pytest.mark.parametrize(
    "m, n, density, kind, expected",
    [
        (4096, 4096, 0.5, "pifa", 1199),
        (4096, 4096, 0.5, "lowrank", 1024),
        (11008, 4096, 0.5, "pifa", 1679),
        (11008, 4096, 0.5, "lowrank", 1492),
    ],
)
def test_known_values(m, n, density, kind, expected):
    assert rank_for_density(m, n, density, kind=kind) == expected


@pytest.mark.parametrize("kind", ["pifa", "lowrank"])
@pytest.mark.parametrize("m, n", [(64, 32), (32, 64), (100, 100), (11008, 4096)])
@pytest.mark.parametrize("density", [0.1, 0.33, 0.5, 0.8, 1.0])
def test_rank_is_largest_that_fits(kind, m, n, density):
    r = rank_for_density(m, n, density, kind=kind)
    assert layer_parameters(m, n, r, kind) <= density * m * n
    if r < min(m, n):
        assert layer_parameters(m, n, r + 1, kind) > density * m * n


def test_full_density_pifa_is_full_rank():
    assert rank_for_density(300, 200, 1.0, "pifa") == 200


def test_multiple_of_rounds_down():
    assert rank_for_density(4096, 4096, 0.5, "pifa", multiple_of=16) == 1184
    assert rank_for_density(4096, 4096, 0.5, "lowrank", multiple_of=64) == 1024
    assert rank_for_density(11008, 4096, 0.5, "pifa", multiple_of=8) == 1672


@pytest.mark.parametrize("density", [0, -0.1, 1.01, float("nan"), True])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match="density"):
        rank_for_density(64, 64, density)


def test_too_small_density_and_bad_args():
    with pytest.raises(ValueError, match="too small"):
        rank_for_density(64, 64, 0.001)
    with pytest.raises(ValueError, match="multiple of 64"):
        rank_for_density(64, 64, 0.5, multiple_of=64)
    with pytest.raises(ValueError, match="kind"):
        rank_for_density(64, 64, 0.5, kind="dense")
    with pytest.raises(ValueError, match="multiple_of"):
        rank_for_density(64, 64, 0.5, multiple_of=0)
