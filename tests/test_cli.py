import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_model
from pifa import CompressionConfig, PivotLinear, __version__, compress, save_compressed
from pifa.app.cli import main
from pifa.format import CONFIG_NAME


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pifa", *args], capture_output=True, text=True, timeout=120)


def test_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0 and "info" in result.stdout
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pifa {__version__}"


def test_info_prints_modules_and_density(tmp_path, capsys):
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.q_proj = PivotLinear.from_linear(attn.q_proj, 8)
    save_compressed(model, tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "pivot" in out and "32x32" in out
    # rank 8 PIFA of 32x32: 8 * (64 - 8) = 448 of 1024
    assert "448 of 1,024 weights kept, density 0.4375" in out


def test_info_reports_pruned_linears_from_the_file(tmp_path, capsys):
    model = tiny_model("gpt2")  # Conv1D weights are stored (in, out): shapes come from the table
    config = CompressionConfig(method="wanda", pattern="2:4", targets=("*mlp*",))
    report = compress(model, config, torch.randint(0, 128, (4, 16)))
    save_compressed(model, tmp_path / "s", compression=config.to_dict(), report=report)
    spec = json.loads((tmp_path / "s" / CONFIG_NAME).read_text())
    assert spec["pruned"]["transformer.h.0.mlp.c_fc"] == {"out_features": 128, "in_features": 32, "pattern": "2:4",
                                                           "kernel": "hardware 2:4 kernel: direct"}
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "compressed with wanda" in out and "sparse 2:4" in out and "128x32" in out
    # 2 layers x (c_fc 128x32 + c_proj 32x128), half of each kept, counted from the tensors
    assert "4 compressed modules: 8,192 of 16,384 weights kept, density 0.5000" in out


@pytest.mark.parametrize("damage", ["nothing", "version", "no-config"])
def test_info_bad_input_is_one_line_exit_2(tmp_path, damage):
    path = tmp_path / "m"
    if damage != "nothing":
        save_compressed(tiny_model("llama"), path)
    if damage == "version":
        (path / CONFIG_NAME).write_text(json.dumps({"format_version": 7, "modules": {}}))
    if damage == "no-config":
        (path / CONFIG_NAME).unlink()
    result = run_cli("info", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("pifa info: error:")


def _saved(tmp_path):
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.q_proj = PivotLinear.from_linear(attn.q_proj, 8)
    return save_compressed(model, tmp_path / "m")


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
