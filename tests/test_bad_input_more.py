"""More bad input, across compress, eval, info, bench, report, the Python API and from_pretrained: each gives a
one-line error (``ValueError`` in the API, exit code 2 on the command line), no traceback, and nothing written."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import pifa
from helpers import CALIB_TEXT, bare_linear_blocks, char_tokenizer, compress_argv, tiny_model
from pifa import CompressionConfig, PivotLinear, load_compressed, save_compressed
from pifa.app.cli import main
from pifa.data import calibration_batches
from pifa.evaluate import mean_pooled_embeddings, perplexity

CUDA = torch.cuda.is_available()


def _oov_model():
    """A tiny Llama with a vocabulary of 20: the 32-id character tokenizer reaches beyond it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Model folders built once; every test works on its own copy."""
    root = tmp_path_factory.mktemp("templates")
    tokenizer = char_tokenizer(64)
    dense = tiny_model("llama")
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    oov = _oov_model()
    oov.save_pretrained(root / "oov")
    tokenizer.save_pretrained(root / "oov")
    comp = tiny_model("llama")
    comp.model.layers[0].self_attn.q_proj = PivotLinear.from_linear(comp.model.layers[0].self_attn.q_proj, 8)
    save_compressed(comp, root / "comp", tokenizer=tokenizer)
    save_compressed(comp, root / "comp-notok")
    return root


@pytest.fixture
def env(templates, tmp_path):
    for name in ("dense", "oov", "comp", "comp-notok"):
        shutil.copytree(templates / name, tmp_path / name)
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "sentences.txt").write_text("one sentence\nanother sentence\n")
    return tmp_path


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _module(data):
    return data["modules"]["model.layers.0.self_attn.q_proj"]


def _report_file(root: Path, payload) -> str:
    (root / "r.json").write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(root / "r.json")


def _retype(root: Path, key: str, dtype: torch.dtype) -> None:
    file = root / "comp" / "model.safetensors"
    tensors = load_file(file)
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, file, metadata={"format": "pt"})


def _compress(root, *extra, model="dense"):
    return compress_argv(root / model, root / "out", *extra)


def _eval(root, *extra, model="dense", device="cpu"):
    return ["eval", str(root / model), "--device", device, *extra]


def _ppl(root, *extra, model="dense", device="cpu"):
    return _eval(root, "--ppl", str(root / "calib.txt"), "--seq-len", "16", *extra, model=model, device=device)


# case -> (prepare(root) -> argv, expected text of the one error line)
CLI_CASES = {
    # compress: devices, dtypes, sizes, numbers
    "compress-device-meta": (lambda r: _compress(r)[:-2] + ["--device", "meta"], "device 'meta' cannot run a model"),
    "compress-device-cuda-index": (lambda r: _compress(r)[:-2] + ["--device", "cuda:99"], "is not available"),
    "compress-device-garbage": (lambda r: _compress(r)[:-2] + ["--device", "gpu-0"], "unknown device 'gpu-0'"),
    "compress-dtype-float8": (lambda r: _compress(r, "--dtype", "float8_e4m3fn"), "unsupported dtype 'float8_e4m3fn'"),
    "compress-dtype-fp16": (lambda r: _compress(r, "--dtype", "fp16"), "error: unsupported dtype 'fp16'"),
    "compress-batch-size-0": (lambda r: _compress(r, "--batch-size", "0"), "batch_size 0 must be a positive integer"),
    "compress-batch-size-negative": (lambda r: _compress(r, "--batch-size", "-3"), "batch_size -3 must be a positive"),
    "compress-samples-huge": (lambda r: _compress(r, "--samples", "1000000000"), "calibration tokens pifa accepts"),
    "compress-seq-len-0": (lambda r: _compress(r, "--seq-len", "0"), "seq_len 0 must be a positive integer"),
    "compress-damping-inf": (lambda r: _compress(r, "--damping", "inf"), "damping inf must be a finite number"),
    "compress-ridge-nan": (lambda r: _compress(r, "--ridge", "nan"), "ridge nan must be >= 0"),
    "compress-mix-out-of-range": (lambda r: _compress(r, "--mix", "2"), "mix 2.0 is outside [0, 1]"),
    "compress-seed-negative": (lambda r: _compress(r, "--seed", "-1"), "--seed -1 is out of range"),
    "compress-seed-huge": (lambda r: _compress(r, "--seed", str(2**64)), f"--seed {2**64} is out of range"),
    "compress-rank-multiple-of-0": (lambda r: _compress(r, "--rank-multiple-of", "0"), "rank_multiple_of 0 must be"),
    "compress-als-steps-negative": (lambda r: _compress(r, "--als-steps", "-1"), "als_steps -1 must be a non-negative"),
    # compress: options that cannot apply, near misses
    "compress-attn-density-with-2:4": (lambda r: _compress(r, "--method", "wanda", "--pattern", "2:4",
                                                           "--attn-density", "0.4"),
                                       "attn_density cannot apply to the N:M pattern 2:4"),
    "compress-owl-with-4:8": (lambda r: _compress(r, "--method", "sparsegpt", "--pattern", "4:8",
                                                  "--allocation", "owl"),
                              "allocation 'owl' cannot apply to the N:M pattern 4:8"),
    "compress-pattern-with-low-rank": (lambda r: _compress(r, "--pattern", "2:4"), "needs a sparse method"),
    "compress-near-miss-method": (lambda r: _compress(r, "--method", "mpfia"), "did you mean 'mpifa'?"),
    "compress-near-miss-allocation": (lambda r: _compress(r, "--allocation", "owls"), "did you mean 'owl'?"),
    "compress-near-miss-pivot": (lambda r: _compress(r, "--pivot-method", "qrr"), "did you mean 'qr'?"),
    "compress-targets-match-nothing": (lambda r: _compress(r, "--targets", "*nothing*"), "no linear in model.layers"),
    # compress: model folders
    "compress-tokenizer-beyond-vocabulary": (lambda r: _compress(r, model="oov"),
                                             "outside the model's vocabulary of 20"),
    "compress-architectures-pipeline": (
        lambda r: (_edit_json(r / "dense" / "config.json", lambda c: c.update(architectures=["pipeline"])),
                   _compress(r))[1], "names 'pipeline', which is not a transformers model class"),
    "compress-architectures-autotokenizer": (
        lambda r: (_edit_json(r / "dense" / "config.json", lambda c: c.update(architectures=["AutoTokenizer"])),
                   _compress(r))[1], "names 'AutoTokenizer', which is not a transformers model class"),
    "compress-architectures-not-a-list": (
        lambda r: (_edit_json(r / "dense" / "config.json", lambda c: c.update(architectures="LlamaForCausalLM")),
                   _compress(r))[1], "'architectures' must be a list of class names"),
    "compress-config-not-json": (lambda r: ((r / "dense" / "config.json").write_text("{oops"), _compress(r))[1],
                                 "config.json of model"),
    "compress-config-is-a-list": (lambda r: ((r / "dense" / "config.json").write_text("[1, 2]"), _compress(r))[1],
                                  "is not a JSON object"),
    "compress-model-is-a-plain-file": (lambda r: compress_argv(r / "notes.txt", r / "out"),
                                       "is not a directory (nor a .gguf file)"),
    "compress-missing-gguf": (lambda r: compress_argv(r / "nope.gguf", r / "out"), "does not exist"),
    # compress: outputs
    "compress-out-parent-is-a-file": (lambda r: compress_argv(r / "dense", r / "notes.txt" / "out"),
                                      "is a file, not a folder"),
    "compress-out-is-a-file": (lambda r: compress_argv(r / "dense", r / "notes.txt", "--overwrite"),
                               "exists and is not a directory"),
    "compress-calib-folder-without-text": (
        lambda r: ((r / "empty").mkdir(), (r / "empty" / "x.bin").write_bytes(b"\0"),
                   _compress(r)[:4] + [str(r / "empty")] + _compress(r)[5:])[2], "contains no text"),
    "compress-calib-bad-jsonl": (
        lambda r: ((r / "c.jsonl").write_text("{\"text\": 1}\n"), _compress(r)[:4] + [str(r / "c.jsonl")]
                   + _compress(r)[5:])[1], "line 1 has no string 'text' field"),
    # eval
    "eval-json-parent-is-a-file": (lambda r: _ppl(r, "--json", str(r / "notes.txt" / "x.json")),
                                   "is a file, not a folder"),
    "eval-json-is-a-folder": (lambda r: _ppl(r, "--json", str(r / "dense")), "is a folder; give a file name"),
    "eval-json-would-replace-an-input": (lambda r: _ppl(r, "--json", str(r / "calib.txt")),
                                         "pifa never writes over or into its inputs"),
    "eval-device-meta": (lambda r: _ppl(r, device="meta"), "device 'meta' cannot run"),
    "eval-dtype-float8": (lambda r: _ppl(r, "--dtype", "float8_e5m2"), "unsupported dtype 'float8_e5m2'"),
    "eval-batch-size-0": (lambda r: _ppl(r, "--batch-size", "0"), "--batch-size 0 must be a positive integer"),
    "eval-max-windows-0": (lambda r: _ppl(r, "--max-windows", "0"), "--max-windows 0 must be a positive integer"),
    "eval-seq-len-1": (lambda r: _ppl(r)[:-2] + ["--seq-len", "1"], "--seq-len 1 must be an integer >= 2"),
    "eval-sentences-file-missing": (lambda r: _eval(r, "--sentences", str(r / "nope.txt"), "--dense", str(r / "dense")),
                                    "--sentences file"),
    "eval-tokenizer-beyond-vocabulary": (lambda r: _ppl(r, model="oov"), "outside the model's vocabulary of 20"),
    "eval-compressed-rank-not-an-integer": (
        lambda r: (_edit_json(r / "comp" / "pifa_config.json", lambda d: _module(d).update(rank="8")),
                   _ppl(r, model="comp"))[1], "has rank '8'; expected a positive integer"),
    "eval-compressed-without-tokenizer": (lambda r: _ppl(r, model="comp-notok"), "could not load the tokenizer"),
    "eval-fidelity-without-dense": (lambda r: _eval(r, "--sentences", str(r / "sentences.txt"), model="comp"),
                                    "needs --dense"),
    "eval-missing-gguf": (lambda r: _eval(r, "--ppl", str(r / "calib.txt"), model="x.gguf"), "does not exist"),
    # info: pifa_config.json fields of the wrong type
    "info-rank-float": (lambda r: (_edit_json(r / "comp" / "pifa_config.json", lambda d: _module(d).update(rank=8.5)),
                                   ["info", str(r / "comp")])[1], "has rank 8.5; expected a positive integer"),
    "info-rank-list": (lambda r: (_edit_json(r / "comp" / "pifa_config.json", lambda d: _module(d).update(rank=[8])),
                                  ["info", str(r / "comp")])[1], "has rank [8]"),
    "info-kind-list": (lambda r: (_edit_json(r / "comp" / "pifa_config.json",
                                             lambda d: _module(d).update(kind=["pivot"])),
                                  ["info", str(r / "comp")])[1], "has unknown kind ['pivot']"),
    "info-kind-nested-object": (lambda r: (_edit_json(r / "comp" / "pifa_config.json",
                                                      lambda d: _module(d).update(kind={"pivot": {"rank": 8}})),
                                           ["info", str(r / "comp")])[1], "has unknown kind {'pivot'"),
    "info-in-features-string": (lambda r: (_edit_json(r / "comp" / "pifa_config.json",
                                                      lambda d: _module(d).update(in_features="32")),
                                           ["info", str(r / "comp")])[1], "has in_features '32'"),
    "info-bias-string": (lambda r: (_edit_json(r / "comp" / "pifa_config.json", lambda d: _module(d).update(bias="no")),
                                    ["info", str(r / "comp")])[1], "expected true or false"),
    "info-rank-above-shape": (lambda r: (_edit_json(r / "comp" / "pifa_config.json",
                                                    lambda d: _module(d).update(rank=33)),
                                         ["info", str(r / "comp")])[1], "rank 33 above min(in_features, out_features)"),
    "info-modules-a-list": (lambda r: (_edit_json(r / "comp" / "pifa_config.json", lambda d: d.update(modules=[1])),
                                       ["info", str(r / "comp")])[1], "has no 'modules' table"),
    "info-pruned-shape-not-an-integer": (
        lambda r: (_edit_json(r / "comp" / "pifa_config.json", lambda d: d.update(pruned={
            "model.layers.1.mlp.up_proj": {"out_features": "64", "in_features": 32, "pattern": "2:4"}})),
                   ["info", str(r / "comp")])[1],
        "pruned module 'model.layers.1.mlp.up_proj' has out_features '64'"),
    "info-compression-a-list": (lambda r: (_edit_json(r / "comp" / "pifa_config.json",
                                                      lambda d: d.update(compression=["mpifa"])),
                                           ["info", str(r / "comp")])[1], "'compression' must be a JSON object"),
    "info-dtype-unknown": (lambda r: (_edit_json(r / "comp" / "pifa_config.json", lambda d: d.update(dtype="float64")),
                                      ["info", str(r / "comp")])[1], "dtype 'float64' is not one of"),
    "info-config-a-list": (lambda r: ((r / "comp" / "pifa_config.json").write_text("[]"), ["info", str(r / "comp")])[1],
                           "unknown pifa_config.json format_version None"),
    "info-config-not-json": (lambda r: ((r / "comp" / "pifa_config.json").write_text("{"),
                                        ["info", str(r / "comp")])[1],
                             "is not valid JSON"),
    "info-coeff-int32": (lambda r: (_retype(r, "model.layers.0.self_attn.q_proj.coeff", torch.int32),
                                    ["info", str(r / "comp")])[1], "is I32 in model.safetensors"),
    "info-pivot-index-float": (lambda r: (_retype(r, "model.layers.0.self_attn.q_proj.pivot_index", torch.float32),
                                          ["info", str(r / "comp")])[1], "pivot indices must be I64"),
    "info-no-config-json": (lambda r: ((r / "comp" / "config.json").unlink(), ["info", str(r / "comp")])[1],
                            "is missing config.json"),
    # bench
    "bench-layer-device-meta": (lambda r: ["bench", "layer", "--device", "meta"], "device 'meta' cannot run"),
    "bench-layer-dtype-float8": (lambda r: ["bench", "layer", "--dtypes", "float8_e4m3fn", "--device", "cpu"],
                                 "unsupported dtype 'float8_e4m3fn'"),
    "bench-layer-rounds-0": (lambda r: ["bench", "layer", "--rounds", "0", "--device", "cpu"],
                             "--rounds 0 must be a positive integer"),
    "bench-layer-json-parent-is-a-file": (lambda r: ["bench", "layer", "--device", "cpu", "--json",
                                                     str(r / "notes.txt" / "b.json")], "is a file, not a folder"),
    "bench-model-batch-0": (lambda r: ["bench", "model", "--batch", "0", "--device", "cpu"],
                            "--batch 0 must be a positive integer"),
    "bench-model-density-out-of-range": (lambda r: ["bench", "model", "--density", "1.5", "--device", "cpu"],
                                         "--density 1.5 is outside (0, 1]"),
    "bench-model-dtype-fp16": (lambda r: ["bench", "model", "--dtype", "fp16", "--device", "cpu"],
                               "unsupported dtype 'fp16'"),
    "bench-model-compressed-without-dense": (lambda r: ["bench", "model", "--compressed", str(r / "comp"),
                                                        "--device", "cpu"], "--compressed needs --dense"),
    "bench-model-compressed-not-pifa": (lambda r: ["bench", "model", "--compressed", str(r / "dense"), "--dense",
                                                   str(r / "dense"), "--device", "cpu"], "is missing pifa_config.json"),
    "bench-model-other-vocabulary": (lambda r: ["bench", "model", "--compressed", str(r / "comp"), "--dense",
                                                str(r / "oov"), "--device", "cpu"],
                                     "not the model it was compressed from"),
    # report
    "report-missing-file": (lambda r: ["report", str(r / "nope.json"), "--out", str(r / "rep")], "does not exist"),
    "report-not-json": (lambda r: ["report", _report_file(r, "{oops"), "--out", str(r / "rep")], "is not valid JSON"),
    "report-top-level-list": (lambda r: ["report", _report_file(r, [1, 2]), "--out", str(r / "rep")],
                              "is not a pifa results file"),
    "report-row-not-an-object": (lambda r: ["report", _report_file(r, {"rows": [3]}), "--out", str(r / "rep")],
                                 "is not a pifa results file"),
    "report-quality-row-without-density": (
        lambda r: ["report", _report_file(r, {"rows": [{"method": "svd", "heldout": {"ppl": 3.0}}]}),
                   "--out", str(r / "rep")], "needs a 'method' name and a numeric 'density'"),
    "report-quality-metric-not-a-number": (
        lambda r: ["report", _report_file(r, {"rows": [{"method": "svd", "density": 0.5, "cosine": "high"}]}),
                   "--out", str(r / "rep")], "non-numeric cosine 'high'"),
    "report-eval-malformed": (lambda r: ["report", _report_file(r, {"kind": "eval", "perplexity": 3}),
                                         "--out", str(r / "rep")], "a field is missing or malformed"),
    "report-out-is-a-file": (lambda r: ["report", _report_file(r, {"rows": [{"method": "svd", "density": 0.5}]}),
                                        "--out", str(r / "notes.txt")], "--out"),
    "report-out-parent-is-a-file": (lambda r: ["report", _report_file(r, {"rows": [{"method": "svd", "density": 0.5}]}),
                                               "--out", str(r / "notes.txt" / "rep")], "is a file, not a folder"),
}


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(env, case, capsys):
    prepare, expected = CLI_CASES[case]
    argv = prepare(env)
    before = _tree(env)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (captured.out[-2000:], captured.err[-2000:])
    assert len(lines) == 1 and "Traceback" not in captured.err, lines
    assert lines[0].startswith(f"pifa {argv[0]}: error: ") and expected in lines[0], lines
    assert "could not load model" not in lines[0] or "dtype" not in lines[0]  # a bad --dtype is not the model's fault
    assert _tree(env) == before, "something was written or left behind"


def test_argparse_rejects_a_float_sample_count(env, capsys):
    with pytest.raises(SystemExit) as info:
        main(_compress(env, "--samples", "1e9"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid int value: '1e9'" in err[0]


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["compress", "eval", "bench"])
def test_cuda_without_a_gpu(env, command, capsys):
    argv = {"compress": _compress(env)[:-2] + ["--device", "cuda"],
            "eval": _ppl(env, device="cuda"),
            "bench": ["bench", "layer", "--device", "cuda"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pifa {command}: error: device 'cuda' is not available: this torch sees no CUDA GPU"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_parent(env, capsys):
    locked = env / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(compress_argv(env / "dense", locked / "out")) == 2
        assert "is not writable" in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_lm_eval_offline_is_one_line(env, tmp_path):
    """lm-eval tasks whose data must come from the hub, offline: one line instead of a long traceback."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "offline_probe.yaml").write_text(
        "task: offline_probe\ndataset_path: pifa-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n")
    script = ("import functools, sys\nimport lm_eval.tasks\n"
              "lm_eval.tasks.TaskManager = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)\n"
              "from pifa.app.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join([str(Path(pifa.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script, "eval", str(env / "dense"), "--tasks", "offline_probe",
                             "--include-path", str(tasks), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env=env_vars)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("pifa eval: error:")]
    assert len(errors) == 1 and "lm-eval could not load the data of offline_probe (offline?" in errors[0]


