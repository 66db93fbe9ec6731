import pytest

from pifa import rank_for_density
from pifa.budget import layer_parameters


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
