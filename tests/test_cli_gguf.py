"""GGUF input on the command line: `pifa compress MODEL.gguf OUT`, `pifa eval MODEL.gguf`,
`pifa bench model --dense MODEL.gguf`."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers

from helpers import CALIB_TEXT
from pifa import PivotLinear, load_compressed
from pifa.app.cli import main

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from test_gguf import CHAT_TEMPLATE, IDS, gguf_tensors, reference_model, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    (root / "calib.txt").write_text(CALIB_TEXT)
    return write_gguf(root / "tiny.gguf", gguf_tensors(reference_model(tied=False)))


def compress_gguf(source, out, *extra):
    calib = out.parent / "calib.txt" if (out.parent / "calib.txt").exists() else source.parent / "calib.txt"
    return ["compress", str(source), str(out), "--calib", str(calib), "--samples", "4", "--seq-len", "16",
            "--device", "cpu", "--method", "mpifa", "--density", "0.6", *extra]


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_compress_a_gguf_end_to_end(gguf_file, tmp_path, as_folder, capsys):
    source = gguf_file
    if as_folder:
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "tiny.gguf").write_bytes(gguf_file.read_bytes())
        (folder / "README.md").write_text("llama.cpp export\n")
        source = folder
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    out = tmp_path / "out"
    assert main(compress_gguf(source, out)) == 0
    assert "saved to" in capsys.readouterr().out
    # an ordinary pifa folder: safetensors, configs, tokenizer with its chat template, no GGUF trace
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "pifa_config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith(".gguf")]
    for name in names:
        if name.endswith(".json") and name != "compression_report.json":  # the report records the source path
            text = (out / name).read_text()
            assert "gguf" not in text.lower(), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "pifa" and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "compression_report.json").read_text())["config"]["source"] == str(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["calib.txt", "out", *(["model"] if as_folder else [])])

    model = load_compressed(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, PivotLinear)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.model.layers[1].mlp.down_proj, PivotLinear)
    with torch.no_grad():
        expected = model(IDS).logits
        assert torch.isfinite(expected).all()
        assert torch.equal(hf(IDS).logits, expected)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_eval_and_bench_read_a_gguf(gguf_file, tmp_path, capsys):
    result = tmp_path / "ppl.json"
    assert main(["eval", str(gguf_file), "--ppl", str(gguf_file.parent / "calib.txt"), "--seq-len", "16",
                 "--device", "cpu", "--json", str(result)]) == 0
    ppl = json.loads(result.read_text())["perplexity"][0]
    assert ppl["ppl"] > 1 and ppl["windows"] > 0
    out = tmp_path / "out"
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    assert main(compress_gguf(gguf_file, out)) == 0
    capsys.readouterr()
    assert main(["bench", "model", "--dense", str(gguf_file), "--compressed", str(out), "--prefill", "8",
                 "--decode", "2", "--rounds", "1", "--device", "cpu"]) == 0
    assert "compressed" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["compress", "eval", "bench"])
def test_missing_gguf_is_does_not_exist_not_a_hub_lookup(tmp_path, command, capsys):
    missing = "models/nope.gguf"  # looks like a hub id ("owner/name") but ends in .gguf
    argv = {"compress": ["compress", missing, str(tmp_path / "out"), "--calib", "python-stdlib", "--device", "cpu"],
            "eval": ["eval", missing, "--ppl", "python-stdlib", "--device", "cpu"],
            "bench": ["bench", "model", "--dense", missing, "--compressed", str(tmp_path), "--device", "cpu"]}[command]
    if command == "bench":  # --compressed must be a pifa folder for bench to reach --dense
        from helpers import tiny_model
        from pifa import save_compressed

        argv[argv.index("--compressed") + 1] = str(save_compressed(tiny_model("llama"), tmp_path / "c"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pifa {command}: error: model {missing!r} does not exist"], err


def test_gguf_without_the_gguf_package_is_one_line_exit_2(gguf_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    assert main(compress_gguf(gguf_file, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pifa compress: error: reading GGUF files needs the 'gguf' package: pip install gguf"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_folder_with_two_gguf_files_is_one_line_exit_2(gguf_file, tmp_path, capsys):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(gguf_file.read_bytes())
    assert main(["eval", str(tmp_path), "--ppl", str(gguf_file.parent / "calib.txt"), "--device", "cpu"]) == 2
    assert "holds 2 GGUF files (a.gguf, b.gguf)" in capsys.readouterr().err
