"""pifa.allocation: one planner per allocation name, and OWL's scores reach the plan."""

from __future__ import annotations

import torch

import pifa
from helpers import tiny_model
from pifa.allocation import PLANNERS
from pifa.compress import plan
from pifa.config import ALLOCATIONS

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def test_every_allocation_name_has_one_planner():
    assert set(PLANNERS) == set(ALLOCATIONS)


def _outlier_model():
    """Block 1's inputs with a few huge channels (its attention norm scaled): OWL must move density there."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[:3] = 200.0
    return model


def test_owl_scores_move_density_between_blocks():
    for method in ("wanda", "mpifa"):
        uniform, _ = plan(_outlier_model(), pifa.CompressionConfig(method=method, density=0.5), CALIB, batch_size=2)
        owl, _ = plan(_outlier_model(), pifa.CompressionConfig(method=method, density=0.5, allocation="owl",
                                                               owl_lambda=0.2), CALIB, batch_size=2)
        chosen = owl.densities or owl.ranks
        base = uniform.densities or uniform.ranks
        q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
        assert chosen[q1] > base[q1] and chosen[q0] < base[q0], (method, chosen, base)


def test_the_engine_compresses_with_owl_s_plan():
    """compress() itself (not only plan()) follows OWL: the ranks it reports are the OWL plan's, which differ
    from the uniform plan's; a sparse method keeps more of block 1, whose inputs have the outliers."""
    config = pifa.CompressionConfig(method="mpifa", density=0.5, allocation="owl", owl_lambda=0.2)
    planned, _ = plan(_outlier_model(), config, CALIB, batch_size=2)
    uniform, _ = plan(_outlier_model(), pifa.CompressionConfig(method="mpifa", density=0.5), CALIB, batch_size=2)
    report = pifa.compress(_outlier_model(), config, CALIB, batch_size=2, progress=False)
    ranks = {m.name: m.rank for m in report.modules}
    assert ranks == planned.ranks and ranks != uniform.ranks
    sparse = pifa.CompressionConfig(method="wanda", density=0.5, allocation="owl", owl_lambda=0.2)
    kept = {m.name: m.params_after / m.params_before
            for m in pifa.compress(_outlier_model(), sparse, CALIB, batch_size=2, progress=False).modules}
    assert kept["model.layers.1.self_attn.q_proj"] > 0.5 > kept["model.layers.0.self_attn.q_proj"], kept
