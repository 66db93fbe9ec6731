"""Sparse baselines: exact mask counts, identities and the SparseGPT inequality.

RIA's channel permutation for N:M sparsity: exactness, never-worse kept score, determinism, end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import compress_argv, make_dense_dir, model_output, tiny_model
from pifa import CompressionConfig, compress, load_compressed, sparse
from pifa.app.cli import build_parser, main
from pifa.format import CONFIG_NAME
from pifa.model import find_blocks, is_linear, linear_weight
from pifa.report import CompressionReport, ModuleReport

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


# --- RIA's channel permutation for N:M sparsity: exactness, never-worse kept score, determinism, end to end.

RULES = sparse.RULES
SCORED = ("magnitude", "wanda", "ria")  # the rules whose mask is their score's N:M top-N
CALIB = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))


def spread_layer(m: int = 16, n: int = 32, seed: int = 0, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """W (m, n) with uneven column scales (outlier channels) and no exact zeros; G = X X^T (n, n)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, generator=gen) * spread + 0.1
    w = torch.randn(m, n, generator=gen) * scale
    w = torch.where(w.abs() < 1e-3, torch.full_like(w, 1e-2), w)
    x = torch.randn(n, 4 * n, generator=gen, dtype=torch.float64) * (torch.rand(n, 1, generator=gen) * 4 + 0.1)
    return w, x @ x.T


def heavy_first_layer(m: int = 8, n: int = 32) -> torch.Tensor:
    """|W| large in the first 4 inputs (one group of 2:4 as stored) and small elsewhere: the identity
    must drop two large weights per row, a permutation need not."""
    w = torch.full((m, n), 0.1)
    w[:, :4] = 10.0
    return w + 0.01 * torch.arange(n)[None, :]


def permuted_view(out: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return out if perm is None else out[:, perm]


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", SCORED)
def test_unpermuting_recovers_w_on_kept_entries(method, pattern):
    w, g = spread_layer()
    nm = sparse.parse_pattern(pattern)
    out, perm = sparse.prune_permuted(method, w, g, 0.5, nm)
    assert perm is not None and sorted(perm.tolist()) == list(range(w.shape[1]))
    assert out.shape == w.shape and out.dtype == w.dtype
    kept = out != 0
    assert torch.equal(out, torch.where(kept, w, torch.zeros_like(w)))  # W on kept entries, 0 elsewhere
    pruned_permuted = out[:, perm]  # the layer in the permuted order: N:M there, mask applied
    assert torch.equal(pruned_permuted, w[:, perm] * (pruned_permuted != 0))
    assert sparse.is_nm(pruned_permuted, nm)
    x = torch.randn(5, w.shape[1])
    assert torch.allclose(x @ out.T, x[:, perm] @ pruned_permuted.T, atol=1e-5)  # same function
    assert torch.equal(pruned_permuted, sparse.prune(method, w[:, perm], g[perm][:, perm], 0.5, nm))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparsegpt_solves_in_the_permuted_order(pattern):
    w, g = spread_layer()
    nm = sparse.parse_pattern(pattern)
    out, perm = sparse.prune_permuted("sparsegpt", w, g, 0.5, nm)
    assert perm is not None
    expected = sparse.sparsegpt(w[:, perm], g[perm][:, perm], 0.5, nm)  # W's columns and G's rows/columns alike
    assert torch.equal(out[:, perm], expected)
    assert sparse.is_nm(out[:, perm], nm)
    assert torch.equal(perm, sparse.nm_permutation(sparse.wanda_scores(w, g), nm))  # chosen on |W| * ||x||


def test_permutation_raises_the_kept_score_where_the_identity_wastes_it():
    w = heavy_first_layer()
    scores = sparse.magnitude_scores(w)
    perm = sparse.nm_permutation(scores, (2, 4))
    assert sparse.kept_score(scores, (2, 4), perm) > sparse.kept_score(scores, (2, 4)) + 8 * 2 * 9
    out, recorded = sparse.prune_permuted("magnitude", w, None, 0.5, (2, 4))
    assert torch.equal(recorded, perm)
    assert torch.all(out[:, :4] != 0)  # every large weight kept, which 2:4 as stored cannot do
    assert not sparse.is_nm(out, (2, 4)) and sparse.is_nm(out[:, perm], (2, 4))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 12), groups=st.integers(1, 12),
       pattern=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]), method=st.sampled_from(RULES),
       spread=st.sampled_from([0.0, 1.0, 10.0]))
