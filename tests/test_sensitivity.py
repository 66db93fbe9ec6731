"""allocation="sensitivity": per-linear ranks from the measured output KL of each truncation, knapsack."""

import math

import pytest
import torch

import pifa
from helpers import compress_argv, make_dense_dir, tiny_model
from pifa.budget import layer_parameters
from pifa.compress import plan

CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _plan(model, method="mpifa", density=0.5, cache=None, **extra):
    config = pifa.CompressionConfig(method=method, density=density, allocation="sensitivity", **extra)
    return plan(model, config, CALIB, batch_size=4, sensitivity_cache=cache)


@pytest.mark.parametrize("method", ["svd", "svd-llm", "m", "mpifa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_within_budget_deterministic_and_model_untouched(method, arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, shapes = _plan(model, method)
    second, _ = _plan(model, method)
    assert first.ranks == second.ranks and first.scores == second.scores
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored bit for bit
    kind = pifa.CompressionConfig(method=method).layer_kind
    used = sum(layer_parameters(*shapes[n], r, kind) for n, r in first.ranks.items())
    assert used <= 0.5 * sum(m * n for m, n in shapes.values())
    assert first.cost["forward_passes"] > 0 and first.cost["seconds"] >= 0


def test_attention_split_is_kept():
    model = tiny_model("llama")
    chosen, shapes = _plan(model, attn_density=0.3)
    attention = [n for n in shapes if "self_attn" in n]
    used = sum(layer_parameters(*shapes[n], chosen.ranks[n], "pifa") for n in attention)
    assert used <= 0.3 * sum(shapes[n][0] * shapes[n][1] for n in attention)


def test_a_layer_that_matters_more_gets_more_rank():
    """Two layers of the same shape: scaling one block's MLP output up makes its truncation cost more KL."""
    base = tiny_model("llama")
    chosen, _ = _plan(base)
    louder = tiny_model("llama")
    with torch.no_grad():
        louder.model.layers[1].mlp.down_proj.weight.mul_(8.0)
        louder.model.layers[0].mlp.down_proj.weight.mul_(0.05)
    loud, _ = _plan(louder)
    name0, name1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    assert loud.ranks[name1] > loud.ranks[name0]
    assert loud.ranks[name1] - loud.ranks[name0] > chosen.ranks[name1] - chosen.ranks[name0]


def test_compress_records_the_allocation_and_its_cost():
    model = tiny_model("llama")
    config = pifa.CompressionConfig(method="mpifa", density=0.5, allocation="sensitivity")
    report = pifa.compress(model, config, CALIB, batch_size=4, progress=False)
    chosen, _ = _plan(tiny_model("llama"))
    assert {m.name: m.rank for m in report.modules} == chosen.ranks
    assert all(m.allocation_score is not None and m.allocation_score >= 0 for m in report.modules)
    assert report.to_dict()["allocation_cost"]["forward_passes"] > 0
    assert report.density <= 0.5
    assert "sensitivity allocation took" in report.table()


def test_refused_for_sparse_methods_and_when_streaming(tmp_path):
    with pytest.raises(ValueError, match="allocation 'sensitivity' chooses ranks: it needs a low-rank method"):
        pifa.CompressionConfig(method="wanda", density=0.5, allocation="sensitivity")
    from pifa.streaming import compress_streamed

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    config = pifa.CompressionConfig(method="mpifa", density=0.5, allocation="sensitivity")
    with pytest.raises(ValueError, match="cannot stream"):
        compress_streamed(tmp_path / "dense", tmp_path / "out", config, CALIB, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_encoders_are_refused_in_one_line():
    with pytest.raises(ValueError, match="needs a causal LM"):
        plan(tiny_model("bert"), pifa.CompressionConfig(method="svd-llm", allocation="sensitivity"), CALIB)


def test_cli_dry_run_writes_nothing(tmp_path):
    import subprocess
    import sys

    dense = make_dense_dir(tmp_path)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pifa", "--threads", "1",
                             *compress_argv(dense, out, "--allocation", "sensitivity", "--dry-run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "allocation sensitivity" in result.stdout and "nothing written" in result.stdout
    assert not out.exists()


@pytest.mark.parametrize("kind", ["pifa", "lowrank"])
def test_choice_equals_brute_force_over_every_rank(kind):
    """Measured KL at a few ranks (not convex), interpolated in between: the knapsack and fill find the
    exact optimum over every allowed rank combination (integer budget below BINS)."""
    import itertools

    import numpy as np

    from pifa.sensitivity import choose_ranks

    shapes = {"a": (4, 6), "b": (6, 4), "c": (4, 4)}
    measured = {"a": [(1, 0.9), (2, 0.2), (4, 0.0)], "b": [(1, 0.5), (3, 0.45), (4, 0.0)],
                "c": [(1, 0.3), (2, 0.29), (3, 0.05), (4, 0.0)]}
    if kind == "lowrank":  # top rank: the largest that costs no more than the dense layer
        measured = {"a": [(1, 0.9), (2, 0.2)], "b": [(1, 0.5), (2, 0.45)], "c": [(1, 0.3), (2, 0.05)]}
    options = {n: [(r, layer_parameters(*shapes[n], r, kind), kl) for r, kl in rows] for n, rows in measured.items()}
    for density in ((0.4, 0.5, 0.75) if kind == "pifa" else (0.5, 0.6, 0.75)):
        budget = density * 64
        ranks, scores = choose_ranks(options, shapes, {n: density for n in shapes}, {n: "all" for n in shapes}, kind)
        assert sum(layer_parameters(*shapes[n], r, kind) for n, r in ranks.items()) <= budget
        best = math.inf
        for combo in itertools.product(*(range(rows[0][0], rows[-1][0] + 1) for rows in measured.values())):
            if sum(layer_parameters(*shapes[n], r, kind) for n, r in zip(measured, combo)) <= budget:
                best = min(best, sum(float(np.interp(r, [x for x, _ in rows], [k for _, k in rows]))
                                     for r, rows in zip(combo, measured.values())))
        assert sum(scores.values()) == pytest.approx(best, abs=1e-12)


def test_rank_multiple_of_and_the_budget_is_spent():
    model = tiny_model("llama")
    chosen, shapes = _plan(model, rank_multiple_of=2)
    assert all(r % 2 == 0 or r == min(shapes[n]) for n, r in chosen.ranks.items())
    uniform, _ = plan(model, pifa.CompressionConfig(method="mpifa", density=0.5), CALIB, batch_size=4)
    spent = sum(layer_parameters(*shapes[n], r, "pifa") for n, r in chosen.ranks.items())
    same = sum(layer_parameters(*shapes[n], r, "pifa") for n, r in uniform.ranks.items())
    assert spent <= 0.5 * sum(m * n for m, n in shapes.values()) and spent >= same - 2 * max(map(sum, shapes.values()))


def test_vocabulary_restriction(monkeypatch):
    """The KL over the dense model's most probable tokens: the whole vocabulary gives the unrestricted
    scores; a few tokens cover part of the probability and still give a plan within the budget."""
    from pifa import sensitivity

    model = tiny_model("llama")  # vocabulary 128
    full, shapes = _plan(model)
    monkeypatch.setattr(sensitivity, "MEASURE_VOCAB", 128)
    same, _ = _plan(model)
    assert same.ranks == full.ranks and same.scores == pytest.approx(full.scores, rel=1e-5, abs=1e-9)
    monkeypatch.setattr(sensitivity, "MEASURE_VOCAB", 16)
    few, _ = _plan(model)
    assert few.scores != full.scores
    assert sum(layer_parameters(*shapes[n], r, "pifa") for n, r in few.ranks.items()) <= 0.5 * sum(
        m * n for m, n in shapes.values())


def test_cache_reuses_measurements_across_densities_and_gives_the_same_plans():
    model = tiny_model("llama")
    cache = pifa.SensitivityCache()
    reused = []
    for density in (0.5, 0.6, 0.5):
        fresh, _ = _plan(model, density=density)
        cached, _ = _plan(model, density=density, cache=cache)
        assert cached.ranks == fresh.ranks and cached.scores == fresh.scores
        reused.append(cached.cost["reused_measurements"])
    assert reused[0] == 0 and reused[1] > 0 and reused[2] > reused[1]
    assert cached.cost["forward_passes"] == 1 + len(model.model.layers)  # all reused: only the dense states
    other = tiny_model("llama", seed=1)  # another model: the cache starts afresh
    again, _ = _plan(other, cache=cache)
    assert again.cost["reused_measurements"] == 0 and again.ranks == _plan(other)[0].ranks


def test_cache_file_persists_measurements_between_processes(tmp_path):
    """A cache file written by one run gives the next (a new SensitivityCache, as in a new process) every
    measurement back; the plans are the same as fresh ones."""
    model, path = tiny_model("llama"), tmp_path / "kl.json"
    first, _ = _plan(model, cache=pifa.SensitivityCache(path))
    assert path.exists() and first.cost["reused_measurements"] == 0
    second, _ = _plan(model, cache=pifa.SensitivityCache(path))
    assert second.ranks == first.ranks and second.scores == first.scores
    assert second.cost["forward_passes"] == 1 + len(model.model.layers)  # every measurement read from the file
    other = tiny_model("llama", seed=1)
    _plan(other, cache=pifa.SensitivityCache(path))  # another model: kept beside the first, under its own key
    third, _ = _plan(model, cache=pifa.SensitivityCache(path))
    assert third.cost["forward_passes"] == 1 + len(model.model.layers)


def test_cache_is_not_reused_for_other_calibration_with_the_same_measurement_subset():
    """More calibration sequences change the whitening even when the measured sequences are the same."""
    model, cache = tiny_model("llama"), pifa.SensitivityCache()
    _plan(model, cache=cache)
    config = pifa.CompressionConfig(method="mpifa", density=0.5, allocation="sensitivity")
    more = torch.cat([CALIB, torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))])
    chosen, _ = plan(model, config, more, batch_size=4, sensitivity_cache=cache)
    assert chosen.cost["reused_measurements"] == 0
    assert chosen.ranks == plan(model, config, more, batch_size=4)[0].ranks


@pytest.mark.parametrize("text", ["not json", '{"format": "something else", "keys": {}}',
                                  '{"format": "pifa-sensitivity-cache", "version": 1, "keys": {"k": [[1, 2]]}}',
                                  '{"format": "pifa-sensitivity-cache", "version": 1, '
                                  '"keys": {"k": [["a", "pifa", true, 0.0, 3, -1.0]]}}'])
def test_a_bad_cache_file_is_one_line_and_left_alone(tmp_path, text):
    path = tmp_path / "kl.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="is not a pifa sensitivity cache") as error:
        pifa.SensitivityCache(path)
    assert "\n" not in str(error.value) and path.read_text() == text


def test_a_cache_path_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        pifa.SensitivityCache(tmp_path)
    with pytest.raises(ValueError, match="does not exist or is not writable"):
        pifa.SensitivityCache(tmp_path / "missing" / "kl.json")


def test_cli_sensitivity_cache(tmp_path, capsys):
    from pifa.app.cli import main

    dense = make_dense_dir(tmp_path)
    cache = tmp_path / "kl.json"
    argv = compress_argv(dense, tmp_path / "out", "--allocation", "sensitivity", "--dry-run",
                         "--sensitivity-cache", str(cache))
    assert main(argv) == 0 and cache.exists() and not (tmp_path / "out").exists()
    first = capsys.readouterr().out
    assert main(argv) == 0 and capsys.readouterr().out == first  # the same plan from the file
    assert main(compress_argv(dense, tmp_path / "out", "--sensitivity-cache", str(cache))) == 2
    assert "--allocation sensitivity" in capsys.readouterr().err
    assert main(compress_argv(dense, tmp_path / "out", "--allocation", "sensitivity",
                              "--sensitivity-cache", str(dense / "kl.json"))) == 2  # inside the model folder
    assert "pifa never writes over or into its inputs" in capsys.readouterr().err
    assert not (dense / "kl.json").exists() and not (tmp_path / "out").exists()
