"""The bad-input matrix: every kind of bad input to every command and to the Python API, each one case.

On the command line (``test_bad_input``, one parametrised test over every case): one line naming the problem,
exit code 2, no traceback, and nothing written or changed (every byte under the test folder compared). In the
Python API: a ``ValueError`` with a one-line message. The cases: damaged, lying, foreign or oversized input files
(weights, shard headers, indexes, configs declaring sizes the weights cannot have, GGUF headers, chat templates,
deeply nested JSON), what surrounds the output (the lock file, the checkpoint, a full disk), unknown or near-miss
names, numbers out of range, devices, torch.distributed set up by hand, ``pifa report`` inputs, and the layers.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

import pifa
from helpers import CALIB_TEXT, bare_linear_blocks, char_tokenizer, compress_argv, tiny_model
from pifa import CompressionConfig, LowRankLinear, PivotLinear, load_compressed, save_compressed, select_pivots
from pifa.app.cli import main
from pifa.data import calibration_batches
from pifa.evaluate import mean_pooled_embeddings, perplexity

CUDA = torch.cuda.is_available()


# --- the folders every case starts from -------------------------------------------------------------------

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
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("short")
    return tmp_path


# --- the cases of the matrix's own damages ------------------------------------------------------------

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
    if case.startswith("weights-"):
        _damage_weights(dense, case.split("-", 1)[1].rsplit("-", 1)[0])
    if case.startswith("declared-"):  # config.json declares a model the weights cannot be: refused before building it
        folder = root / "comp" if case.endswith("-compressed-eval") else dense
        config = json.loads((folder / "config.json").read_text())
        config.update(DECLARED[case.removeprefix("declared-").rsplit("-", 1)[0].removesuffix("-compressed")][0])
        (folder / "config.json").write_text(json.dumps(config))
    if case.startswith("gguf-"):
        (root / "bomb.gguf").write_bytes(GGUF_BOMBS[case.rsplit("-", 1)[0]][0])
    if case.startswith("nested-"):  # a valid JSON file with one key nested 100,000 deep (RecursionError in json)
        target = {"nested-pifa-config": root / "comp" / "pifa_config.json", "nested-config": dense / "config.json",
                  "nested-tokenizer-config": dense / "tokenizer_config.json",
                  "nested-calibration-jsonl": root / "calib.jsonl"}[case.rsplit("-", 1)[0]]
        text = target.read_text() if target.exists() else '{"text": "the quick brown fox"}\n'
        target.write_text(text.strip()[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    if case in REPORTS:
        (root / "results.json").write_text(REPORTS[case][0])
    if case.startswith("index-"):
        _damage_index(root, dense, case.removeprefix("index-").rsplit("-", 1)[0])
    if case.startswith("compressed-"):
        _damage_compressed(root / "comp", case.removeprefix("compressed-").removesuffix("-eval"))
    if case == "auto-chat-short-text":  # a chat template, and too little text to wrap in it (enough for plain text)
        (root / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 3)
        config = json.loads((dense / "tokenizer_config.json").read_text())
        config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        (dense / "tokenizer_config.json").write_text(json.dumps(config))
    if case.startswith("chat-template-"):  # a model's chat template is input too: whatever it does, one line
        config = json.loads((dense / "tokenizer_config.json").read_text())
        config["chat_template"] = CHAT_TEMPLATES[case]
        (dense / "tokenizer_config.json").write_text(json.dumps(config))
        (root / "calib.txt").write_text(("the quick brown fox jumps over the lazy dog, again and again. " * 5
                                         + "\n \n") * 10)
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
        "auto-chat-short-text": compress_argv(dense, out),
        **{case: compress_argv(dense, out) for case in LOCK_CASES},
        **{case: compress_argv(dense, out) for case in CHAT_TEMPLATES},  # --calib-format auto: chat
        **{f"weights-{damage}-{path}": argv for damage in WEIGHT_DAMAGE for path, argv in {
            "compress": compress_argv(dense, out), "stream": compress_argv(dense, out, "--stream"),
            "eval": ["eval", str(dense), "--ppl", str(root / "calib.txt"), "--seq-len", "16"]}.items()},
        **{f"declared-{damage}-{path}": argv for damage in DECLARED for path, argv in {
            "compress": compress_argv(dense, out), "stream": compress_argv(dense, out, "--stream"),
            "eval": ["eval", str(dense), "--ppl", str(root / "calib.txt"), "--seq-len", "16"],
            "compressed-eval": ["eval", str(root / "comp"), "--ppl", str(root / "calib.txt"), "--seq-len", "16"],
        }.items()},
        **{f"{bomb}-{path}": argv for bomb in GGUF_BOMBS for path, argv in {
            "compress": compress_argv(root / "bomb.gguf", out),
            "eval": ["eval", str(root / "bomb.gguf"), "--ppl", str(root / "calib.txt"), "--seq-len", "16"]}.items()},
        **{f"index-{damage}-{path}": argv for damage in INDEX_DAMAGE for path, argv in {
            "compress": compress_argv(dense, out), "stream": compress_argv(dense, out, "--stream"),
            "eval": ["eval", str(dense), "--ppl", str(root / "calib.txt"), "--seq-len", "16"]}.items()},
        **{f"compressed-{damage}-eval": ["eval", str(root / "comp"), "--ppl", str(root / "calib.txt"), "--seq-len", "16"]
           for damage in COMPRESSED_DAMAGE},
        **{case: compress_argv(dense, out) for case in DIST_ENV},
        **{case: ["report", str(root / "results.json"), "--out", str(root / "report")] for case in REPORTS},
        "nested-pifa-config-info": ["info", str(root / "comp")],
        "nested-pifa-config-eval": ["eval", str(root / "comp"), "--ppl", str(root / "calib.txt"), "--seq-len", "16"],
        **{f"nested-{name}-{path}": argv for name in ("config", "tokenizer-config") for path, argv in {
            "compress": compress_argv(dense, out), "stream": compress_argv(dense, out, "--stream"),
            "eval": ["eval", str(dense), "--ppl", str(root / "calib.txt"), "--seq-len", "16"]}.items()},
        "nested-calibration-jsonl-compress": compress_argv(dense, out)[:4] + [str(root / "calib.jsonl")]
        + compress_argv(dense, out)[5:],
        "sensitivity-cache-unwritable": compress_argv(dense, out, "--allocation", "sensitivity",
                                                      "--sensitivity-cache", "/proc/pifa-sensitivity-cache.json"),
        "eval-missing-text": ["eval", str(dense), "--ppl", str(root / "nope.txt"), "--seq-len", "16"],
        "eval-seq-len-beyond-model": ["eval", str(dense), "--ppl", str(root / "calib.txt"), "--seq-len", "4096"],
        "eval-seq-len-beyond-text": ["eval", str(dense), "--ppl", str(root / "short.txt"), "--seq-len", "32"],
        "bench-non-positive": ["bench", "layer", "--rank", "-3"],
        "info-missing-directory": ["info", str(root / "nope")],
        "unknown-format-version": ["info", str(root / "comp")],
        "truncated-compressed-weights": ["info", str(root / "comp")],
    }[case]


# Silently random input weights: a tensor missing (from the one file, or from the shard its index names), a header
# saying I32 for float32 data, a wrong shape. Every input path refuses the same damage, before any work.
WEIGHT_DAMAGE = {
    "missing": "lacks weights the model needs: 'model.norm.weight'",
    "shard-missing": "lacks weights the model needs: 'model.layers.1.self_attn.v_proj.weight'",
    "int32-header": "stores 'model.layers.0.mlp.up_proj.weight' as I32, but the model holds it as float32",
    "wrong-shape": "holds weights of the wrong shape: 'model.layers.0.mlp.up_proj.weight' is (3, 3), the model "
                   "needs (64, 32)",
    # a shard's header lying about a tensor: a dtype or offsets its bytes do not fit (safetensors refuses the header),
    # or the transposed shape (the same bytes)
    "shard-header-dtype-lie": "model-00001-of-00002.safetensors' is not a readable safetensors file: Error while "
                              "deserializing header: invalid shape, data type, or offset for tensor",
    "shard-header-offsets-lie": "model-00001-of-00002.safetensors' is not a readable safetensors file",
    "shard-header-shape-lie": "holds weights of the wrong shape: 'model.layers.0.mlp.up_proj.weight' is (32, 64), the "
                              "model needs (64, 32)",
}
# Resource bombs: a config.json declaring sizes its weights cannot have, refused from the headers before any model is
# built or allocated (100,000 layers took 100 s and 5.4 GB to refuse under --stream; a declared hidden size makes
# transformers allocate every linear at that size). Each through compress, --stream, eval and eval of a compressed folder.
DECLARED = {
    "100000-layers": ({"num_hidden_layers": 100_000}, "config.json declares 100,000 layers (num_hidden_layers) but its "
                                                      "weights hold 2: refused before building the model"),
    "hidden-65536": ({"hidden_size": 65536}, "config.json declares hidden_size 65,536, larger than any tensor in its "
                                             "weights (the largest dimension is 128)"),
    "hidden-48": ({"hidden_size": 48}, "config.json declares hidden_size 48, but no tensor in its weights has that "
                                       "dimension"),
    "head-dim-2e9": ({"head_dim": 2**31}, "config.json declares head_dim 2,147,483,648, larger than any tensor"),
}
DECLARED_WRONG_SHAPE = {  # within the files' sizes but not theirs: the skeleton on the meta device against the headers
    "intermediate-96": ({"intermediate_size": 96}, "holds weights of the wrong shape: 'model.layers.0.mlp.down_proj.weight' "
                                                   "is (32, 64), the model needs (32, 96)"),
}
DECLARED.update(DECLARED_WRONG_SHAPE)

def _gguf(*metadata, tensors=b"", tensor_count=0):
    """A GGUF v3 file of the given (already encoded) metadata pairs and tensor infos, and 256 bytes of data."""
    return (b"GGUF" + struct.pack("<IQQ", 3, tensor_count, len(metadata)) + b"".join(metadata) + tensors
            + b"\0" * 256)


def _gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf_pair(key, value_type, payload):
    return _gguf_string(key) + struct.pack("<I", value_type) + payload


NORM_TENSOR = _gguf_string("blk.0.attn_norm.weight") + struct.pack("<IQIQ", 1, 32, 0, 0)  # 32 float32 at 0
ARCHITECTURE = _gguf_pair("general.architecture", 8, _gguf_string("llama"))
# GGUF headers whose counts claim more than the file holds (pifa's scan and transformers' reader both multiplied them
# out: MemoryError, OverflowError), and a chat template of more than 1 MiB: refused from the header, before any read.
GGUF_BOMBS = {
    "gguf-array-count-2^40": (_gguf(_gguf_pair("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2**40)), ARCHITECTURE),
                              "array count 1,099,511,627,776 needs at least 4,398,046,511,104 bytes"),
    "gguf-array-count-2^62": (_gguf(ARCHITECTURE, _gguf_pair("tokenizer.ggml.token_type", 9,
                                                             struct.pack("<IQ", 5, 2**62))),
                              "array count 4,611,686,018,427,387,904 needs at least"),
    "gguf-string-array-count-2^40": (_gguf(ARCHITECTURE, _gguf_pair("tokenizer.ggml.tokens", 9,
                                                                    struct.pack("<IQ", 8, 2**40))),
                                     "array count 1,099,511,627,776 needs at least 8,796,093,022,208 bytes"),
    "gguf-metadata-count-2^62": (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62) + b"\0" * 256,
                                 "metadata key count 4,611,686,018,427,387,904 needs at least"),
    "gguf-tensor-beyond-file": (_gguf(ARCHITECTURE, tensor_count=1, tensors=_gguf_string("token_embd.weight")
                                      + struct.pack("<I2QIQ", 2, 2**20, 2**20, 0, 0)),
                                "tensor 'token_embd.weight' of shape (1048576, 1048576) claims 4,398,046,511,104 "
                                "bytes at offset 0, beyond the end of the file"),
    "gguf-100000-blocks": (_gguf(ARCHITECTURE, _gguf_pair("llama.block_count", 4, struct.pack("<I", 100_000)),
                                 tensor_count=1, tensors=NORM_TENSOR),
                           "declares 100,000 blocks (block_count) but holds tensors of 1: refused before building"),
    "gguf-embedding-65536": (_gguf(ARCHITECTURE, _gguf_pair("llama.embedding_length", 4, struct.pack("<I", 65536)),
                                   tensor_count=1, tensors=NORM_TENSOR),
                             "declares embedding_length 65,536, but no tensor has that dimension"),
    "gguf-chat-template-over-1mib": (_gguf(ARCHITECTURE, _gguf_pair("tokenizer.chat_template", 8,
                                                                    _gguf_string("{# " + "x" * 2**20 + " #}"))),
                                     "has a chat template of 1,048,582 characters, more than the 1,048,576 pifa "
                                     "accepts"),
}

BIG = 10**400 + 7  # a 401-digit integer: valid JSON, but float() overflows (plotting raised OverflowError)
SPEED_ROW = {"dtype": "float32", "tokens": 1, "dense_ms": 1.0}
REPORTS = {  # pifa report on results files built to break it: (file text, the one line)
    "report-deeply-nested": ("[" * 100_000 + "]" * 100_000, "nests its JSON too deeply to be a pifa results file"),
    "report-deeply-nested-inside-a-row": (
        json.dumps({"rows": [{"method": "svd", "density": 0.5}]})[:-3] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}]}",
        "nests its JSON too deeply"),
    "report-400-digit-density": (json.dumps({"rows": [{"method": "svd", "density": BIG}]}),
                                 "needs a 'method' name and a numeric 'density' (a finite number; it has (an integer "
                                 "of 401 digits))"),
    "report-400-digit-perplexity": (json.dumps({"rows": [{"method": "svd", "density": 0.5, "heldout": {"ppl": BIG}}]}),
                                    "row 0 has a non-numeric heldout_ppl (an integer of 401 digits) (a finite number "
                                    "is needed)"),
    "report-400-digit-speedup": (json.dumps({"kind": "bench-layer", "rows": [{**SPEED_ROW, "dense/pifa": BIG}]}),
                                 "row 0 has a non-numeric dense/pifa (an integer of 401 digits)"),
    "report-infinite-speedup": (json.dumps({"kind": "bench-layer", "rows": [{**SPEED_ROW, "speedup": float("inf")}]}),
                                "row 0 has a non-numeric speedup inf"),
    "report-5000-digit-integer": ('{"rows": [{"method": "svd", "density": ' + "9" * 5000 + "}]}",
                                  "is not valid JSON: Exceeds the limit (4300 digits)"),
}

# An index beside the weights that is garbage or not the folder's own: refused on every input path, never guessed
# around (model.safetensors is there too, so a loader that ignored the index would give the right answer by luck).
INDEX_DAMAGE = {
    "garbage": "model.safetensors.index.json in", "no-weight-map": "has no 'weight_map' of tensor names to files",
    "path-in-weight-map": "shards must be .safetensors files in the same folder",
    "link-to-system-file": "is a symbolic link to '/etc/passwd', outside the model folder",
    "link-outside-folder": "outside the model folder: refused",
}


def _damage_index(root, dense, damage):
    index = dense / "model.safetensors.index.json"
    weight_map = {"metadata": {}, "weight_map": {"model.norm.weight": "model.safetensors"}}
    if damage == "garbage":
        index.write_bytes(b"\x89PNG\r\n garbage {[")
    if damage == "no-weight-map":
        index.write_text(json.dumps({"metadata": {}, "weights": {}}))
    if damage == "path-in-weight-map":
        index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../../etc/model.safetensors"}}))
    if damage == "link-to-system-file":
        index.symlink_to("/etc/passwd")
    if damage == "link-outside-folder":  # a well-formed index, but somebody else's
        (root / "elsewhere.json").write_text(json.dumps(weight_map))
        index.symlink_to(root / "elsewhere.json")


# A compressed folder missing or mistyping an *uncompressed* tensor (the compressed ones: test_hf.py).
COMPRESSED_DAMAGE = {
    "missing-norm": "lacks weights the model needs: 'model.norm.weight'",
    "missing-head": "lacks weights the model needs: 'lm_head.weight'",
    "missing-layer-norm": "lacks weights the model needs: 'model.layers.1.input_layernorm.weight'",
    "int32-embeddings": "stores 'model.embed_tokens.weight' as I32, but the model holds it as float32",
    "wrong-shape-norm": "holds weights of the wrong shape: 'model.norm.weight' is (7,), the model needs (32,)",
    # 16 MiB where the model needs 16 KiB: refused from the header, before the tensor is read (was a RuntimeError from
    # load_compressed and a traceback from eval)
    "big-wrong-shape-embeddings": "holds weights of the wrong shape: 'model.embed_tokens.weight' is (2048, 2048), the "
                                  "model needs (128, 32)",
}


def _damage_weights(dense, damage):
    from safetensors.torch import load_file, save_file

    tensors = load_file(dense / "model.safetensors")
    if damage == "missing":
        del tensors["model.norm.weight"]
    if damage == "int32-header":  # the same bytes, declared as integers
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].view(torch.int32)
    if damage == "wrong-shape":
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    if not damage.startswith("shard-"):
        save_file(tensors, dense / "model.safetensors", metadata={"format": "pt"})
        return
    (dense / "model.safetensors").unlink()  # two shards and an index; the second lacks a tensor the index lists
    names = sorted(tensors)
    shards = {name: f"model-0000{1 + (i >= 10)}-of-00002.safetensors" for i, name in enumerate(names)}
    for shard in sorted(set(shards.values())):
        save_file({name: tensors[name] for name in names if shards[name] == shard
                   and (damage != "shard-missing" or name != "model.layers.1.self_attn.v_proj.weight")},
                  dense / shard, metadata={"format": "pt"})
    (dense / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    if damage.startswith("shard-header-"):  # the first shard's header lies about a tensor its bytes hold
        _edit_header(dense / shards["model.layers.0.mlp.up_proj.weight"], "model.layers.0.mlp.up_proj.weight",
                     {"shard-header-dtype-lie": {"dtype": "BF16"}, "shard-header-shape-lie": {"shape": [32, 64]},
                      "shard-header-offsets-lie": {"data_offsets": [0, 8]}}[damage])


def _edit_header(file, key, change):
    """Rewrite one entry of a safetensors header in place (the bytes after it untouched)."""
    data = file.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header[key].update(change)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])


def _damage_compressed(comp, damage):
    from safetensors.torch import load_file, save_file

    tensors = load_file(comp / "model.safetensors")
    if damage.startswith("missing-"):
        del tensors[{"missing-norm": "model.norm.weight", "missing-head": "lm_head.weight",
                     "missing-layer-norm": "model.layers.1.input_layernorm.weight"}[damage]]
    if damage == "int32-embeddings":
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].view(torch.int32)
    if damage == "wrong-shape-norm":
        tensors["model.norm.weight"] = torch.zeros(7)
    if damage == "big-wrong-shape-embeddings":
        tensors["model.embed_tokens.weight"] = torch.zeros(2048, 2048)
    save_file(tensors, comp / "model.safetensors", metadata={"format": "pt"})


CHAT_TEMPLATES = {
    "chat-template-raises": "{{ raise_exception('this model does not chat') }}",
    "chat-template-syntax-error": "{% for %}",
    "chat-template-escapes-sandbox": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "chat-template-undefined": "{{ foo.bar.baz }}",
    "chat-template-divides-by-zero": "{{ 1 // 0 }}",
    "chat-template-builds-2gb": "{{ 'x' * 2000000000 }}",  # the sandbox allows it: a memory limit refuses it
    "chat-template-too-long": "{# " + "x" * 2**20 + " #}",
}
CHAT_TEMPLATE_ERRORS = {
    "chat-template-raises": "the tokenizer's chat template failed (TemplateError: this model does not chat)",
    "chat-template-syntax-error": "the tokenizer's chat template failed (TemplateSyntaxError: Expected an expression",
    "chat-template-escapes-sandbox": "the tokenizer's chat template failed (SecurityError: access to attribute "
                                     "'__class__' of 'str' object is unsafe.)",
    "chat-template-undefined": "the tokenizer's chat template failed (UndefinedError: 'foo' is undefined)",
    "chat-template-divides-by-zero": "the tokenizer's chat template failed (ZeroDivisionError",
    "chat-template-builds-2gb": "the tokenizer's chat template needs more than 1 GiB of memory to render one "
                                "conversation: refused",
    "chat-template-too-long": "the tokenizer's chat template has 1,048,582 characters, more than the 1,048,576 pifa "
                              "accepts",
}

LOCK_CASES = {
    "lock-is-symbolic-link": "is a symbolic link (to 'notes.txt'), not a lock file of pifa",
    "lock-is-dangling-link": "is a symbolic link",
    "lock-is-hard-link": "is one of 2 hard links to the same file",
    "lock-is-someones-file": "holds other data than a pid",
    "lock-is-folder": "is not a regular file",
}

CASES = {
    **LOCK_CASES,
    **CHAT_TEMPLATE_ERRORS,
    **{f"weights-{damage}-{path}": message for damage, message in WEIGHT_DAMAGE.items()
       for path in ("compress", "stream", "eval")},
    **{f"declared-{damage}-{path}": message for damage, (_, message) in DECLARED.items()
       for path in ("compress", "stream", "eval", "compressed-eval")},
    **{f"{bomb}-{path}": message for bomb, (_, message) in GGUF_BOMBS.items() for path in ("compress", "eval")},
    **{f"index-{damage}-{path}": message for damage, message in INDEX_DAMAGE.items()
       for path in ("compress", "stream", "eval")},
    **{f"compressed-{damage}-eval": message for damage, message in COMPRESSED_DAMAGE.items()},
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
    "auto-chat-short-text": "fewer than 200 characters to wrap in the chat template (--calib-format auto chose chat: "
                            "the tokenizer has a chat template; pass --calib-format text to calibrate on plain text)",
    **{case: message for case, (_, message) in REPORTS.items()},
    **{f"nested-pifa-config-{path}": "/comp' nests its JSON too deeply to be a pifa config" for path in ("info", "eval")},
    **{f"nested-config-{path}": "config.json of model folder '" for path in ("compress", "stream", "eval")},
    **{f"nested-tokenizer-config-{path}": "tokenizer_config.json of model folder" for path in ("compress", "stream",
                                                                                              "eval")},
    "nested-calibration-jsonl-compress": "calib.jsonl: line 1 nests its JSON too deeply",
    # checked by creating the file it is written through, before anything is measured (root passes os.access)
    "sensitivity-cache-unwritable": "sensitivity cache '/proc/pifa-sensitivity-cache.json'",
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


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


# torch.distributed set up by hand, without torchrun: a rank that never starts, no rendezvous address, a timeout that
# is no number of seconds (cases run with these environment variables; the rendezvous waits 2 s)
DIST_ENV = {
    "dist-timeout-negative": {"WORLD_SIZE": "2", "RANK": "0", "PIFA_DIST_TIMEOUT": "-5"},
    "dist-timeout-inf": {"WORLD_SIZE": "2", "RANK": "0", "PIFA_DIST_TIMEOUT": "inf"},
    "dist-no-master-address": {"WORLD_SIZE": "2", "RANK": "0"},
    "dist-other-rank-never-starts": {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                     "PIFA_DIST_TIMEOUT": "2"},
    "dist-rank-0-never-starts": {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "PIFA_DIST_TIMEOUT": "2"},
}
DIST_ERRORS = {
    "dist-timeout-negative": "PIFA_DIST_TIMEOUT='-5' must be a number of seconds above 0 and at most 604800",
    "dist-timeout-inf": "PIFA_DIST_TIMEOUT='inf' must be a number of seconds above 0",
    "dist-no-master-address": "could not join the torch.distributed process group (WORLD_SIZE=2, RANK=0): ValueError: "
                              "Error initializing torch.distributed using env:// rendezvous: environment variable "
                              "MASTER_ADDR expected, but not set (start every rank with torchrun",
    "dist-other-rank-never-starts": "within 2 s: DistStoreError: Timed out after",
    "dist-rank-0-never-starts": "within 2 s: DistNetworkError:",
}
CASES.update(DIST_ERRORS)



# --- more command-line cases: compress, eval, info, bench, report --------------------------------------

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
    "compress-rank-multiple-of-0": (lambda r: _compress(r, "--rank-multiple-of", "0"), "--rank-multiple-of 0 must be"),
    "compress-als-steps-negative": (lambda r: _compress(r, "--als-steps", "-1"), "--als-steps -1 must be a non-negative"),
    # compress: options that cannot apply, near misses
    "compress-attn-density-with-2:4": (lambda r: _compress(r, "--method", "wanda", "--pattern", "2:4",
                                                           "--attn-density", "0.4"),
                                       "--attn-density cannot apply to the N:M pattern 2:4"),
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


# --- the command line: one parametrised test over every case ---------------------------------------------

COMMAND_LINE = {  # case -> (prepare(root) -> argv, the text of the one error line)
    **{case: (functools.partial(lambda root, case: _damage(root, root / "dense", case), case=case), message)
       for case, message in CASES.items()},
    **CLI_CASES,
}
assert len(COMMAND_LINE) == len(CASES) + len(CLI_CASES), "a case name is used twice"


@pytest.mark.parametrize("case", sorted(COMMAND_LINE))
def test_bad_input(env, case, capsys, monkeypatch):
    for key, value in DIST_ENV.get(case, {}).items():
        monkeypatch.setenv(key, value)
    if "MASTER_ADDR" in DIST_ENV.get(case, {}):
        monkeypatch.setenv("MASTER_PORT", _free_port())
    prepare, expected = COMMAND_LINE[case]
    argv = prepare(env)
    before = _snapshot(env)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if not PROGRESS.match(line)]  # pifa's progress bars
    assert code == 2, (captured.out[-2000:], captured.err[-2000:])
    assert len(lines) == 1 and "Traceback" not in captured.err, lines
    assert lines[0].startswith(f"pifa {argv[0]}: error: ") and expected in lines[0], lines
    assert "could not load model" not in lines[0] or "dtype" not in lines[0]  # a bad --dtype is not the model's fault
    assert _snapshot(env) == before, "something was written, changed or left behind"


PROGRESS = re.compile(r"^pifa [\w-]+:\s+\d+%\|")


@pytest.mark.parametrize("loader", ["from_pretrained", "load_compressed"])
@pytest.mark.parametrize("damage", sorted(COMPRESSED_DAMAGE))
def test_compressed_folder_missing_or_mistyping_an_uncompressed_tensor_is_refused(env, damage, loader):
    """``from_pretrained`` after ``import pifa`` and ``load_compressed`` refuse it in one line: never random weights."""
    import transformers

    from pifa import load_compressed

    root = env
    _damage_compressed(root / "comp", damage)
    load = {"from_pretrained": transformers.AutoModelForCausalLM.from_pretrained, "load_compressed": load_compressed}
    with pytest.raises(ValueError, match=re.escape(COMPRESSED_DAMAGE[damage])) as info:
        load[loader](root / "comp")
    assert "\n" not in str(info.value)


FACTOR_DAMAGE = {
    "int64-up": ("up", lambda t: t.long(), "factor 'up' is int64; factors must be floating point"),
    "int64-down": ("down", lambda t: t.long(), "factor 'down' is int64; factors must be floating point"),
    "int32-bias": ("bias", lambda t: t.int(), "factor 'bias' is int32; factors must be floating point"),
    "bool-up": ("up", lambda t: t > 0, "factor 'up' is bool; factors must be floating point"),
    "meta-down": ("down", lambda t: t.to("meta"), "factor 'down' is on the meta device and holds no values"),
    "numpy-up": ("up", lambda t: t.numpy(), "factor 'up' must be a torch.Tensor, got ndarray"),
}


@pytest.mark.parametrize("kind", ["PivotLinear", "LowRankLinear"])
@pytest.mark.parametrize("damage", sorted(FACTOR_DAMAGE))
def test_from_factors_refuses_factors_that_are_not_floating_point_values(kind, damage):
    """The Python API: a ValueError with a message, not a RuntimeError from deep inside torch or scipy."""
    import pifa

    factors = {"up": torch.randn(8, 3), "down": torch.randn(3, 6), "bias": torch.randn(8)}
    name, change, message = FACTOR_DAMAGE[damage]
    factors[name] = change(factors[name])
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        getattr(pifa, kind).from_factors(factors["up"], factors["down"], factors["bias"])
    assert "\n" not in str(info.value)


def test_an_index_linked_inside_the_folder_or_to_the_hub_cache_blobs_is_the_folders_own(tmp_path):
    """The rule behind the ``index-link-*`` cases refuses only foreign links: a Hugging Face hub cache (every file
    of ``snapshots/REV`` a link into ``blobs``) and a link within the folder are followed."""
    from pifa.format import weight_files

    snapshot = tmp_path / "models--x" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--x" / "blobs").mkdir()
    blob = tmp_path / "models--x" / "blobs" / "0123"
    blob.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    (snapshot / "model.safetensors.index.json").symlink_to("../../blobs/0123")
    (snapshot / "model-00001-of-00001.safetensors").write_bytes(b"")
    assert weight_files(snapshot) == [snapshot / "model-00001-of-00001.safetensors"]
    (snapshot / "model.safetensors.index.json").unlink()
    (snapshot / "real.json").write_text(blob.read_text())
    (snapshot / "model.safetensors.index.json").symlink_to("real.json")
    assert weight_files(snapshot) == [snapshot / "model-00001-of-00001.safetensors"]


def test_a_chat_template_that_renders_for_ever_is_stopped(monkeypatch):
    """The time limit behind ``chat-template-builds-2gb``'s memory limit: nested loops the sandbox allows (each
    range below its 100,000 cap) run 10^10 steps; the render is stopped at the limit (30 s, here 0.5 s)."""

    import pifa.data
    from helpers import char_tokenizer

    tokenizer = char_tokenizer(64)
    tokenizer.chat_template = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    monkeypatch.setattr(pifa.data, "CHAT_RENDER_SECONDS", 0.5)
    with pytest.raises(ValueError, match=r"^the tokenizer's chat template takes more than 0.5 s to render one "
                                         r"conversation: refused$"):
        pifa.data.render_chat(tokenizer, [{"role": "user", "content": "hi"}])


def test_a_full_disk_under_the_sensitivity_cache_keeps_the_measurements(env, tmp_path, monkeypatch, capsys):
    """The disk fills after measuring: one line naming the cache, the error and where the measurements went; that
    copy is a cache a rerun reuses (nothing measured is lost)."""
    import errno
    import pathlib
    import tempfile

    import pifa

    root, dense = env, env / "dense"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spare"))
    (tmp_path / "spare").mkdir()
    write_text = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith(".cache.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    argv = compress_argv(dense, root / "out", "--allocation", "sensitivity", "--sensitivity-cache",
                         str(root / "cache.json"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress bars, then the one error line
    assert not any("Traceback" in line for line in err) and sum(": error: " in line for line in err) == 1, err
    err = err[-1:]
    assert err[0].startswith(f"pifa compress: error: could not write sensitivity cache {str(root / 'cache.json')!r} "
                             "(No space left on device); the measurements so far are saved in "), err
    spare = sorted((tmp_path / "spare").iterdir())
    assert len(spare) == 1 and repr(str(spare[0])) in err[0]
    assert sum(len(rows) for rows in pifa.SensitivityCache(spare[0]).store.values()) > 0
    assert not (root / "out").exists() and not (root / "cache.json").exists()
    assert not any(p.name.startswith(".cache.json.tmp") for p in root.iterdir())


def test_load_compressed_refuses_a_deeply_nested_pifa_config_with_a_value_error(env):
    """The Python API's side of ``nested-pifa-config-*``: ValueError with one line, not RecursionError."""
    from pifa import load_compressed

    root = env
    config = root / "comp" / "pifa_config.json"
    config.write_text(config.read_text().strip()[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nests its JSON too deeply to be a pifa config$") as info:
        load_compressed(root / "comp")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_the_disk_filling_while_a_checkpoint_block_is_written_is_one_line_and_keeps_the_checkpoint(
        env, monkeypatch, capsys, stream, error):
    """Block 1's checkpoint write fails as on a full disk (safetensors' own error, or ENOSPC): one line naming it,
    exit 2, block 0 kept in the checkpoint (no temporary file), no output, no lock; ``--resume`` then finishes."""
    import errno

    import safetensors

    import pifa.checkpoint

    root, dense = env, env / "dense"
    write = pifa.checkpoint.write_safetensors
    calls = []

    def full_disk(module, file, *args, **kwargs):
        calls.append(file)
        if len(calls) == 2:
            (file.parent / file.name).write_bytes(b"partial")  # what a write cut short leaves
            if error == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                              'message: "No space left on device" })')
        return write(module, file, *args, **kwargs)

    monkeypatch.setattr(pifa.checkpoint, "write_safetensors", full_disk)
    argv = compress_argv(dense, root / "out", *(["--stream"] if stream else []))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    checkpoint = root / "out.pifa-checkpoint"
    assert err[-1].startswith(f"pifa compress: error: could not write block 1 to checkpoint {str(checkpoint)!r} ("), err
    assert err[-1].endswith("); the checkpoint keeps the 1 block saved before it: free some space and rerun with "
                            "--resume"), err
    assert "No space left on device" in err[-1]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["block_0000.safetensors", "progress.json"]
    assert list(json.loads((checkpoint / "progress.json").read_text())["blocks"]) == ["0"]
    assert not (root / "out").exists() and not (root / "out.pifa-lock").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".out.")]
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert (root / "out" / "pifa_config.json").is_file() and not checkpoint.exists()


