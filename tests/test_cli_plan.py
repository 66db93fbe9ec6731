"""`pifa compress --dry-run`, `--calib-format` (auto, chat, text) and `--threads`."""

from __future__ import annotations

import pytest

from helpers import char_tokenizer, compress_argv, make_dense_dir
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


def _with_chat_template(dense):
    import json

    config = json.loads((dense / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    (dense / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "no-chat-template"])
def test_default_calib_format_is_chat_with_a_chat_template_and_text_without(tmp_path, template, capsys):
    """The default (auto) calibrates an instruct model (its tokenizer has a chat template) in its chat format,
    byte for byte as --calib-format chat does, and any other model on plain text, as --calib-format text;
    the printed summary and compression_report.json say which was used."""
    import json

    dense = make_dense_dir(tmp_path)
    if template:
        _with_chat_template(dense)
    long_text = ("the quick brown fox jumps over the lazy dog, again and again. " * 5 + "\n \n") * 10
    (tmp_path / "calib.txt").write_text(long_text)
    expected = "chat" if template else "text"
    capsys.readouterr()
    assert main(compress_argv(dense, tmp_path / "auto")) == 0
    out = capsys.readouterr().out
    reason = "a chat template" if template else "no chat template"
    assert f"calibration format: {expected} (auto: the tokenizer has {reason})" in out, out
    assert main(compress_argv(dense, tmp_path / "explicit", "--calib-format", expected)) == 0
    assert f"calibration format: {expected} (--calib-format {expected})" in capsys.readouterr().out
    for name in ("auto", "explicit"):
        report = json.loads((tmp_path / name / "compression_report.json").read_text())
        assert report["config"]["calibration"]["format"] == expected
    assert report["config"]["calibration"]["format_requested"] == expected
    assert ((tmp_path / "auto" / "model.safetensors").read_bytes()
            == (tmp_path / "explicit" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("template, requested, expected", [
    ("{{ messages }}", "auto", "chat"), (None, "auto", "text"), ("", "auto", "text"),
    ("{{ messages }}", "text", "text"), (None, "chat", "chat"),
])
def test_calibration_format(template, requested, expected):
    from pifa.data import calibration_format

    tokenizer = char_tokenizer()
    tokenizer.chat_template = template
    assert calibration_format(tokenizer, requested) == expected


def test_threads_must_be_positive(tmp_path, capsys):
    assert main(["--threads", "0", "info", str(tmp_path)]) == 2
    assert "--threads" in capsys.readouterr().err


@pytest.mark.parametrize("text, replies", [
    ("a" * 250 + "\n\n" + "b" * 50, 1),  # the long paragraph only, as before
    ("short line of text.\n\n" * 30, 3),  # short paragraphs only: joined into replies of at least 200 characters
])
def test_chat_documents_wraps_long_paragraphs_or_joins_short_ones(text, replies):
    from pifa.data import chat_documents

    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    documents = chat_documents(tokenizer, [text])
    assert len(documents) == replies
    assert all(len(d.split("assistant: ", 1)[1]) >= 200 for d in documents)
    if replies == 3:
        assert sum(d.count("short line of text.") for d in documents) == 30  # nothing dropped
