"""pifa.data: calibration text loading and deterministic token windows (offline)."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers

from helpers import char_tokenizer
from pifa.data import calibration_batches, load_texts, stdlib_python_files

TEXT = "the quick brown fox jumps over the lazy dog.\n\n" * 20


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return char_tokenizer(model_max_length=16)


def test_tokenizer_is_character_level(tokenizer) -> None:
    assert tokenizer("ab c", add_special_tokens=False)["input_ids"] == [1, 2, 27, 3]


def test_load_txt_keeps_paragraphs_in_one_document(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    assert load_texts(path) == ["first paragraph\n\nsecond paragraph\n"]
    assert load_texts(str(path)) == load_texts(path)


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert load_texts(path) == ["one", "two"]


@pytest.mark.parametrize("bad_line", ['{"id": 1}', '{"text": 5}', "[1, 2]", "not json"])
def test_load_jsonl_bad_line_names_line_number(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(f'{{"text": "ok"}}\n{bad_line}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_texts(path)


def test_load_folder_recursive_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("markdown", encoding="utf-8")
    (tmp_path / "a.txt").write_text("plain\n\ntext", encoding="utf-8")
    (tmp_path / "sub" / "c.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "sub" / "d.jsonl").write_text('{"text": "j1"}\n{"text": "j2"}\n', encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("a,b", encoding="utf-8")
    assert load_texts(tmp_path) == ["plain\n\ntext", "markdown", "x = 1\n", "j1", "j2"]


def test_unknown_source_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'no-such-thing' is not a file, a folder or a known dataset"):
        load_texts("no-such-thing")
    with pytest.raises(ValueError, match="is not a file"):
        load_texts(tmp_path / "missing.txt")


def test_dataset_name_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import fails
    with pytest.raises(ValueError, match="needs the 'datasets' package"):
        load_texts("wikitext2")


def test_empty_text_error(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_texts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="no text"):
        load_texts(tmp_path)  # folder with only an empty file
    with pytest.raises(ValueError, match="non-empty"):
        calibration_batches(tokenizer, [], num_samples=1, seq_len=4)


def test_batches_shape_dtype_and_windows(tokenizer) -> None:
    batch = calibration_batches(tokenizer, [TEXT], num_samples=5, seq_len=12, seed=3)
    assert batch.shape == (5, 12) and batch.dtype == torch.int64
    stream = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for row in batch.tolist():  # every row is a contiguous window of the token stream
        assert any(stream[s : s + 12] == row for s in range(len(stream) - 11))


def test_batches_deterministic(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    first = calibration_batches(tokenizer, path, num_samples=8, seq_len=10, seed=7)
    assert torch.equal(first, calibration_batches(tokenizer, str(path), num_samples=8, seq_len=10, seed=7))
    assert torch.equal(first, calibration_batches(tokenizer, [TEXT], num_samples=8, seq_len=10, seed=7))
    assert not torch.equal(first, calibration_batches(tokenizer, path, num_samples=8, seq_len=10, seed=8))


def test_documents_joined_with_blank_line(tokenizer) -> None:
    batch = calibration_batches(tokenizer, ["ab", "cd"], num_samples=32, seq_len=5)
    stream = tokenizer("ab\n\ncd", add_special_tokens=False)["input_ids"]
    assert len(stream) == 6  # two window starts: 0 and 1, both drawn
    assert {tuple(row) for row in batch.tolist()} == {tuple(stream[:5]), tuple(stream[1:])}


def test_long_text_is_not_truncated(tokenizer) -> None:
    # model_max_length is 16; the stream must still be far longer than that
    batch = calibration_batches(tokenizer, [TEXT], num_samples=2, seq_len=len(TEXT) - 1)
    assert batch.shape == (2, len(TEXT) - 1)


def test_too_short_text_error(tokenizer) -> None:
    with pytest.raises(ValueError, match="calibration text has 5 tokens, fewer than one sample of seq_len=5"):
        calibration_batches(tokenizer, ["hello"], num_samples=1, seq_len=5)
    assert calibration_batches(tokenizer, ["hello"], num_samples=1, seq_len=4).shape == (1, 4)


@pytest.mark.parametrize("num_samples, seq_len, bad", [(0, 4, "num_samples 0"), (2, 0, "seq_len 0"),
                                                        (-1, 4, "num_samples -1"), (2, 1.5, "seq_len 1.5"),
                                                        (True, 4, "num_samples True")])
def test_bad_sizes(tokenizer, num_samples, seq_len, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        calibration_batches(tokenizer, [TEXT], num_samples=num_samples, seq_len=seq_len)


def test_raw_tokenizers_object_works(tokenizer) -> None:
    raw = tokenizer.backend_tokenizer
    expected = calibration_batches(tokenizer, [TEXT], num_samples=3, seq_len=8, seed=1)
    assert torch.equal(calibration_batches(raw, [TEXT], num_samples=3, seq_len=8, seed=1), expected)


def test_stdlib_python_files() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    train = stdlib_python_files()
    everything = stdlib_python_files(exclude_heldout=False)
    assert train and train == sorted(train) and set(train) < set(everything)
    relative = [p.relative_to(root).as_posix() for p in everything]
    assert all(p.suffix == ".py" for p in everything)
    assert not any("/test" in "/" + r or "idlelib" in r or "site-packages" in r for r in relative)
    assert "os.py" in relative and "json/decoder.py" in relative

    def heldout(path: Path) -> bool:
        return int(hashlib.sha1(path.relative_to(root).as_posix().encode()).hexdigest(), 16) % 20 == 0

    assert not any(heldout(p) for p in train)
    assert set(everything) - set(train) == {p for p in everything if heldout(p)}
    assert 0.02 < 1 - len(train) / len(everything) < 0.09  # about 1 in 20 held out


def test_python_stdlib_source_is_the_training_split() -> None:
    texts = load_texts("python-stdlib")
    assert len(texts) > 100
    assert len(texts) <= len(stdlib_python_files(exclude_heldout=True))
