"""pifa.app.outputs: an output never overlaps an input, one run per output (the lock), and a failed run
leaves nothing it created."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import compress_argv, make_dense_dir, pifa_env, snapshot, tree
from pifa import load_compressed
from pifa.app.cli import main
from pifa.app.outputs import OutputLock


@pytest.mark.parametrize("case", ["out-is-model", "out-is-parent-of-model", "out-inside-model", "out-is-calib",
                                  "out-contains-calib", "checkpoint-is-model"])
def test_output_overlapping_an_input_is_refused_and_nothing_changes(tmp_path, case, capsys):
    dense = make_dense_dir(tmp_path)
    calib = tmp_path / "calib.txt"
    argv = compress_argv(dense, tmp_path / "out", "--overwrite")
    out = {"out-is-model": dense, "out-is-parent-of-model": tmp_path, "out-inside-model": dense / "sub",
           "out-is-calib": calib, "out-contains-calib": tmp_path, "checkpoint-is-model": tmp_path / "x"}[case]
    if case == "checkpoint-is-model":
        dense = dense.rename(tmp_path / "x.pifa-checkpoint")
        argv = compress_argv(dense, out, "--overwrite")
    if case in ("out-is-calib", "out-contains-calib"):  # the model elsewhere: only the calibration path overlaps
        other = tmp_path.parent / f"{tmp_path.name}-model"
        dense.rename(other)
        dense = other
        argv = compress_argv(dense, out, "--overwrite")
        argv[argv.index("--calib") + 1] = str(calib)
    argv[2] = str(out)
    before = snapshot(tmp_path)
    model_before = snapshot(dense)
    capsys.readouterr()  # transformers' progress bars while the folders were made (first test of a process)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pifa never writes over or into its inputs" in err[0], err
    assert snapshot(tmp_path) == before and snapshot(dense) == model_before


def _wait_for(path: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_a_second_run_on_the_same_output_fails_at_once_naming_the_first(tmp_path, capsys, monkeypatch):
    import pifa.app.commands

    def never(*args, **kwargs):
        raise AssertionError("the second run loaded the model before checking the lock")

    dense = make_dense_dir(tmp_path)
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "pifa", *compress_argv(dense, out)], env=pifa_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = _wait_for(tmp_path / "out.pifa-lock")
        assert holder == str(first.pid)
        os.kill(first.pid, signal.SIGSTOP)  # the first run holds the lock, mid-way
        monkeypatch.setattr(pifa.app.commands, "_model_and_calibration", never)  # at once, without loading the model
        assert main(compress_argv(dense, out, "--overwrite")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another pifa run (pid {first.pid}" in err[0], err
        assert main(compress_argv(dense, out, "--resume")) == 2  # nor can it touch the first run's checkpoint
        capsys.readouterr()
    finally:
        monkeypatch.undo()
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert load_compressed(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "dense", "out"]  # lock file removed


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    out = tmp_path / "deeper" / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pifa.app.outputs import OutputLock\n"
                               "with OutputLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)",
                               str(out)], env=pifa_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert main(compress_argv(dense, out)) == 2
    assert f"pid {holder.pid}" in capsys.readouterr().err
    holder.kill()
    holder.wait()
    assert (tmp_path / "deeper" / "out.pifa-lock").exists()  # SIGKILL: no cleanup, but no lock either
    assert main(compress_argv(dense, out)) == 0
    assert sorted(p.name for p in (tmp_path / "deeper").iterdir()) == ["out"]


def test_lock_is_released_and_created_folders_removed_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with OutputLock(out):
            assert (tmp_path / "a" / "b" / "out.pifa-lock").read_text().strip() == str(os.getpid())
            with pytest.raises(ValueError, match="in use by another pifa run"):
                with OutputLock(out):
                    pass
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with OutputLock(out):  # free again
        pass


def test_failed_run_removes_the_parent_folders_it_created(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    (tmp_path / "calib.txt").write_text("short")  # too little calibration text: fails after the lock was taken
    before = tree(tmp_path)
    assert main(compress_argv(dense, tmp_path / "a" / "b" / "out")) == 2
    assert "fewer than one sample" in capsys.readouterr().err
    assert tree(tmp_path) == before
