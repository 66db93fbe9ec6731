"""Crash safety: `pifa compress --resume` after a SIGKILL gives the same bytes as a run that never died."""

import os
import signal
import subprocess
import sys

import pytest

from helpers import compress_argv, make_dense_dir


def pifa(*args, crash_at=None):
    env = {**os.environ, "PIFA_CRASH_AT": crash_at or ""}
    return subprocess.run([sys.executable, "-m", "pifa", *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    dense = make_dense_dir(root)
    result = pifa(*compress_argv(dense, root / "straight"))
    assert result.returncode == 0, result.stderr
    return dense, (root / "straight" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("point", ["capture", "block:1:group", "save"])
def test_sigkill_then_resume_gives_identical_bytes(straight, tmp_path, point):
    dense, expected = straight
    out = tmp_path / "out"
    killed = pifa(*compress_argv(dense, out), crash_at=point)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must never leave a complete-looking output directory"
    resumed = pifa(*compress_argv(dense, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "model.safetensors").read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # checkpoint and partial files cleaned up
