"""Speed-aware plans (pifa.latency): the latency table, break-even ranks, plans that never keep a PIFA layer
slower than its dense form, planning for a decode speed-up, and the table file's bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pifa
from helpers import MATRIX_CONFIGS, tiny_model
from pifa import latency
from pifa.budget import layer_parameters
from pifa.compress import plan
from pifa.latency import VERSION, LatencyTable, device_key, load_or_measure, measure_table

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
SHAPES = {(32, 32), (16, 32), (64, 32), (32, 64)}  # tiny llama's linears
OVERHEAD = 0.15  # a factored layer's fixed cost, as a fraction of the dense layer's time


def _synthetic(shapes=SHAPES) -> LatencyTable:
    """A fixed table: dense 1.0; PIFA at rank r: OVERHEAD + its parameter fraction (so the break-even is where
    PIFA keeps 85 % of the weights)."""
    table = LatencyTable(device_key("cpu", torch.float32))
    for m, n in shapes:
        top = min(m, n)
        table.dense[f"{m}x{n}"] = (1.0, 1.0)
        rows = []
        for r in range(1, top + 1):
            t = OVERHEAD + layer_parameters(m, n, r, "pifa") / (m * n)
            rows.append((r, t, t))
        table.factored.setdefault("pifa", {})[f"{m}x{n}"] = rows
    return table


@pytest.fixture
def table_file(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(_synthetic().to_dict()))
    return path


def test_break_even_is_the_largest_rank_no_slower_than_dense():
    table = _synthetic()
    for m, n in SHAPES:
        rank = table.break_even(m, n, "pifa")
        assert table.time(m, n, "pifa", rank) <= 1.0 < table.time(m, n, "pifa", rank + 1)


@pytest.mark.parametrize("allocation", ["uniform", "spectrum", "sensitivity", "owl"])
@pytest.mark.parametrize("density", [0.5, 0.8, 0.9])
def test_no_linear_is_planned_slower_than_dense(table_file, allocation, density):
    config = pifa.CompressionConfig(method="mpifa", density=density, allocation=allocation,
                                    latency_table=str(table_file))
    chosen, shapes = plan(tiny_model("llama"), config, CALIB, batch_size=2)
    table = _synthetic()
    for name, rank in chosen.ranks.items():
        m, n = shapes[name]
        assert rank == min(m, n) or table.time(m, n, "pifa", rank) <= 1.0, (name, rank)
    spent = sum(layer_parameters(*shapes[n], r, "pifa") for n, r in chosen.ranks.items())
    total = sum(m * n for m, n in shapes.values())
    assert spent <= density * total + 1e-9 * total  # the budget still holds
    assert chosen.speedup["decode"] >= 1.0


def test_without_the_rule_high_densities_plan_slower_layers(table_file):
    """The rule is not vacuous: at density 0.9 a plain plan has ranks above the break-even."""
    chosen, shapes = plan(tiny_model("llama"), pifa.CompressionConfig(method="mpifa", density=0.9), CALIB,
                          batch_size=2)
    table = _synthetic()
    assert any(table.time(*shapes[n], "pifa", r) > 1.0 for n, r in chosen.ranks.items() if r < min(shapes[n]))


def test_a_speedup_target_is_met_with_the_largest_density(table_file):
    config = pifa.CompressionConfig(method="mpifa", density=0.9, allocation="sensitivity",
                                    latency_table=str(table_file), speedup=1.5)
    chosen, _ = plan(tiny_model("llama"), config, CALIB, batch_size=2)
    assert chosen.speedup["decode"] >= 1.5
    higher = pifa.CompressionConfig(method="mpifa", density=min(1.0, chosen.density + 0.02),
                                    allocation="sensitivity", latency_table=str(table_file))
    assert plan(tiny_model("llama"), higher, CALIB, batch_size=2)[0].speedup["decode"] < 1.5


def test_an_unreachable_speedup_names_the_largest(table_file):
    config = pifa.CompressionConfig(method="mpifa", latency_table=str(table_file), speedup=50.0)
    with pytest.raises(ValueError, match=r"speedup 50.0 is out of reach on this machine: the largest predicted "
                                         r"decode speed-up of these linears is \d+\.\d\dx"):
        plan(tiny_model("llama"), config, CALIB, batch_size=2)


def test_full_rank_linears_stay_dense_with_their_reconstructed_weight(table_file):
    model = tiny_model("llama")
    config = pifa.CompressionConfig(method="mpifa", density=0.9, latency_table=str(table_file))
    report = pifa.compress(model, config, CALIB, batch_size=2, progress=False)
    dense = [m for m in report.modules if m.kind == "dense"]
    assert dense and all(m.params_after == m.params_before for m in dense)
    for m in dense:
        assert isinstance(model.get_submodule(m.name), nn.Linear)
    assert all(m.kind in ("dense", "pivot") for m in report.modules)


def test_measured_table_is_cached_and_reused(tmp_path):
    path = tmp_path / "t.json"
    first = load_or_measure(path, {(8, 16)}, "pifa", progress=False)
    assert path.exists() and first.covers({(8, 16)}, "pifa")
    again = load_or_measure(path, {(8, 16)}, "pifa", progress=False)
    assert again.dense == first.dense  # read back, not measured again
    grown = load_or_measure(path, {(8, 16), (16, 8)}, "pifa", progress=False)
    assert grown.dense["8x16"] == first.dense["8x16"] and "16x8" in grown.dense


def test_measure_table_rows_ascend_to_full_rank():
    table = measure_table({(12, 20)}, ("pifa",), grid=4, rounds=1, progress=False)
    ranks = [r for r, *_ in table.factored["pifa"]["12x20"]]
    assert ranks == sorted(ranks) and ranks[-1] == 12
    assert all(t > 0 for row in table.factored["pifa"]["12x20"] for t in row[1:])


@pytest.mark.parametrize("damage, message", [
    ("other-device", "was measured elsewhere"),
    ("other-threads", "was measured elsewhere"),
    ("not-json", "is not a pifa latency table"),
    ("wrong-format", "is not a pifa latency table"),
    ("old-version", "was measured by another pifa"),
    ("symlink", "is not a regular file"),
    ("unwritable", "cannot write the latency table"),
])
def test_bad_latency_tables_are_one_line_and_untouched(tmp_path, damage, message):
    path = tmp_path / "t.json"
    data = _synthetic({(8, 16)}).to_dict()
    if damage == "other-device":
        data["key"]["device"] = "cuda:NVIDIA H200"
    if damage == "other-threads":
        data["key"]["threads"] = data["key"]["threads"] + 7
    text = {"not-json": "{", "wrong-format": json.dumps({"format": "other", "version": VERSION}),
            "old-version": json.dumps({**data, "version": VERSION - 1})}.get(
        damage, json.dumps(data))
    if damage == "symlink":
        (tmp_path / "notes.txt").write_text("keep me")
        path.symlink_to(tmp_path / "notes.txt")
    elif damage == "unwritable":
        path = tmp_path / "no-such-folder" / "t.json"
    else:
        path.write_text(text)
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(ValueError, match=message) as error:
        load_or_measure(path, {(8, 16)}, "pifa", progress=False)
    assert "\n" not in str(error.value)
    assert (path.read_bytes() if path.exists() else None) == before
    if damage == "symlink":
        assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_latency_options_need_pifa_and_a_table():
    with pytest.raises(ValueError, match="need method 'mpifa'"):
        pifa.CompressionConfig(method="svd-llm", latency_table="t.json")
    with pytest.raises(ValueError, match="speedup needs a latency_table"):
        pifa.CompressionConfig(method="mpifa", speedup=1.3)
    with pytest.raises(ValueError, match="must be > 1"):
        pifa.CompressionConfig(method="mpifa", latency_table="t.json", speedup=0.9)


def test_cli_dry_run_prints_the_predicted_speedup(tmp_path, table_file, capsys):
    from helpers import compress_argv, make_dense_dir
    from pifa.app.cli import main

    dense = make_dense_dir(tmp_path)
    threads = str(torch.get_num_threads())  # the table's key: measured with this many threads
    argv = compress_argv(dense, tmp_path / "out", "--latency-table", str(table_file), "--density", "0.8")
    assert main(["--threads", threads, *argv, "--dry-run"]) == 0
    assert "predicted speed-up of these linears" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    other = str(int(threads) + 1)
    assert main(["--threads", other, *argv, "--dry-run"]) == 2  # measured with other threads: refused
    assert "was measured elsewhere" in capsys.readouterr().err
    torch.set_num_threads(int(threads))


@pytest.mark.parametrize("cold_bytes, expected", [(0, 1), (20 * 12 * 4 * 3, 3), (10**12, latency.MAX_COPIES)])
def test_forms_are_timed_cold_over_rotating_copies(monkeypatch, cold_bytes, expected):
    seen = []

    def timed(copies, x, reps):
        seen.append((len(copies), len({id(c) for c in copies})))
        return 1e-3

    monkeypatch.setattr(latency, "_timed", timed)
    measure_table({(12, 20)}, ("pifa",), grid=2, rounds=1, progress=False, cold_bytes=cold_bytes)
    assert seen and all(count == distinct == expected for count, distinct in seen)


def test_cache_bytes_reads_a_size():
    assert latency.cache_bytes("cpu") >= 2**10


@pytest.mark.parametrize("name", sorted(MATRIX_CONFIGS))
def test_the_decode_step_is_timed_for_in_memory_causal_lms_only(name):
    model = tiny_model(name)
    seconds = latency.time_decode_step(model, "cpu")
    assert seconds is None if name == "bert" else seconds > 0  # an encoder does not decode
    assert latency.time_decode_step(model, "meta") is None  # its weights are elsewhere
    assert not model.training


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_a_speedup_target_is_for_the_whole_decode_step_once_it_is_timed(table_file, monkeypatch, allocation):
    """The step's time outside the targeted linears does not shrink: to reach 1.2x for the whole step the linears
    must go faster than 1.2x, and the plan reports both figures."""
    from pifa import allocation as planning

    model = tiny_model("llama")
    config = pifa.CompressionConfig(method="mpifa", allocation=allocation, latency_table=str(table_file),
                                    speedup=1.2)
    monkeypatch.setattr(planning, "time_decode_step", lambda model, device: None)  # not timed: the linears alone
    alone, shapes = plan(model, config, CALIB, batch_size=2)
    linears = float(len(shapes))  # the synthetic table's dense layer takes 1 s
    monkeypatch.setattr(planning, "time_decode_step", lambda model, device: 1.5 * linears)
    whole, _ = plan(model, config, CALIB, batch_size=2)
    assert "decode_model" not in alone.speedup and alone.speedup["decode"] >= 1.2
    assert whole.speedup["decode_model"] >= 1.2
    rest = 0.5 * linears
    assert whole.speedup["decode_model"] == pytest.approx((linears + rest) / (linears / whole.speedup["decode"] + rest))
    assert whole.speedup["decode"] > alone.speedup["decode"] and whole.density < alone.density


def test_an_unreachable_whole_model_speedup_names_the_largest(table_file, monkeypatch):
    from pifa import allocation as planning

    monkeypatch.setattr(planning, "time_decode_step", lambda model, device: 1e3)  # the linears are a sliver
    config = pifa.CompressionConfig(method="mpifa", latency_table=str(table_file), speedup=1.1)
    with pytest.raises(ValueError, match=r"speedup 1.1 is out of reach on this machine: the largest predicted "
                                         r"decode speed-up of the model's decode step is 1\.0\dx"):
        plan(tiny_model("llama"), config, CALIB, batch_size=2)


def test_report_summary_names_the_speedup_target_and_the_prediction():
    from pifa.report import CompressionReport, ModuleReport

    modules = [ModuleReport("a", "pivot", 4, 4, 2, 16, 12, 0.1)]
    by_density = CompressionReport({"density": 0.5}, modules).table().splitlines()[-1]
    assert "(target 0.5)" in by_density and "predicted" not in by_density
    speed = {"decode": 1.34, "prefill": 1.48, "decode_model": 1.2}
    by_speed = CompressionReport({"density": 0.5, "speedup": 1.2}, modules, predicted_speedup=speed).table()
    summary = by_speed.splitlines()[-1]
    assert "(target decode speed-up 1.2x)" in summary and "0.5" not in summary
    assert "decode 1.34x, prefill 1.48x; of the whole model's decode step: 1.20x" in summary
