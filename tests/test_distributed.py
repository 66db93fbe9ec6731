"""torch.distributed (gloo, two processes on this CPU): the same model as one process, and one-line
failures instead of hangs. Run under ``torchrun`` (``python -m torch.distributed.run``)."""

import os
import socket
import subprocess
import sys

import pytest
import torch

import pifa
from helpers import compress_argv, make_dense_dir

ARGS = ("--batch-size", "1", "--method", "mpifa", "--density", "0.5")


def _env(**extra):
    return {**os.environ, "PIFA_CRASH_AT": "", "PIFA_DIST_TIMEOUT": "60", **extra}


def torchrun(*args, nproc=2, env=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_free_port()), "-m", "pifa", "--threads", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env or _env())


def single(*args):
    return subprocess.run([sys.executable, "-m", "pifa", "--threads", "1", *args], capture_output=True, text=True,
                          timeout=300, env=_env())


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    dense = make_dense_dir(root)
    one = single(*compress_argv(dense, root / "one", *ARGS))
    assert one.returncode == 0, one.stderr
    return dense, root


def _max_relative_difference(a, b):
    first, second = pifa.load_compressed(a).state_dict(), pifa.load_compressed(b).state_dict()
    assert first.keys() == second.keys()
    worst = 0.0
    for name, tensor in first.items():
        if tensor.is_floating_point():
            diff = (second[name].double() - tensor.double()).norm() / tensor.double().norm().clamp_min(1e-30)
            worst = max(worst, float(diff))
        else:
            assert torch.equal(second[name], tensor), name
    return worst


@pytest.mark.parametrize("stream", [False, True])
def test_two_processes_equal_one(runs, tmp_path, stream):
    dense, root = runs
    extra = ("--stream",) if stream else ()
    result = torchrun(*compress_argv(dense, tmp_path / "two", *ARGS, *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("saved to") == 1  # rank 0 alone writes and prints
    # the statistics are float64 sums in another order: the layers agree to float32 round-off
    assert _max_relative_difference(root / "one", tmp_path / "two") < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # no checkpoint or lock left


def test_two_processes_equal_one_on_mixed_attention(tmp_path):
    """Each rank captures its own batches' per-block inputs (sliding and full attention) and passes the guard."""
    dense = make_dense_dir(tmp_path, "gemma3-mixed")
    one = single(*compress_argv(dense, tmp_path / "one", *ARGS))
    two = torchrun(*compress_argv(dense, tmp_path / "two", *ARGS))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-2000:]
    assert _max_relative_difference(tmp_path / "one", tmp_path / "two") < 1e-5


def test_world_size_larger_than_batches(runs, tmp_path):
    dense, _ = runs
    result = torchrun(*compress_argv(dense, tmp_path / "out", "--batch-size", "4"))  # 4 samples: one batch
    assert result.returncode != 0
    assert "world size 2 is larger than the 1 calibration batches" in result.stderr
    assert not (tmp_path / "out").exists()


WRAPPER = """
import os, sys
from pifa.app.cli import main
argv = sys.argv[1:]
if os.environ.get("RANK") == "1":
    argv[argv.index("--density") + 1] = "0.6"
sys.exit(main(argv))
"""


def test_mismatched_arguments_across_ranks(runs, tmp_path):
    dense, _ = runs
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), str(script), *compress_argv(dense, tmp_path / "out", *ARGS)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode != 0
    assert "rank 1 was started with other arguments than rank 0" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_dying_rank_makes_the_other_exit_with_one_line(runs, tmp_path):
    """Without torchrun's agent (e.g. one process per node): the survivor's collective fails, it says so, exit 2."""
    dense, _ = runs
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PIFA_DIST_TIMEOUT="30", PIFA_CRASH_AT="block:0:group@1")
        procs.append(subprocess.Popen([sys.executable, "-m", "pifa", "--threads", "1",
                                       *compress_argv(dense, tmp_path / "out", *ARGS)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    out0, err0 = procs[0].communicate(timeout=240)  # rank 0 does not wait forever for the dead rank 1
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 2, err0[-2000:]
    errors = [line for line in err0.splitlines() if line.startswith("pifa compress: error")]
    assert len(errors) == 1 and "rank 0" in errors[0], err0[-2000:]
    assert not (tmp_path / "out").exists()


def test_sensitivity_allocation_is_the_same_on_every_rank(runs, tmp_path):
    """Every rank measures the KL on the same sequences (not its own shard), so the ranks agree with
    one process's and the model too."""
    dense, _ = runs
    extra = ("--allocation", "sensitivity")
    one = single(*compress_argv(dense, tmp_path / "one", *ARGS, *extra))
    two = torchrun(*compress_argv(dense, tmp_path / "two", *ARGS, *extra))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert _max_relative_difference(tmp_path / "one", tmp_path / "two") < 1e-5