def test_kept_score_never_lower_than_without(seed, rows, groups, pattern, method, spread):
    w, g = spread_layer(rows, groups * pattern[1], seed, spread)
    scores = sparse.permutation_scores(method, w, g)
    perm = sparse.nm_permutation(scores, pattern)
    assert sorted(perm.tolist()) == list(range(w.shape[1]))
    assert sparse.kept_score(scores, pattern, perm) >= sparse.kept_score(scores, pattern)
    if method != "sparsegpt":  # what the pruned weight keeps of the rule's own score
        density = pattern[0] / pattern[1]
        out, got = sparse.prune_permuted(method, w, g, density, pattern)
        plain = sparse.prune(method, w, g, density, pattern)
        assert float(scores[out != 0].sum()) >= float(scores[plain != 0].sum()) * (1 - 1e-12)
        assert sparse.is_nm(permuted_view(out, got), pattern)


def test_identity_when_nothing_can_be_gained():
    w = torch.ones(4, 16)  # every arrangement keeps the same: the identity stays, nothing is recorded
    assert torch.equal(sparse.nm_permutation(sparse.magnitude_scores(w), (2, 4)), torch.arange(16))
    out, perm = sparse.prune_permuted("magnitude", w, None, 0.5, (2, 4))
    assert perm is None and torch.equal(out, sparse.prune("magnitude", w, None, 0.5, (2, 4)))


