"""`pifa compress --resume`: after a SIGKILL the same bytes as a run that never died; only the right
checkpoint is resumed, a refused one is kept, and nothing that is not a checkpoint is deleted."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import compress_argv, make_dense_dir, run_pifa, snapshot
from pifa.app.cli import main


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    dense = make_dense_dir(root)
    result = run_pifa(*compress_argv(dense, root / "straight"))
    assert result.returncode == 0, result.stderr
    return dense, (root / "straight" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("point", ["capture", "block:1:group", "save"])
def test_sigkill_then_resume_gives_identical_bytes(straight, tmp_path, point):
    dense, expected = straight
    out = tmp_path / "out"
    killed = run_pifa(*compress_argv(dense, out), crash_at=point)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must never leave a complete-looking output directory"
    resumed = run_pifa(*compress_argv(dense, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "model.safetensors").read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # checkpoint and partial files cleaned up


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A dense folder and the checkpoint a SIGKILL in block 1 left for ``out``."""
    root = tmp_path_factory.mktemp("killed")
    dense = make_dense_dir(root)
    result = run_pifa(*compress_argv(dense, root / "out"), crash_at="block:1:group")
    assert result.returncode == -signal.SIGKILL, result.stderr
    checkpoint = root / "out.pifa-checkpoint"
    assert (checkpoint / "progress.json").is_file() and (checkpoint / "block_0000.safetensors").is_file()
    return root, dense, checkpoint


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_checkpoint_of_a_model_with_the_same_embeddings_but_other_blocks_is_refused(killed, tmp_path, capsys):
    root, dense, checkpoint = killed
    other = _copy_tree(dense, tmp_path / "other")
    (tmp_path / "calib.txt").write_bytes((root / "calib.txt").read_bytes())
    tensors = load_file(other / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] *= 1.001  # same config, names, shapes and embeddings
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    saved = _copy_tree(checkpoint, tmp_path / "out.pifa-checkpoint")
    before = snapshot(saved)
    assert main(compress_argv(other, tmp_path / "out", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was written for another model, config or calibration data" in err[0], err
    assert snapshot(saved) == before, "a refused --resume must keep the checkpoint untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "other", "out.pifa-checkpoint"]


@pytest.mark.parametrize("change", [["--density", "0.6"], ["--seed", "1"]])
def test_refused_resume_keeps_the_checkpoint_and_a_fresh_run_says_it_discards_it(killed, tmp_path, change, capsys):
    root, dense, checkpoint = killed
    saved = _copy_tree(checkpoint, tmp_path / "out.pifa-checkpoint")
    before = snapshot(saved)
    assert main(compress_argv(dense, tmp_path / "out", "--resume", *change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model, config or calibration data" in err[0]
    assert snapshot(saved) == before
    progress = saved / "progress.json"
    progress.write_text("{not json")  # a corrupt checkpoint is refused too, and kept
    assert main(compress_argv(dense, tmp_path / "out", "--resume")) == 2
    assert "is unreadable" in capsys.readouterr().err and progress.read_text() == "{not json"
    assert main(compress_argv(dense, tmp_path / "out", *change)) == 0  # without --resume: starts afresh
    err = capsys.readouterr().err
    assert "discarding the checkpoint of an earlier run; pass --resume to continue it" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_that_is_not_a_checkpoint_is_never_deleted(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    mine = tmp_path / "out.pifa-checkpoint"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(compress_argv(dense, tmp_path / "out")) == 2
    assert "is not a pifa checkpoint" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_resume_of_a_tied_model_gives_the_bytes_of_a_straight_run(tmp_path):
    """Determinism in bytes with or without --resume (tied embeddings: save_model used to add metadata keys,
    which safetensors writes in a per-process random order)."""
    dense = make_dense_dir(tmp_path, "llama-tied")
    straight = run_pifa(*compress_argv(dense, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    killed = run_pifa(*compress_argv(dense, tmp_path / "resumed"), crash_at="block:1:group")
    assert killed.returncode == -signal.SIGKILL
    import safetensors

    with safetensors.safe_open(str(tmp_path / "resumed.pifa-checkpoint" / "block_0000.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    resumed = run_pifa(*compress_argv(dense, tmp_path / "resumed", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    for name in ("model.safetensors", "pifa_config.json", "config.json", "tokenizer.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    with safetensors.safe_open(str(tmp_path / "straight" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
