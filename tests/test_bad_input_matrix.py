"""Bad input everywhere: one line naming the problem, exit code 2, no traceback, nothing written."""

import json
import os

import pytest

from helpers import compress_argv, make_dense_dir, tiny_model
from pifa import PivotLinear, save_compressed
from pifa.app.cli import main


@pytest.fixture
def env(tmp_path):
    dense = make_dense_dir(tmp_path)
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("short")
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj = PivotLinear.from_linear(model.model.layers[0].self_attn.q_proj, 4)
    save_compressed(model, tmp_path / "comp")
    return tmp_path, dense


def _damage(root, dense, case):
    """Prepare the damage a case needs; returns the argv."""
    out = root / "out"
    if case == "truncated-dense-weights":
        weights = dense / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    if case == "unsupported-architecture":
        config = json.loads((dense / "config.json").read_text())
        (dense / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model",
                                                       "architectures": ["NoSuchModel"]}))
    if case == "non-finite-weights":
        from safetensors.torch import load_file, save_file
        tensors = load_file(dense / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(tensors, dense / "model.safetensors", metadata={"format": "pt"})
    if case == "unknown-format-version":
        spec = json.loads((root / "comp" / "pifa_config.json").read_text())
        (root / "comp" / "pifa_config.json").write_text(json.dumps({**spec, "format_version": 42}))
    if case == "truncated-compressed-weights":
        weights = root / "comp" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    if case == "existing-output":
        out.mkdir()
    if case.startswith("lock-"):  # somebody's file where the lock goes: refused, neither it nor a link target touched
        (root / "notes.txt").write_text("my notes, not a pid\n")
        lock = root / "out.pifa-lock"
        {"lock-is-symbolic-link": lambda: lock.symlink_to("notes.txt"),
         "lock-is-dangling-link": lambda: lock.symlink_to(root / "missing.txt"),
         "lock-is-hard-link": lambda: os.link(root / "notes.txt", lock),
         "lock-is-someones-file": lambda: lock.write_text("12 monkeys\n"),
         "lock-is-folder": lock.mkdir}[case]()
    return {
        "missing-model": compress_argv(root / "nope", out),
        "truncated-dense-weights": compress_argv(dense, out),
        "unsupported-architecture": compress_argv(dense, out),
        "non-finite-weights": compress_argv(dense, out),
        "density-out-of-range": compress_argv(dense, out, "--density", "0"),
        "impossible-attention-split": compress_argv(dense, out, "--density", "0.95", "--attn-density", "0.1"),
        "empty-calibration": compress_argv(dense, out)[:4] + [str(root / "empty.txt")] + compress_argv(dense, out)[5:],
        "too-short-calibration": compress_argv(dense, out)[:4] + [str(root / "short.txt")] + compress_argv(dense, out)[5:],
        "unknown-method": compress_argv(dense, out, "--method", "lora"),
        "unknown-pattern": compress_argv(dense, out, "--method", "wanda", "--pattern", "3:2"),
        "contradicting-pattern": compress_argv(dense, out, "--method", "wanda", "--pattern", "2:4", "--density", "0.7"),
        "seq-len-beyond-model": compress_argv(dense, out, "--seq-len", "4096"),
        "existing-output": compress_argv(dense, out),
        **{case: compress_argv(dense, out) for case in LOCK_CASES},
        "eval-missing-text": ["eval", str(dense), "--ppl", str(root / "nope.txt"), "--seq-len", "16"],
        "eval-seq-len-beyond-model": ["eval", str(dense), "--ppl", str(root / "calib.txt"), "--seq-len", "4096"],
        "eval-seq-len-beyond-text": ["eval", str(dense), "--ppl", str(root / "short.txt"), "--seq-len", "32"],
        "bench-non-positive": ["bench", "layer", "--rank", "-3"],
        "info-missing-directory": ["info", str(root / "nope")],
        "unknown-format-version": ["info", str(root / "comp")],
        "truncated-compressed-weights": ["info", str(root / "comp")],
    }[case]


LOCK_CASES = {
    "lock-is-symbolic-link": "is a symbolic link (to 'notes.txt'), not a lock file of pifa",
    "lock-is-dangling-link": "is a symbolic link",
    "lock-is-hard-link": "is one of 2 hard links to the same file",
    "lock-is-someones-file": "holds other data than a pid",
    "lock-is-folder": "is not a regular file",
}

CASES = {
    **LOCK_CASES,
    "missing-model": "does not exist",
    "truncated-dense-weights": "model.safetensors",
    "unsupported-architecture": "no-such-model",
    "non-finite-weights": "non-finite weights (NaN or Inf) in model.layers.1.mlp.up_proj",
    "density-out-of-range": "density 0.0 is outside (0, 1]",
    "impossible-attention-split": "forces the MLP density",
    "empty-calibration": "contains no text",
    "too-short-calibration": "fewer than one sample",
    "unknown-method": "unknown method 'lora'",
    "unknown-pattern": "pattern '3:2'",
    "contradicting-pattern": "contradicts pattern 2:4",
    "seq-len-beyond-model": "longer than the model's context",
    "existing-output": "already exists",
    "eval-missing-text": "is not a file, a folder or a known dataset",
    "eval-seq-len-beyond-model": "longer than the model's context",
    "eval-seq-len-beyond-text": "seq_len",
    "bench-non-positive": "rank -3 must be a positive integer",
    "info-missing-directory": "is not a directory",
    "unknown-format-version": "format_version 42",
    "truncated-compressed-weights": "not a readable safetensors file",
}


def _snapshot(root):
    """Every file, folder and link under ``root`` with its bytes (a link by its target, never followed)."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                seen[key] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                seen[key] = ("folder", None)
            else:
                with open(path, "rb") as f:
                    seen[key] = ("file", f.read())
    return seen


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(env, case, capsys):
    root, dense = env
    argv = _damage(root, dense, case)
    before, contents = sorted(p.name for p in root.iterdir()), _snapshot(root)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and CASES[case] in err[-1], err
    assert err[-1].startswith("pifa ") and ": error: " in err[-1]
    assert not any("Traceback" in line for line in err)
    assert sorted(p.name for p in root.iterdir()) == before, "partial output left behind"
    assert _snapshot(root) == contents, "an input or a file beside the output was changed"
