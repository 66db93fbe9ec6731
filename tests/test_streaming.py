"""Streamed compression (``--stream``, ``pifa.streaming``): one block in memory at a time, sharded output.

Identities: streamed equals in-memory tensor for tensor; the sharded output loads with
``from_pretrained`` and ``load_compressed`` and gives the same logits; a SIGKILLed streamed run
resumes to the same bytes.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers

import pifa
from helpers import compress_argv, make_dense_dir, model_output, tiny_model
from pifa.format import INDEX_NAME
from pifa.streaming import StreamedWeights, compress_streamed

CALIB = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))


def _configs():
    return {"mpifa": pifa.CompressionConfig(method="mpifa", density=0.5),
            "svd": pifa.CompressionConfig(method="svd", density=0.6),
            "sparsegpt": pifa.CompressionConfig(method="sparsegpt", pattern="2:4"),
            "spectrum": pifa.CompressionConfig(method="svd-llm", density=0.5, allocation="spectrum")}


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["mpifa", "svd", "sparsegpt", "spectrum"])
def test_streamed_equals_in_memory(tmp_path, arch, method):
    config = _configs()[method]
    tiny_model(arch).save_pretrained(tmp_path / "dense")
    model = tiny_model(arch)
    pifa.compress(model, config, CALIB, batch_size=4, progress=False)
    pifa.save_compressed(model, tmp_path / "memory")
    compress_streamed(tmp_path / "dense", tmp_path / "streamed", config, CALIB, batch_size=4, progress=False)
    expected = pifa.load_compressed(tmp_path / "memory").state_dict()
    streamed = pifa.load_compressed(tmp_path / "streamed").state_dict()
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name
    files = sorted(p.name for p in (tmp_path / "streamed").iterdir())
    assert INDEX_NAME in files and "model.safetensors" not in files
    blocks = model.config.num_hidden_layers
    assert sum(f.endswith(".safetensors") for f in files) == blocks + 1  # one shard per block, one for the rest


def test_streamed_output_loads_with_from_pretrained(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    config = _configs()["mpifa"]
    compress_streamed(tmp_path / "dense", tmp_path / "out", config, CALIB, batch_size=4, progress=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = pifa.load_compressed(tmp_path / "out")
    assert torch.equal(model_output(loaded, CALIB), model_output(reference, CALIB))
    model = tiny_model("llama")
    pifa.compress(model, config, CALIB, batch_size=4, progress=False)
    assert torch.equal(model_output(loaded, CALIB), model_output(model, CALIB))


def test_streamed_dtype_and_skeleton(tmp_path):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    weights = StreamedWeights(tmp_path / "dense")
    assert weights.dtype == torch.bfloat16
    assert all(p.is_meta for p in weights.blocks.parameters())  # blocks are read only when reached
    assert not weights.model.get_input_embeddings().weight.is_meta
    rotary = [b for n, b in weights.model.named_buffers() if n.endswith("inv_freq")]
    assert rotary and all(not b.is_meta and torch.isfinite(b).all() for b in rotary)


def test_streamed_missing_tensor_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    tensors = load_file(tmp_path / "dense" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "dense" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights the model needs: 'model.layers.1.mlp.up_proj.weight'"):
        compress_streamed(tmp_path / "dense", tmp_path / "out", _configs()["mpifa"], CALIB, progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no partial folder left


def pifa_cli(*args, crash_at=None):
    env = {**os.environ, "PIFA_CRASH_AT": crash_at or ""}
    return subprocess.run([sys.executable, "-m", "pifa", "--threads", "1", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _shards(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name.startswith("model")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    dense = make_dense_dir(root)
    result = pifa_cli(*compress_argv(dense, root / "straight", "--stream"))
    assert result.returncode == 0, result.stderr
    memory = pifa_cli(*compress_argv(dense, root / "memory"))
    assert memory.returncode == 0, memory.stderr
    return dense, root


def test_cli_stream_equals_in_memory(straight):
    _, root = straight
    expected = pifa.load_compressed(root / "memory").state_dict()
    streamed = pifa.load_compressed(root / "straight").state_dict()
    assert all(torch.equal(streamed[k], v) for k, v in expected.items()) and streamed.keys() == expected.keys()
    info = pifa_cli("info", str(root / "straight"))
    assert info.returncode == 0, info.stderr
    assert "density 0.5" in info.stdout
    report = json.loads((root / "straight" / "compression_report.json").read_text())
    assert report["config"]["calibration"]["samples"] == 4


@pytest.mark.parametrize("point", ["capture", "block:1:group", "save"])
def test_streamed_sigkill_then_resume_gives_identical_bytes(straight, tmp_path, point):
    dense, root = straight
    out = tmp_path / "out"
    killed = pifa_cli(*compress_argv(dense, out, "--stream"), crash_at=point)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    resumed = pifa_cli(*compress_argv(dense, out, "--stream", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert _shards(out) == _shards(root / "straight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # checkpoint, lock and partial folder gone


def test_cli_stream_dry_run_writes_nothing(straight, tmp_path):
    dense, _ = straight
    result = pifa_cli(*compress_argv(dense, tmp_path / "out", "--stream", "--dry-run", "--allocation", "spectrum",
                                     "--method", "svd-llm"))
    assert result.returncode == 0, result.stderr
    assert "nothing written" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_cli_stream_refuses_a_file(straight, tmp_path):
    dense, _ = straight
    result = pifa_cli(*compress_argv(dense / "model.safetensors", tmp_path / "out", "--stream"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--stream" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_finished_blocks_are_freed(tmp_path):
    """Nothing of a finished block stays referenced (peak memory must not grow with depth)."""
    import gc
    import weakref

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    weights = StreamedWeights(tmp_path / "dense")
    seen = []
    original = weights.resident

    def freed(ref):
        return ref() is None or all(p.is_meta for p in ref().parameters())

    def resident(module, prefix):
        gc.collect()  # while the run goes on: every earlier block's linears are gone or empty
        assert all(freed(ref) for ref in seen)
        seen.extend(weakref.ref(m) for m in module.modules() if isinstance(m, torch.nn.Linear))
        return original(module, prefix)

    weights.resident = resident
    weights.compress(tmp_path / "out", _configs()["mpifa"], CALIB, batch_size=4, progress=False)
    assert len(seen) == 2 * 14  # each block loaded twice: by the replay guard's forward, then by the engine
    assert all(p.is_meta for p in weights.blocks.parameters())


def test_block_memory_check(tmp_path):
    from pifa.streaming import block_memory, check_block_memory, memory_limit

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    weights = StreamedWeights(tmp_path / "dense")
    config = _configs()["mpifa"]
    need = block_memory(weights.blocks[0], config, 64)
    assert need > sum(p.numel() * 4 for p in weights.blocks[0].parameters())
    check_block_memory(weights, config, 64, limit=need)  # just enough
    with pytest.raises(ValueError, match=r"one block needs about .* GiB but only .* GiB"):
        check_block_memory(weights, config, 64, limit=need - 1)
    assert memory_limit() is None or memory_limit() > 0


@pytest.mark.parametrize("stream", [False, True])
def test_stage_seconds_add_up_to_the_total(tmp_path, stream):
    """The per-stage cost report accounts for the run's time (what is left is bookkeeping)."""
    config = _configs()["mpifa"]
    if stream:
        tiny_model("llama").save_pretrained(tmp_path / "dense")
        report = compress_streamed(tmp_path / "dense", tmp_path / "out", config, CALIB, batch_size=4,
                                   progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
        assert {"load", "write", "checkpoint"} <= report.stage_seconds.keys()
    else:
        report = pifa.compress(tiny_model("llama"), config, CALIB, batch_size=4, progress=False)
        assert not {"load", "write", "broadcast"} & report.stage_seconds.keys()
    counted = sum(report.stage_seconds.values())
    assert counted <= report.seconds
    assert report.seconds - counted <= 0.1 * report.seconds + 0.05, report.stage_seconds
