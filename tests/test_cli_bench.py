"""`pifa bench model` with several compressed folders, several batch sizes, fused siblings and --compile, on tiny
local models: the command runs and its JSON has one row per (batch, model) with the speed and size fields (no
timing assertions)."""

from __future__ import annotations

import json

from helpers import compress_argv, make_dense_dir
from pifa.app.cli import main

FIELDS = {"batch", "model", "weight_MB", "weight_bytes", "weight_x", "prefill_tok_s", "decode_tok_s", "prefill_x",
          "decode_x"}


def test_bench_model_several_folders_batches_fused_and_compiled(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    for density in ("0.5", "0.7"):
        assert main(compress_argv(dense, tmp_path / f"d{density}", "--density", density)) == 0
    capsys.readouterr()
    result = tmp_path / "bench.json"
    common = ["bench", "model", "--dense", str(dense), "--compressed", str(tmp_path / "d0.5"), str(tmp_path / "d0.7"),
              "--batch-sizes", "1,2", "--prefill", "8", "--decode", "2", "--rounds", "1", "--device", "cpu"]
    assert main([*common, "--fuse", "both", "--json", str(result)]) == 0
    out = capsys.readouterr().out
    assert "decode_tok_s" in out and "weight_x" in out and "batch sizes 1,2" in out
    data = json.loads(result.read_text())
    assert data["kind"] == "bench-model" and data["batches"] == [1, 2] and not data["compiled"]
    names = ["dense", "compressed:d0.5", "compressed:d0.5+fused", "compressed:d0.7", "compressed:d0.7+fused"]
    assert [(row["batch"], row["model"]) for row in data["rows"]] == [(b, n) for b in (1, 2) for n in names]
    for row in data["rows"]:
        assert FIELDS <= row.keys() and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
    weights = {row["model"]: row["weight_x"] for row in data["rows"]}
    assert weights["dense"] == 1.0 and weights["compressed:d0.5"] < weights["compressed:d0.7"] < 1.0
    assert weights["compressed:d0.5+fused"] == weights["compressed:d0.5"]  # fusion adds no weights

    assert main(["bench", "model", "--dense", str(dense), "--compressed", str(tmp_path / "d0.5"), "--batch-sizes",
                 "1,2", "--prefill", "8", "--decode", "2", "--rounds", "1", "--device", "cpu", "--compile",
                 "--compile-backend", "eager", "--json", str(result)]) == 0
    data = json.loads(result.read_text())
    assert data["compiled"] and all(row["compile_s"] >= 0 for row in data["rows"])
    assert [row["model"] for row in data["rows"]] == ["dense", "compressed:d0.5", "dense", "compressed:d0.5"]


def test_bench_model_bad_batch_sizes(capsys):
    assert main(["bench", "model", "--batch-sizes", "1,x", "--device", "cpu"]) == 2
    assert "--batch-sizes '1,x' must be positive integers" in capsys.readouterr().err