@pytest.mark.parametrize("method", RULES)
def test_deterministic(method):
    w, g = spread_layer(24, 64, seed=3)
    first = sparse.prune_permuted(method, w, g, 0.5, (2, 4))
    second = sparse.prune_permuted(method, w.clone(), g.clone(), 0.5, (2, 4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_prune_permuted_bad_input():
    w, g = spread_layer()
    with pytest.raises(ValueError, match="needs an N:M pattern"):
        sparse.prune_permuted("wanda", w, g, 0.5, None)
    with pytest.raises(ValueError, match="not divisible by M=8"):
        sparse.prune_permuted("wanda", w[:, :12], g[:12, :12], 0.5, (4, 8))
    with pytest.raises(ValueError, match="needs the calibration statistic"):
        sparse.prune_permuted("ria", w, None, 0.5, (2, 4))
    out, perm = sparse.prune_permuted("wanda", w, g, 0.5, (2, 4), permute=False)
    assert perm is None and torch.equal(out, sparse.prune("wanda", w, g, 0.5, (2, 4)))


@pytest.mark.parametrize(
    "fields, message",
    [({"method": "wanda", "permute": True}, "needs a sparse method .* and a pattern such as 2:4"),
     ({"method": "mpifa", "permute": True}, "needs a sparse method"),
     ({"method": "ria", "pattern": "2:4", "permute": 1}, "permute must be true or false")],
)
def test_config_permute_needs_an_nm_sparse_method(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        CompressionConfig(**fields)
    assert "\n" not in str(error.value)
    config = CompressionConfig(method="ria", pattern="2:4", permute=True)
    assert CompressionConfig.from_dict(config.to_dict()) == config
    assert CompressionConfig.from_dict({"method": "ria", "pattern": "2:4"}).permute is False  # older configs


def test_cli_permute_is_a_plain_switch():
    parser = build_parser()
    base = ["compress", "m", "o", "--calib", "c.txt"]
    assert parser.parse_args(base).permute is False
    assert parser.parse_args([*base, "--permute"]).permute is True
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--permute", "False"])  # no value: a switch


def check_compressed(model, report, pattern):
    """Every pruned linear: N:M in the recorded input order; the report's storage flag is the truth."""
    nm = sparse.parse_pattern(pattern)
    records = {m.name: m for m in report.modules}
    modules = dict(model.named_modules())
    assert any(r.input_permutation is not None for r in records.values())
    for name, record in records.items():
        weight = linear_weight(modules[name])
        perm = None if record.input_permutation is None else torch.tensor(record.input_permutation)
        assert sparse.is_nm(permuted_view(weight, perm), nm)
        assert record.nm_in_storage == sparse.is_nm(weight, nm)
    table = report.pruned_modules()
    for name, entry in table.items():
        record = records[name]
        if record.input_permutation is None:
            assert entry["kernel"] == f"hardware {pattern} kernel: direct" and "input_permutation" not in entry
        else:
            assert entry["input_permutation"] == record.input_permutation
            assert entry["kernel"] == ("needs the input permutation" if not record.nm_in_storage
                                       else f"hardware {pattern} kernel: direct")


@pytest.mark.parametrize("method", RULES)
def test_compress_tiny_llama_with_permute_and_reload_bit_for_bit(method, tmp_path):
    import pifa

    pattern = "2:4" if method != "sparsegpt" else "4:8"
    model = tiny_model("llama")
    config = CompressionConfig(method=method, pattern=pattern, permute=True)
    report = compress(model, config, CALIB, batch_size=4, progress=False)
    assert report.density == pytest.approx(0.5)
    check_compressed(model, report, pattern)
    plain = tiny_model("llama")
    plain_report = compress(plain, dataclasses.replace(config, permute=False), CALIB, batch_size=4, progress=False)
    assert all(m.nm_in_storage and m.input_permutation is None for m in plain_report.modules)
    expected = model_output(model, CALIB[:2])
    path = pifa.save_compressed(model, tmp_path / "s", compression=config.to_dict(), report=report)
    spec = json.loads((path / CONFIG_NAME).read_text())
    assert spec["pruned"] == json.loads(json.dumps(report.pruned_modules()))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for loaded in (transformers.AutoModelForCausalLM.from_pretrained(path), load_compressed(path)):
        got = loaded.state_dict()
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
        assert torch.equal(model_output(loaded, CALIB[:2]), expected)


def test_cli_compress_permute_records_the_permutation(tmp_path):
    dense = make_dense_dir(tmp_path)
    out = tmp_path / "out"
    assert main(compress_argv(dense, out, "--method", "ria", "--pattern", "2:4", "--permute")) == 0
    spec = json.loads((out / CONFIG_NAME).read_text())
    assert spec["compression"]["permute"] is True
    entries = spec["pruned"].values()
    permuted = [e for e in entries if "input_permutation" in e]
    assert permuted and all(e["kernel"] == "needs the input permutation" for e in permuted)
    assert all(e["kernel"] == "hardware 2:4 kernel: direct" for e in entries if "input_permutation" not in e)
    model = load_compressed(out)
    for name, entry in spec["pruned"].items():
        weight = linear_weight(model.get_submodule(name))
        perm = torch.tensor(entry.get("input_permutation", range(entry["in_features"])))
        assert sparse.is_nm(permuted_view(weight, perm), (2, 4))
    report = json.loads((out / "compression_report.json").read_text())
    assert {m["name"] for m in report["modules"] if "input_permutation" in m} == {
        n for n, e in spec["pruned"].items() if "input_permutation" in e}
    assert len(spec["pruned"]) == sum(is_linear(m) for m in find_blocks(model)[1].modules())  # all stay nn.Linear


def test_module_report_round_trips_through_the_checkpoint_json():
    record = ModuleReport("a", "sparse", 2, 4, 0, 8, 4, 0.1, nm_in_storage=False, input_permutation=[1, 0, 3, 2])
    assert ModuleReport(**json.loads(json.dumps(dataclasses.asdict(record)))) == record
    report = CompressionReport({"pattern": "2:4"}, [record, ModuleReport("b", "sparse", 2, 4, 0, 8, 4, 0.1)])
    assert report.pruned_modules() == {
        "a": {"out_features": 2, "in_features": 4, "pattern": "2:4", "kernel": "needs the input permutation",
              "input_permutation": [1, 0, 3, 2]},
        "b": {"out_features": 2, "in_features": 4, "pattern": "2:4", "kernel": "hardware 2:4 kernel: direct"}}
    low_rank = CompressionReport({}, [ModuleReport("c", "pivot", 4, 4, 2, 16, 12, 0.1)]).to_dict()["modules"][0]
    assert "input_permutation" not in low_rank and "nm_in_storage" not in low_rank


def test_resume_and_streaming_keep_the_permutations(tmp_path, monkeypatch):
    from pifa.streaming import compress_streamed

    config = CompressionConfig(method="wanda", pattern="2:4", permute=True)
    reference = tiny_model("llama")
    expected = compress(reference, config, CALIB, batch_size=4, progress=False).pruned_modules()
    real, calls = sparse.prune_permuted, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # inside the second block
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse, "prune_permuted", failing)
    with pytest.raises(RuntimeError, match="killed"):
        compress(tiny_model("llama"), config, CALIB, batch_size=4, progress=False, checkpoint_dir=tmp_path / "ck")
    monkeypatch.setattr(sparse, "prune_permuted", real)
    resumed = tiny_model("llama")
    report = compress(resumed, config, CALIB, batch_size=4, progress=False, checkpoint_dir=tmp_path / "ck")
    assert report.pruned_modules() == expected  # block 0's records come back from the checkpoint
    state = reference.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in resumed.state_dict().items())
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    compress_streamed(tmp_path / "dense", tmp_path / "streamed", config, CALIB, batch_size=4, progress=False)
    assert json.loads((tmp_path / "streamed" / CONFIG_NAME).read_text())["pruned"] == expected
    streamed = load_compressed(tmp_path / "streamed").state_dict()
    assert all(torch.equal(streamed[k], v) for k, v in state.items())
