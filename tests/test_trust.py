"""Trust under attack and accident: no code from model folders, no input destroyed, no checkpoint lost,
one run per output, no silently uninitialised weights, and loud failure without ``import pifa``."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import compress_argv, make_dense_dir, tiny_model
from pifa import PivotLinear, load_compressed, save_compressed
from pifa.app.cli import main
from pifa.app.outputs import OutputLock

SRC = str(Path(__file__).parents[1] / "src")


def pifa_env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
            "PIFA_CRASH_AT": "", **extra}


def pifa(*args, crash_at=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pifa", *args], capture_output=True, text=True, timeout=timeout,
                          env=pifa_env(PIFA_CRASH_AT=crash_at or ""))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (folders as empty entries)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"") for p in sorted(root.rglob("*"))}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if "error" in line.lower()]


# --- 1. code from a model folder never runs -------------------------------------------------------------

PWNED = '''
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import PretrainedConfig


class PwnedConfig(PretrainedConfig):
    model_type = "pwned"
'''


def arm(folder: Path, marker: Path, tokenizer_too: bool = True) -> None:
    """Make ``folder`` a model folder whose configs point transformers at a custom module writing ``marker``."""
    (folder / "pwned.py").write_text(PWNED.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "pwned.PwnedConfig", "AutoModelForCausalLM": "pwned.PwnedModel"}
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_too:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["pwned.PwnedTokenizer", None]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run ``python -m pifa ARGV`` on a pseudo-terminal, answering "y" to every question it asks."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.execve(sys.executable, [sys.executable, "-m", "pifa", *argv], env)
    output, answered = b"", 0
    os.write(fd, b"y\n")  # an answer already waiting, should anything read the terminal
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        output += data
        while output.count(b"[y/N]") > answered:  # transformers' "run the custom code? [y/N]"
            os.write(fd, b"y\n")
            answered += 1
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@pytest.fixture
def armed(tmp_path):
    """A dense folder and a compressed folder, both carrying custom code that writes ``marker`` when run."""
    dense = make_dense_dir(tmp_path)
    marker = tmp_path / "marker"
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj = PivotLinear.from_linear(model.model.layers[0].self_attn.q_proj, 4)
    from helpers import char_tokenizer

    comp = save_compressed(model, tmp_path / "comp", tokenizer=char_tokenizer(64))
    arm(dense, marker)
    arm(comp, marker)
    return tmp_path, dense, comp, marker


def test_custom_code_never_runs_on_a_terminal_answering_yes(armed):
    root, dense, comp, marker = armed
    env = pifa_env(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1")
    runs = {
        "compress": compress_argv(dense, root / "out"),
        "eval-compressed": ["eval", str(comp), "--ppl", str(root / "calib.txt"), "--seq-len", "16", "--device", "cpu"],
    }
    for name, argv in runs.items():
        code, output = run_in_pty(argv, env)
        lines = [line for line in output.replace("\r", "").splitlines() if line.strip() and line.strip() != "y"]
        assert code == 2, (name, output)
        assert "Traceback" not in output and "[y/N]" not in output, (name, output)
        assert len(lines) == 1 and "carries custom code" in lines[0] and "never runs code" in lines[0], (name, lines)
        assert not marker.exists(), f"{name}: the folder's code ran"
    assert not (root / "out").exists()
    # the folders are armed: transformers itself, told to trust them, runs their code
    probe = subprocess.run([sys.executable, "-c", "import sys, transformers; transformers.AutoConfig.from_pretrained("
                            "sys.argv[1], trust_remote_code=True)", str(dense)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert marker.read_text() == "custom code ran", probe.stderr[-2000:]


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_custom_code_folders_are_refused_everywhere(armed, where, capsys):
    root, dense, comp, marker = armed
    if where == "tokenizer":  # only the tokenizer asks for custom code
        for folder in (dense, comp):
            config = json.loads((folder / "config.json").read_text())
            del config["auto_map"]
            (folder / "config.json").write_text(json.dumps(config))
    expected = "tokenizer_config.json" if where == "tokenizer" else "config.json"
    for argv in (compress_argv(dense, root / "out"),
                 ["eval", str(comp), "--ppl", str(root / "calib.txt"), "--seq-len", "16", "--device", "cpu"],
                 ["bench", "model", "--dense", str(dense), "--compressed", str(comp), "--device", "cpu"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "carries custom code" in err[0] and f"'auto_map' in {expected}" in err[0], err
    with pytest.raises(ValueError, match="carries custom code"):
        load_compressed(comp)
    assert not marker.exists() and not (root / "out").exists()


# --- 2. --overwrite never destroys an input -------------------------------------------------------------

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
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pifa never writes over or into its inputs" in err[0], err
    assert snapshot(tmp_path) == before and snapshot(dense) == model_before


# --- 3 and 4. resume: only the right checkpoint, and a refused one is kept -----------------------------

@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A dense folder and the checkpoint a SIGKILL in block 1 left for ``out``."""
    root = tmp_path_factory.mktemp("killed")
    dense = make_dense_dir(root)
    result = pifa(*compress_argv(dense, root / "out"), crash_at="block:1:group")
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
    straight = pifa(*compress_argv(dense, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    killed = pifa(*compress_argv(dense, tmp_path / "resumed"), crash_at="block:1:group")
    assert killed.returncode == -signal.SIGKILL
    import safetensors

    with safetensors.safe_open(str(tmp_path / "resumed.pifa-checkpoint" / "block_0000.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    resumed = pifa(*compress_argv(dense, tmp_path / "resumed", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    for name in ("model.safetensors", "pifa_config.json", "config.json", "tokenizer.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    with safetensors.safe_open(str(tmp_path / "straight" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


# --- 5. one run per output ------------------------------------------------------------------------------

def _wait_for(path: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_a_second_run_on_the_same_output_fails_at_once_naming_the_first(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "pifa", *compress_argv(dense, out)], env=pifa_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = _wait_for(tmp_path / "out.pifa-lock")
        assert holder == str(first.pid)
        os.kill(first.pid, signal.SIGSTOP)  # the first run holds the lock, mid-way
        start = time.monotonic()
        assert main(compress_argv(dense, out, "--overwrite")) == 2
        assert time.monotonic() - start < 10  # at once, without loading the model
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another pifa run (pid {first.pid}" in err[0], err
        assert main(compress_argv(dense, out, "--resume")) == 2  # nor can it touch the first run's checkpoint
        capsys.readouterr()
    finally:
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


# --- 6. from_pretrained never returns uninitialised weights ---------------------------------------------

def _saved(tmp_path):
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.q_proj = PivotLinear.from_linear(attn.q_proj, 8)
    return save_compressed(model, tmp_path / "m")


@pytest.mark.parametrize("damage, message", [
    ("drop-coeff", "lacks tensor 'model.layers.0.self_attn.q_proj.coeff'"),
    ("drop-pivot-index", "lacks tensor 'model.layers.0.self_attn.q_proj.pivot_index'"),
    ("int32-coeff", "is I32"),
    ("float-pivot-index", "pivot indices must be I64"),
    ("wrong-shape-coeff", "has shape (24, 9)"),
    ("mixed-dtypes", "mix dtypes"),
    ("big-sentinel", "empty marker"),
])
def test_from_pretrained_refuses_missing_or_mistyped_tensors(tmp_path, damage, message):
    import transformers

    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj."
    if damage == "drop-coeff":
        del tensors[key + "coeff"]
    if damage == "drop-pivot-index":
        del tensors[key + "pivot_index"]
    if damage == "int32-coeff":
        tensors[key + "coeff"] = tensors[key + "coeff"].to(torch.int32)
    if damage == "float-pivot-index":
        tensors[key + "pivot_index"] = tensors[key + "pivot_index"].float()
    if damage == "wrong-shape-coeff":
        tensors[key + "coeff"] = torch.zeros(24, 9)
    if damage == "mixed-dtypes":
        tensors[key + "coeff"] = tensors[key + "coeff"].half()
    if damage == "big-sentinel":
        tensors[key + "weight"] = torch.zeros(32, 32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    for load in (lambda: transformers.AutoModelForCausalLM.from_pretrained(path), lambda: load_compressed(path)):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            load()
        assert "\n" not in str(info.value)
    assert main(["info", str(path)]) == 2


def test_pifa_info_checks_a_pruned_tensor_before_reading_it(tmp_path, capsys, monkeypatch):
    import safetensors

    path = _saved(tmp_path)
    spec = json.loads((path / "pifa_config.json").read_text())
    spec["pruned"] = {"model.layers.1.mlp.up_proj": {"out_features": 64, "in_features": 32, "pattern": "2:4"}}
    (path / "pifa_config.json").write_text(json.dumps(spec))
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(4096, 4096)  # 64 MiB instead of 8 KiB
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    read, real = [], safetensors.safe_open

    class Handle:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    class SpyOpen:
        def __init__(self, *args, **kwargs):
            self.handle = real(*args, **kwargs)

        def __enter__(self):
            return Handle(self.handle.__enter__())

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", SpyOpen)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has shape (4096, 4096)" in err[0] and "gives 64 x 32" in err[0], err
    assert read == []  # refused from the header: no tensor data read


# --- 7. forgetting `import pifa` fails loudly -----------------------------------------------------------

def test_from_pretrained_without_import_pifa_fails_instead_of_returning_random_weights(tmp_path):
    path = _saved(tmp_path)
    script = ("import sys, transformers\n"
              "assert 'pifa' not in sys.modules\n"
              "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
              "print('loaded')\n")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "loaded" not in result.stdout
    assert "Unknown quantization type, got pifa" in result.stderr  # transformers names the missing method ...
    assert "size mismatch" in result.stderr and "ignore_mismatched_sizes" in result.stderr  # ... and then fails
    # with pifa imported the same folder loads cleanly: the empty markers are expected, not reported
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, PivotLinear)
