"""pifa.app.loading: code from a model folder never runs (config.json's or tokenizer_config.json's
auto_map refused everywhere, even on a terminal answering yes)."""

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

from helpers import char_tokenizer, compress_argv, make_dense_dir, pifa_env, tiny_model
from pifa import PivotLinear, load_compressed, save_compressed
from pifa.app.cli import main

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
