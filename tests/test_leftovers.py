"""Nothing left behind by a failed run, a full disk reported in one line, and the folder conventions users expect
from ``save_pretrained``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import pifa
from helpers import bare_linear_blocks, compress_argv, make_dense_dir, model_output, tiny_model
from pifa import CompressionConfig, PivotLinear, compress, load_compressed, save_compressed
from pifa.app.cli import main

SRC = str(Path(pifa.__file__).parents[1])

FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from pifa.app.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_full_disk_is_one_line_and_keeps_only_the_resumable_checkpoint(tmp_path):
    """Every file write beyond 60 kB fails (as on a full disk): the checkpoint's blocks fit, the model does not."""
    dense = make_dense_dir(tmp_path)
    out = tmp_path / "new" / "deeper" / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1", "PIFA_CRASH_AT": ""}
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(60_000), *compress_argv(dense, out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("pifa compress: error: could not write") and "File too large" in errors[0]
    assert "rerun with --resume" in errors[0]
    # no .partial, no lock, no output: only the checkpoint (and the folders holding it)
    assert _tree(tmp_path / "new") == ["deeper", "deeper/out.pifa-checkpoint",
                                       "deeper/out.pifa-checkpoint/block_0000.safetensors",
                                       "deeper/out.pifa-checkpoint/block_0001.safetensors",
                                       "deeper/out.pifa-checkpoint/progress.json"]
    # with space again, --resume finishes from the checkpoint
    assert main(compress_argv(dense, out, "--resume")) == 0
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["out"]


def test_failed_run_removes_the_parent_folders_it_created(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    (tmp_path / "calib.txt").write_text("short")  # too little calibration text: fails after the lock was taken
    before = _tree(tmp_path)
    assert main(compress_argv(dense, tmp_path / "a" / "b" / "out")) == 2
    assert "fewer than one sample" in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_save_compressed_failure_leaves_no_partial_and_no_parents(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ValueError, match=r"^could not write .*No space left on device") as info:
        save_compressed(tiny_model("llama"), tmp_path / "x" / "y" / "m")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_save_compressed_into_an_existing_empty_folder(tmp_path, input_ids):
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj = PivotLinear.from_linear(model.model.layers[0].mlp.up_proj, 8)
    (tmp_path / "empty").mkdir()
    save_compressed(model, tmp_path / "empty")  # like save_pretrained: no overwrite needed
    assert torch.equal(model_output(load_compressed(tmp_path / "empty"), input_ids), model_output(model, input_ids))
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        save_compressed(model, folder)
        assert (Path(folder) / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # the temporary folder cleaned itself up
    with pytest.raises(ValueError, match=r"already exists and is not empty \(pass overwrite=True to replace it\)"):
        save_compressed(model, tmp_path / "empty")
    save_compressed(model, tmp_path / "empty", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no .old, no .partial


def test_cli_says_overwrite_flag_never_the_keyword(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(compress_argv(dense, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err


def test_a_list_of_bare_linears_is_no_block_list_and_gets_no_junk_submodule():
    model = bare_linear_blocks()
    names = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match="no block list found"):
        compress(model, CompressionConfig(method="svd"), torch.randint(0, 16, (4, 8)), progress=False)
    assert [name for name, _ in model.named_modules()] == names  # no submodule named '' attached
    from pifa.model import set_module, target_linears

    assert target_linears(model.layers[0], "layers.0", (), ()) == {}
    with pytest.raises(ValueError, match="cannot replace Linear itself"):
        set_module(model.layers[0], "", torch.nn.Identity())


def test_n_m_pattern_refuses_options_it_would_ignore(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    for extra in (["--attn-density", "0.4"], ["--allocation", "owl"]):
        assert main(compress_argv(dense, tmp_path / "out", "--method", "wanda", "--pattern", "2:4", *extra)) == 2
        assert "cannot apply to the N:M pattern 2:4" in capsys.readouterr().err
    assert main(compress_argv(dense, tmp_path / "out", "--method", "wanda", "--pattern", "2:4")) == 0
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert report["config"]["attn_density"] is None and report["config"]["allocation"] == "uniform"
