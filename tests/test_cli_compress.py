"""`pifa compress` end to end on a tiny local model directory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import SRC, make_dense_dir, model_output, tree
from helpers import compress_argv as compress_args
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


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from pifa.app.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_full_disk_is_one_line_and_keeps_only_the_resumable_checkpoint(tmp_path):
    """Every file write beyond 60 kB fails (as on a full disk): the checkpoint's blocks fit, the model does not."""
    dense = make_dense_dir(tmp_path)
    out = tmp_path / "new" / "deeper" / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1", "PIFA_CRASH_AT": ""}
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(60_000), *compress_args(dense, out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("pifa compress: error: could not write") and "File too large" in errors[0]
    assert "rerun with --resume" in errors[0]
    # no .partial, no lock, no output: only the checkpoint (and the folders holding it)
    assert tree(tmp_path / "new") == ["deeper", "deeper/out.pifa-checkpoint",
                                       "deeper/out.pifa-checkpoint/block_0000.safetensors",
                                       "deeper/out.pifa-checkpoint/block_0001.safetensors",
                                       "deeper/out.pifa-checkpoint/progress.json"]
    # with space again, --resume finishes from the checkpoint
    assert main(compress_args(dense, out, "--resume")) == 0
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["out"]


def test_cli_says_overwrite_flag_never_the_keyword(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(compress_args(dense, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err


def test_n_m_pattern_refuses_options_it_would_ignore(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    for extra in (["--attn-density", "0.4"], ["--allocation", "owl"]):
        assert main(compress_args(dense, tmp_path / "out", "--method", "wanda", "--pattern", "2:4", *extra)) == 2
        assert "cannot apply to the N:M pattern 2:4" in capsys.readouterr().err
    assert main(compress_args(dense, tmp_path / "out", "--method", "wanda", "--pattern", "2:4")) == 0
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert report["config"]["attn_density"] is None and report["config"]["allocation"] == "uniform"
