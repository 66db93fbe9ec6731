"""`pifa compress` end to end on a tiny local model directory."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import compress_argv as compress_args
from helpers import make_dense_dir, model_output
from pifa import PivotLinear, load_compressed
from pifa.app.cli import main


@pytest.fixture
def dense_dir(tmp_path):
    return make_dense_dir(tmp_path)


def test_compress_writes_a_loadable_model_with_its_report(dense_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(compress_args(dense_dir, out, "--density", "0.5", "--method", "mpifa")) == 0
    assert "density 0.5" in capsys.readouterr().out
    report = json.loads((out / "compression_report.json").read_text())
    assert abs(report["density"] - 0.5) <= 0.005 and report["config"]["method"] == "mpifa"
    spec = json.loads((out / "pifa_config.json").read_text())
    assert spec["compression"]["density"] == 0.5
    model = load_compressed(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, PivotLinear)
    assert torch.isfinite(model_output(model, torch.randint(1, 30, (1, 8)))).all()
    assert not (tmp_path / "out.pifa-checkpoint").exists()


def test_flags_come_from_the_config(dense_dir, tmp_path):
    out = tmp_path / "out"
    args = compress_args(dense_dir, out, "--density", "0.6", "--attn-density", "0.5", "--allocation", "owl",
                         "--method", "svd-llm", "--als-steps", "1", "--ignore", "*lm_head*", "*down_proj*")
    assert main(args) == 0
    config = json.loads((out / "pifa_config.json").read_text())["compression"]
    assert config["attn_density"] == 0.5 and config["allocation"] == "owl" and config["ignore"] == ["*lm_head*", "*down_proj*"]
    assert "model.layers.0.mlp.down_proj" not in json.loads((out / "pifa_config.json").read_text())["modules"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--density", "1.5"], "density 1.5 is outside"),
        (["--density", "0.9", "--attn-density", "0.05"], "forces the MLP density"),
        (["--seq-len", "100000"], "longer than the model's context"),
        (["--samples", "0"], "num_samples 0"),
    ],
)
def test_bad_input_exit_2_and_no_output(dense_dir, tmp_path, extra, message):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pifa", *compress_args(dense_dir, out, *extra)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and message in lines[-1]  # progress bars may precede the error
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert not out.exists()


def test_bad_paths(dense_dir, tmp_path, capsys):
    assert main(compress_args(tmp_path / "nope", tmp_path / "out")) == 2
    assert "does not exist" in capsys.readouterr().err
    (dense_dir / "model.safetensors").rename(tmp_path / "moved.safetensors")
    assert main(compress_args(dense_dir, tmp_path / "out")) == 2
    assert "has no safetensors weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(dense_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(compress_args(dense_dir, out)) == 2
    assert "already exists" in capsys.readouterr().err


def test_calibration_text_too_short(dense_dir, tmp_path, capsys):
    (dense_dir.parent / "calib.txt").write_text("short")
    assert main(compress_args(dense_dir, tmp_path / "out")) == 2
    assert "fewer than one sample" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_after_a_crash_gives_the_same_bytes(dense_dir, tmp_path, monkeypatch):
    import pifa.solver

    assert main(compress_args(dense_dir, tmp_path / "straight")) == 0
    real, calls = pifa.solver.truncate, {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt  # like Ctrl-C in the second block
        return real(*args, **kwargs)

    monkeypatch.setattr(pifa.solver, "truncate", crash)
    with pytest.raises(KeyboardInterrupt):
        main(compress_args(dense_dir, tmp_path / "resumed"))
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.pifa-checkpoint").exists()
    monkeypatch.setattr(pifa.solver, "truncate", real)
    assert main(compress_args(dense_dir, tmp_path / "resumed", "--resume")) == 0
    straight = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == straight
