"""`pifa compress --dry-run`, `--calib-format chat` and `--threads`."""

from __future__ import annotations

from helpers import compress_argv, make_dense_dir
from pifa.app.cli import main


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    before = _listing(tmp_path)
    assert main(compress_argv(dense, tmp_path / "out", "--dry-run", "--allocation", "spectrum")) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "allocation spectrum" in out and "nothing written" in out
    density = float(out.split("density ")[-1].split()[0])
    assert 0.45 <= density <= 0.5
    assert _listing(tmp_path) == before


def test_chat_format_needs_a_chat_template(tmp_path, capsys):
    dense = make_dense_dir(tmp_path)
    assert main(compress_argv(dense, tmp_path / "out", "--calib-format", "chat")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "chat template" in err[-1]
    assert not (tmp_path / "out").exists()


def test_chat_format_calibrates_on_the_template(tmp_path):
    import json

    dense = make_dense_dir(tmp_path)
    config = json.loads((dense / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    (dense / "tokenizer_config.json").write_text(json.dumps(config))
    long_text = ("the quick brown fox jumps over the lazy dog, again and again. " * 5 + "\n \n") * 10
    (tmp_path / "calib.txt").write_text(long_text)
    assert main(compress_argv(dense, tmp_path / "out", "--calib-format", "chat")) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_threads_must_be_positive(tmp_path, capsys):
    assert main(["--threads", "0", "info", str(tmp_path)]) == 2
    assert "--threads" in capsys.readouterr().err