# --- more of the command line, the Python API and from_pretrained -----------------------------------

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
    "compress-bare-linear-blocks": (lambda p: pifa.compress(bare_linear_blocks(), CompressionConfig(method="svd"),
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
    before = _snapshot(saved.parent)
    with pytest.raises(ValueError) as info:
        call(saved)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert _snapshot(saved.parent) == before


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


# --- the layers and the pivoting: a ValueError naming the problem ------------------------------------

@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
@pytest.mark.parametrize("rank", [0, -1, 17, 2.5])
def test_rank_out_of_range(cls, rank):
    with pytest.raises(ValueError, match="rank"):
        cls.from_linear(nn.Linear(16, 32), rank)


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
def test_factor_shapes_disagree(cls):
    with pytest.raises(ValueError, match="disagree"):
        cls.from_factors(torch.randn(10, 3), torch.randn(4, 8))
    with pytest.raises(ValueError, match="bias"):
        cls.from_factors(torch.randn(10, 3), torch.randn(3, 8), torch.randn(9))
    with pytest.raises(ValueError, match="2-D"):
        cls.from_factors(torch.randn(10), torch.randn(3, 8))


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
@pytest.mark.parametrize("where", ["up", "down", "bias"])
def test_non_finite_factors(cls, where):
    tensors = {"up": torch.randn(10, 3), "down": torch.randn(3, 8), "bias": torch.randn(10)}
    tensors[where][0] = float("nan")
    with pytest.raises(ValueError, match=f"'{where}' has non-finite"):
        cls.from_factors(tensors["up"], tensors["down"], tensors["bias"])


@pytest.mark.parametrize("cls", [LowRankLinear, PivotLinear])
def test_non_finite_weight(cls):
    linear = nn.Linear(8, 8)
    with torch.no_grad():
        linear.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        cls.from_linear(linear, 2)


@pytest.mark.parametrize("method", ["lu", "qr"])
@pytest.mark.parametrize("seed", range(20))
def test_rank_deficient_factors(method, seed):
    torch.manual_seed(seed)
    up = torch.randn(20, 2) @ torch.randn(2, 4)  # rank 2, claimed rank 4
    with pytest.raises(ValueError, match="rank-deficient.*only 2 independent rows"):
        PivotLinear.from_factors(up, torch.randn(4, 12), method=method)
    up = torch.randn(20, 4)
    up[:, 3] = up[:, 0]
    with pytest.raises(ValueError, match="rank-deficient"):
        select_pivots(up, method)


def test_unknown_pivot_method():
    with pytest.raises(ValueError, match="pivot method 'svd'"):
        PivotLinear.from_factors(torch.randn(6, 2), torch.randn(2, 5), method="svd")


@pytest.mark.parametrize("loader", ["from_pretrained", "load_compressed"])
@pytest.mark.parametrize("damage", sorted(DECLARED))
def test_a_compressed_folder_declaring_sizes_its_weights_lack_is_refused_before_building(env, damage, loader):
    """The Python API's side of ``declared-*-compressed-eval``: ``from_pretrained`` after ``import pifa`` (checked in
    the quantizer's last hook before transformers builds the model: 100,000 layers took minutes and GBs) and
    ``load_compressed`` raise a one-line ValueError."""

    config = json.loads((env / "comp" / "config.json").read_text())
    config.update(DECLARED[damage][0])
    (env / "comp" / "config.json").write_text(json.dumps(config))
    load = {"from_pretrained": transformers.AutoModelForCausalLM.from_pretrained, "load_compressed": load_compressed}
    with pytest.raises(ValueError, match=re.escape(DECLARED[damage][1])) as info:
        load[loader](env / "comp")
    assert "\n" not in str(info.value)