# --- the Python API: ValueError with one line -----------------------------------------------------------

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _bare_linear_blocks():
    return bare_linear_blocks()


API_CASES = {
    "compress-empty-calibration": (lambda p: pifa.compress(tiny_model("llama"), CompressionConfig(),
                                                           torch.empty(0, 16, dtype=torch.long), progress=False),
                                   "non-empty"),
    "compress-empty-batch-list": (lambda p: pifa.compress(tiny_model("llama"), CompressionConfig(), [], progress=False),
                                  "non-empty"),
    "compress-ids-beyond-vocabulary": (lambda p: pifa.compress(tiny_model("llama"), CompressionConfig(), CALIB + 200,
                                                               progress=False),
                                       "outside the model's vocabulary of 128"),
    "compress-negative-ids": (lambda p: pifa.compress(tiny_model("llama"), CompressionConfig(), CALIB - 200,
                                                      progress=False), "outside the model's vocabulary"),
    "compress-batch-size-0": (lambda p: pifa.compress(tiny_model("llama"), CompressionConfig(), CALIB, batch_size=0,
                                                      progress=False), "batch_size 0 must be a positive integer"),
    "compress-calib-none": (lambda p: pifa.compress(tiny_model("llama"), CompressionConfig(), None, progress=False),
                            "calib must be"),
    "compress-bare-linear-blocks": (lambda p: pifa.compress(_bare_linear_blocks(), CompressionConfig(method="svd"),
                                                            torch.randint(0, 16, (4, 8)), progress=False),
                                    "no block list found"),
    "config-targets-none": (lambda p: CompressionConfig(targets=None), "targets must be a tuple of fnmatch patterns"),
    "config-ignore-a-string": (lambda p: CompressionConfig(ignore="*lm_head*"), "ignore must be a tuple"),
    "config-damping-inf": (lambda p: CompressionConfig(damping=math.inf), "damping inf must be a finite number"),
    "config-owl-threshold-inf": (lambda p: CompressionConfig(owl_threshold=math.inf), "owl_threshold inf must be"),
    "config-near-miss-method": (lambda p: CompressionConfig(method="svdllm"), "did you mean 'svd-llm'?"),
    "config-attn-density-with-2:4": (lambda p: CompressionConfig(method="wanda", pattern="2:4", attn_density=0.3),
                                     "cannot apply to the N:M pattern"),
    "load-dtype-float8": (lambda p: load_compressed(p, dtype=torch.float8_e4m3fn), "unsupported dtype 'float8_e4m3fn'"),
    "load-dtype-fp16": (lambda p: load_compressed(p, dtype="fp16"), "unsupported dtype 'fp16'"),
    "load-dtype-int": (lambda p: load_compressed(p, dtype=torch.int32), "unsupported dtype 'int32'"),
    "load-device-meta": (lambda p: load_compressed(p, device="meta"), "device 'meta' cannot run a model"),
    "load-device-cuda-index": (lambda p: load_compressed(p, device="cuda:99"), "is not available"),
    "load-device-garbage": (lambda p: load_compressed(p, device="tpu0"), "unknown device 'tpu0'"),
    "save-non-empty-without-overwrite": (lambda p: save_compressed(tiny_model("llama"), p),
                                         "already exists and is not empty (pass overwrite=True"),
    "save-parent-is-a-file": (lambda p: save_compressed(tiny_model("llama"), p / "config.json" / "x"),
                              "is a file, not a folder"),
    "save-onto-a-file": (lambda p: save_compressed(tiny_model("llama"), p / "config.json", overwrite=True),
                         "exists and is not a directory"),
    "calibration-seed-negative": (lambda p: calibration_batches(char_tokenizer(), [CALIB_TEXT], 2, 8, seed=-1),
                                  "seed -1 is out of range"),
    "calibration-samples-huge": (lambda p: calibration_batches(char_tokenizer(), [CALIB_TEXT], 10**9, 8),
                                 "calibration tokens"),
    "perplexity-ids-beyond-vocabulary": (lambda p: perplexity(tiny_model("llama"), torch.arange(100, 200), 16),
                                         "outside the model's vocabulary of 128"),
    "embeddings-batch-size-0": (lambda p: mean_pooled_embeddings(tiny_model("bert"), char_tokenizer(), ["a b"], 0),
                                "batch_size 0 must be a positive integer"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj = PivotLinear.from_linear(model.model.layers[0].self_attn.q_proj, 8)
    return save_compressed(model, tmp_path_factory.mktemp("api") / "m")


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_bad_input_is_a_one_line_value_error(saved, case):
    call, expected = API_CASES[case]
    before = _tree(saved.parent)
    with pytest.raises(ValueError) as info:
        call(saved)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert _tree(saved.parent) == before


# --- from_pretrained: a bad quantization_config block is a one-line ValueError --------------------------

@pytest.mark.parametrize("change, expected", [
    ({"rank": "8"}, "has rank '8'; expected a positive integer"),
    ({"kind": ["pivot"]}, "has unknown kind ['pivot']"),
    ({"bias": None}, "expected true or false"),
    ({"out_features": 0}, "has out_features 0"),
])
def test_from_pretrained_bad_quantization_config(saved, tmp_path, change, expected):
    path = Path(shutil.copytree(saved, tmp_path / "m"))
    _edit_json(path / "config.json", lambda c: c["quantization_config"]["modules"][
        "model.layers.0.self_attn.q_proj"].update(change))
    with pytest.raises(ValueError) as info:
        transformers.AutoModelForCausalLM.from_pretrained(path)
    assert expected in str(info.value) and "\n" not in str(info.value)
