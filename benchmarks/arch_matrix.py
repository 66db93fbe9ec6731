"""Architecture matrix: every model type the installed transformers builds as a causal LM, compressed with mpifa.

    OMP_NUM_THREADS=1 python benchmarks/arch_matrix.py
    OMP_NUM_THREADS=1 python benchmarks/arch_matrix.py llama gemma3_text gpt2   # a few, printed only

Walks ``transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``. For each model type:
the config class's defaults, shrunk generically (:func:`shrink`: hidden 64, 4 layers, 4 heads, vocabulary 256,
small MLPs and experts, sliding windows of 8 tokens, shorter than the 32-token calibration, per-layer type lists
cut to the layers kept with every kind kept) plus a few per-architecture overrides (``OVERRIDES``, ``POST_BUILD``);
the model from ``AutoModelForCausalLM.from_config`` with random weights (float32, offline: nothing is
downloaded); its own forward on the calibration ids; ``pifa.compress`` with mpifa at density 0.5 on random token
ids [4, 32]; and the compressed model's logits, which must be finite. Each model type runs in a forked process
with a time limit, so that one crash or hang cannot stop the walk.

Statuses: ``supported`` (compressed, replay guard passed, finite logits), ``refused`` (pifa raised its own one-line
ValueError, e.g. the replay guard), ``skipped`` (nothing for pifa to do: the tiny model cannot be built, or its own
forward does not run on token ids alone) and ``failed`` (anything else: an exception that is not a clean refusal,
non-finite logits, a time-out).

Writes ``results/architectures.json``, ``results/architectures.txt`` (a table) and ``docs/architectures.md``
(``--tables-only`` rewrites the last two from the JSON); progress on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import pifa  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PIFA_DIR = Path(pifa.__file__).resolve().parent
COMMAND = "OMP_NUM_THREADS=1 python benchmarks/arch_matrix.py"

SAMPLES, SEQ_LEN, DENSITY, TIMEOUT_S = 4, 32, 0.5, 120.0
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 4, 2, 16
VOCAB, SPECIAL = 256, 16  # the calibration ids avoid the top SPECIAL ids, where out-of-range special tokens go
MAX_PARAMS = 20_000_000  # a tiny model above this was not shrunk enough (recorded in the reason)

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
              "num_decoder_layers", "num_encoder_layers", "num_blocks")
# generic shrinking: config key -> its tiny value (ints only; a key absent from the defaults is not added)
_SIZES: tuple[tuple[int, tuple[str, ...]], ...] = (
    (HIDDEN, ("hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "embedding_dim", "dim", "model_dim",
             "emb_dim", "word_embed_proj_dim", "attention_hidden_size", "lru_width", "backbone_hidden_size",
             "embedding_size", "input_embedding_size", "output_embedding_size", "pronunciation_embed_dim",
             "shape_embed_dim", "ple_embed_dim", "router_hidden_size", "hidden_size_per_layer_input",
             "dim_model_base", "prompt_mid_dim", "hidden_size_global")),
    (LAYERS, LAYER_KEYS),
    (HEADS, ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
            "encoder_attention_heads", "attention_heads", "num_decoder_attention_heads",
            "num_encoder_attention_heads", "swa_num_attention_heads", "linear_num_heads", "index_n_heads",
            "index_num_heads", "linear_num_value_heads", "mamba_n_heads", "mamba_num_heads", "n_mamba_heads",
            "heads_per_ngram")),
    (KV_HEADS, ("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "num_query_groups",
               "linear_num_key_heads")),
    (HEAD_DIM, ("head_dim", "kv_channels", "d_head", "dim_head", "attention_head_size", "swa_head_dim",
               "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim", "index_head_dim",
               "attention_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim", "v_head_dim", "qk_head_dim",
               "query_pre_attn_scalar")),
    (128, ("intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size", "dff",
          "dim_ff", "d_inner", "feed_forward_size", "intermediate_size_mlp", "first_dense_intermediate_size",
          "dense_intermediate_size", "mlp_only_intermediate_size", "shared_intermediate_size", "mamba_d_ssm",
          "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions",
          "max_source_positions", "context_length", "model_max_length", "original_max_position_embeddings")),
    (32, ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
         "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size", "q_lora_rank", "o_lora_rank",
         "laurel_rank", "loop_gate_rank", "adapter_rank", "hc_lowrank")),
    (16, ("kv_lora_rank", "state_size", "mamba_d_state", "ssm_state_size", "chunk_size", "mamba_chunk_size",
         "index_topk", "index_block_size", "index_pool_size")),
    (8, ("qk_rope_head_dim", "qk_nope_head_dim", "time_step_rank", "mamba_dt_rank", "rotary_dim",
        # windows shorter than the calibration length: the sliding layers really slide
        "sliding_window", "sliding_window_size", "window_size", "local_attention", "attention_window_size",
        "local_attention_window_len", "attention_chunk_size", "keep_window_size", "local_attn_chunk_length",
        "lsh_attn_chunk_length")),
    (4, ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "zero_expert_num")),
    (2, ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "sliding_window_pattern",
        "_sliding_window_pattern", "global_attn_every_n_layers", "global_attention_every_n_layers",
        "attn_layer_period", "no_rope_layer_interval", "layer_group_size", "n_layers_per_attn_res_block")),
    (1, ("n_group", "num_expert_group", "topk_group", "n_groups", "n_shared_experts", "attn_layer_offset",
        "first_k_dense_replace", "num_kv_shared_layers")),
    (512, ("encoder_hash_byte_group_vocab",)),
    (VOCAB, ("vocab_size", "decoder_vocab_size", "pronunciation_vocab_size", "shape_vocab_size",
            "vocab_size_per_layer_input", "unpadded_vocab_size", "ngram_vocab_size_base")),
)
SIZES = {key: value for value, keys in _SIZES for key in keys}
# per-layer lists (or strings) of the original depth are cut to LAYERS entries with every kind kept
PER_LAYER_HINTS = ("layer_types", "layers_block_type", "pattern", "mlp_only_layers", "no_rope_layers",
                   "sliding_window_layers", "block_types")

# per-architecture overrides, applied after the generic shrinking (top-level keys; "text_config.key" for nested)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
OVERRIDES: dict[str, dict[str, Any]] = {
    # defaults that do not build a model at all (None where the modeling code needs a number or a list)
    "cohere_compass_text": {"rope_parameters": {"full_attention": _ROPE, "sliding_attention": _ROPE}},
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},  # both read unconditionally
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    # (qwen4_exp's causal LM takes the text config: the same overrides)
    **{name: {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
              "indexer_compress_ratio": 4} for name in ("qwen4_exp", "qwen4_exp_text")},
    "gemma4_assistant": {"text_config": {"model_type": "gemma4_text", "hidden_size": HIDDEN, "intermediate_size": 128,
                                         "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                                         "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
                                         "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
                                         "sliding_window": 8, "max_position_embeddings": 128},
                         "backbone_hidden_size": HIDDEN},
    # depth sums and hybrid layouts the generic cut cannot know
    # Dory's dicts list every layer as an (attention, "mlp") pair: 8 entries are 4 layers
    "dory": {"num_hidden_layers": 2 * LAYERS, "n_input_layers": 2, "n_recurrent_layers": 2 * LAYERS - 4,
             "n_output_layers": 2, "layer_types": [kind for attention in ("sliding_attention", "full_attention") * 2
                                                   for kind in (attention, "mlp")]},
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    "mamba2": {"head_dim": 2 * HIDDEN // HEADS},  # the heads span expand x hidden
    "reformer": {"is_decoder": True,  # ReformerModelWithLMHead asserts it
                 "axial_pos_embds_dim": [HIDDEN // 2, HIDDEN // 2], "axial_pos_shape": [4, 8]},
    "kolibri1_1": {"index_num_heads": 2},  # at most the query heads per key head
}
# after building: what the model needs before it runs on token ids
POST_BUILD: dict[str, Callable[[torch.nn.Module], None]] = {
    "xmod": lambda model: model.set_default_language("en_XX"),  # X-MOD routes through a per-language adapter
}


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_key(key: Any) -> int | None:
    """A dict key that names a layer by index (an int, or a string of digits)."""
    if _int(key):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _per_layer(key: str, value: Any, depth: int) -> str | None:
    """How ``value`` describes the layers of a ``depth``-layer stack: "sequence" (one entry per layer),
    "indices" (a list of layer indices), "by_index" (a dict keyed by layer index), or None."""
    if isinstance(value, list) and len(value) == depth and depth > 1:
        return "sequence"
    if isinstance(value, str) and len(value) == depth > 1 and any(h in key for h in PER_LAYER_HINTS):
        return "sequence"
    if (isinstance(value, list) and value and len(value) < depth and all(_int(v) and 0 <= v < depth for v in value)
            and key.endswith(("layers", "layer_ids", "layer_indices", "_layer_idx", "_layer_idxs"))):
        return "indices"
    if isinstance(value, dict) and value and all(
            (k := _layer_key(key_)) is not None and 0 <= k < depth for key_ in value):
        return "by_index"
    return None


def choose_layers(values: dict[str, Any], depth: int) -> list[int]:
    """Which of the ``depth`` original layers the tiny config keeps: the first LAYERS, plus the first layer of every
    kind some per-layer description (layer types, hybrid patterns, index lists) names, so mixes stay mixed."""
    required: set[int] = set()
    for key, value in values.items():
        kind = _per_layer(key, value, depth) if isinstance(key, str) else None
        if kind == "sequence":
            firsts: dict[str, int] = {}
            for index, item in enumerate(value):
                firsts.setdefault(json.dumps(item, sort_keys=True, default=str), index)
            if len(firsts) <= LAYERS:  # a handful of kinds; one distinct value per layer is not a pattern
                required.update(firsts.values())
        elif kind in ("indices", "by_index"):
            members = {_layer_key(k) for k in value}
            others = [i for i in range(depth) if i not in members]
            required.update([min(members), *others[:1]])
    chosen = sorted(required)
    for index in range(depth):
        if len(chosen) >= LAYERS:
            break
        if index not in required:
            chosen.append(index)
    return sorted(chosen)


def _cut_layers(key: str, value: Any, depth: int, chosen: list[int]) -> Any:
    kind = _per_layer(key, value, depth)
    if kind == "sequence":
        items = [value[i] for i in chosen]
        if "layer" in key and all(_int(v) and 0 <= v < depth for v in value):  # layer indices (a KV source)
            items = [max(p for p, i in enumerate(chosen) if i <= v) for v in items]
        if key in SIZES:
            items = [min(v, SIZES[key]) if _int(v) else v for v in items]
        return "".join(items) if isinstance(value, str) else items
    if kind == "indices":
        return [position for position, index in enumerate(chosen) if index in set(value)]
    if kind == "by_index":
        by_index = {_layer_key(k): (k, shrink(v) if isinstance(v, dict) else v) for k, v in value.items()}
        return {(position if _int(key_) else str(position).zfill(len(key_))): entry
                for position, index in enumerate(chosen) if index in by_index for key_, entry in [by_index[index]]}
    return value


def shrink(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict's tiny version (nested sub-config dicts too): sizes by key name (``SIZES``), the layer stack cut
    to the layers ``choose_layers`` keeps (every per-layer list, index list and per-layer dict with it), a few
    relations between sizes kept, special token ids outside the tiny vocabulary moved into its top SPECIAL ids."""
    out = dict(values)
    depths = [values[k] for k in LAYER_KEYS if _int(values.get(k))]
    depth = max(depths, default=0)
    chosen = choose_layers(values, depth) if depth > LAYERS else list(range(depth))
    for key, value in values.items():
        if not isinstance(key, str):
            continue
        if key in LAYER_KEYS and _int(value):
            out[key] = len(chosen) if value > 1 and depth > 1 else value
        elif key == "num_kv_shared_layers" and _int(value) and value == depth > 1:  # every layer shares
            out[key] = len(chosen)
        elif depth > 1 and _per_layer(key, value, depth):
            out[key] = _cut_layers(key, value, depth, chosen)
        elif isinstance(value, dict) and value and key not in ("rope_scaling", "rope_parameters"):
            out[key] = shrink(value)
        elif key in SIZES and _int(value):
            out[key] = min(value, SIZES[key])
    _relations(values, out)
    moved: dict[int, int] = {}  # special token ids outside the tiny vocabulary -> distinct ids at its top

    def inside(token: Any) -> Any:
        if _int(token) and token >= VOCAB:
            return moved.setdefault(token, VOCAB - 1 - len(moved) % SPECIAL)
        return token

    for key, value in values.items():
        if isinstance(key, str) and key.endswith(("_token_id", "_token_index", "_token_ids")):
            out[key] = [inside(v) for v in value] if isinstance(value, list) else inside(value)
    return out


MAMBA_HEADS = (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim"),
               ("n_mamba_heads", "mamba_headdim"))


def _relations(values: dict[str, Any], out: dict[str, Any]) -> None:
    """Sizes that the defaults tie together, tied again after shrinking (in place in ``out``)."""
    heads = out.get("num_attention_heads")
    if "head_dim" in values and values["head_dim"] is None and _int(heads):
        out["head_dim"] = HIDDEN // heads  # None: derived in the modeling code, sometimes not at all
    for kv_key, heads_key in (("num_key_value_heads", "num_attention_heads"),
                              ("swa_num_key_value_heads", "swa_num_attention_heads")):
        if _int(values.get(kv_key)) and values[kv_key] == values.get(heads_key):  # no GQA in the defaults
            out[kv_key] = out[heads_key]
    if "num_key_value_heads" in values and values["num_key_value_heads"] is None:
        out["num_key_value_heads"] = min(KV_HEADS, heads) if _int(heads) else KV_HEADS
    if _int(values.get("qk_rope_head_dim")):
        if values.get("head_dim") == values["qk_rope_head_dim"]:  # MLA: head_dim is the rotary part
            out["head_dim"] = out["qk_rope_head_dim"]
        if _int(values.get("qk_head_dim")) and _int(values.get("qk_nope_head_dim")):
            out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    hidden = values.get("hidden_size")
    if _int(values.get("attention_hidden_size")) and _int(hidden) and values["attention_hidden_size"] % hidden == 0:
        out["attention_hidden_size"] = values["attention_hidden_size"] // hidden * out["hidden_size"]
        if _int(values.get("attention_head_dim")) and _int(heads) and (
                values["attention_head_dim"] * values["num_attention_heads"] == values["attention_hidden_size"]):
            out["attention_head_dim"] = out["attention_hidden_size"] // heads
    expand = out.get("mamba_expand")
    for heads_key, dim_key in MAMBA_HEADS:  # the Mamba heads span expand x hidden
        if _int(expand) and _int(out.get(heads_key)) and _int(out.get(dim_key)):
            out[dim_key] = expand * out.get("hidden_size", HIDDEN) // out[heads_key]
    for experts_key, top_key in (("n_routed_experts", "num_experts_per_tok"), ("num_experts", "num_experts_per_tok")):
        if top_key in values and values[top_key] is None and _int(out.get(experts_key)):
            out[top_key] = min(2, out[experts_key])


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for part in path:
        values = values[part]
    values[last] = value


def model_class(model_type: str) -> type:
    """The causal-LM class the auto mapping names for ``model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def config_class(model_type: str) -> type:
    """The config class the causal LM takes: ``CONFIG_MAPPING[model_type]``, or the model class's own config class
    where that differs (MusicGen's causal LM is its decoder, with a config of its own)."""
    from transformers import CONFIG_MAPPING

    own = getattr(model_class(model_type), "config_class", None)
    mapped = CONFIG_MAPPING[model_type]
    return own if isinstance(own, type) and not issubclass(mapped, own) else mapped


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The tiny config of ``model_type``: its config class's defaults, shrunk, plus ``OVERRIDES``."""
    cls = config_class(model_type)
    try:
        values = shrink(cls().to_dict())
    except Exception:  # noqa: BLE001 - defaults the config class itself rejects: the overrides must say it all
        if model_type not in OVERRIDES:
            raise
        values = {}
    for dotted, value in OVERRIDES.get(model_type, {}).items():
        _set(values, dotted, copy.deepcopy(value))
    for key in ("transformers_version", "architectures", "_name_or_path"):
        values.pop(key, None)
    values["dtype"] = "float32"
    return cls.from_dict(values)


def build_model(model_type: str, config: transformers.PretrainedConfig) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config`` (the model class itself where the config is not the mapped one)."""
    from transformers import CONFIG_MAPPING

    if isinstance(config, CONFIG_MAPPING[model_type]):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model_class(model_type)._from_config(config, dtype=torch.float32)


def calibration(config: transformers.PretrainedConfig, seed: int = 0) -> torch.Tensor:
    """Random token ids [SAMPLES, SEQ_LEN] below the top SPECIAL ids of the (tiny) vocabulary."""
    vocab = getattr(config.get_text_config(), "vocab_size", None) or VOCAB
    high = max(2, min(vocab, VOCAB) - SPECIAL)
    return torch.randint(0, high, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``ids`` without a KV cache (as pifa runs it)."""
    from pifa.model import inference_state

    with inference_state(model):
        out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if isinstance(logits, (tuple, list)):
        logits = torch.stack(list(logits))
    return logits


def _linear_weights(model: torch.nn.Module) -> int:
    """The weights of the model's linears outside its embeddings and LM head (the largest pifa could compress)."""
    from pifa.model import is_linear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(module.weight.numel() for name, module in model.named_modules()
               if is_linear(module) and module is not head and "embed" not in name and "lm_head" not in name)


def _ignored_in_blocks(model: torch.nn.Module) -> list[str]:
    """The block linears that pifa's default ignore patterns leave out (the patterns match full names: a block path
    holding "norm" or "embed" loses every linear under it)."""
    from pifa.config import DEFAULT_IGNORE
    from pifa.model import find_blocks, target_linears

    try:
        name, blocks = find_blocks(model)
    except ValueError:
        return []
    ignored = []
    for index, block in enumerate(blocks):
        every = target_linears(block, f"{name}.{index}", (), ())
        kept = target_linears(block, f"{name}.{index}", (), DEFAULT_IGNORE)
        ignored += [n for n in every if n not in kept]
    return ignored


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _culprit(error: BaseException) -> traceback.FrameSummary:
    """The innermost frame of ``error`` outside torch's own code (the model's or pifa's line that failed)."""
    torch_dir = Path(torch.__file__).resolve().parent
    frames = traceback.extract_tb(error.__traceback__)
    outside = [f for f in frames if not Path(f.filename).resolve().is_relative_to(torch_dir)]
    return (outside or frames)[-1]


def _raised_by_pifa(error: BaseException) -> bool:
    """Whether ``error`` was raised by pifa's own code (its innermost frame is in the pifa package)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PIFA_DIR)


def check_architecture(model_type: str, build: Callable[[], torch.nn.Module] | None = None) -> dict[str, Any]:
    """Compress one architecture; returns its record (status, reason, replay_difference, seconds, ...).

    ``build`` makes the model (default: ``AutoModelForCausalLM.from_config(tiny_config(model_type))``)."""
    start = time.perf_counter()
    record: dict[str, Any] = {"architecture": model_type, "status": None, "reason": "", "replay_difference": None,
                              "seconds": None, "stage": "config"}

    def done(status: str, reason: str) -> dict[str, Any]:
        record.update(status=status, reason=reason, seconds=round(time.perf_counter() - start, 2))
        return record

    torch.manual_seed(0)
    try:
        if build is None:
            config = tiny_config(model_type)
            record["stage"] = "build"
            model = build_model(model_type, config)
        else:
            record["stage"] = "build"
            model = build()
            config = model.config
        if model_type in POST_BUILD:
            POST_BUILD[model_type](model)
        model.eval()
    except ImportError as error:
        return done("skipped", f"needs a package that is not installed: {_one_line(error)}")
    except Exception as error:  # noqa: BLE001 - recorded, the walk goes on
        what = "config" if record["stage"] == "config" else "model"
        return done("skipped", f"the tiny {what} cannot be built ({type(error).__name__}: {_one_line(error)})")
    record["model_class"] = type(model).__name__
    record["parameters"] = sum(p.numel() for p in model.parameters())
    linear_weights = _linear_weights(model)
    ignored = _ignored_in_blocks(model)
    calib = calibration(config)
    record["stage"] = "dense forward"
    try:
        dense = _logits(model, calib)
    except Exception as error:  # noqa: BLE001
        return done("skipped", f"its own forward does not run on token ids alone ({type(error).__name__}: "
                               f"{_one_line(error)})")
    record["stage"] = "compress"
    try:
        report = pifa.compress(model, pifa.CompressionConfig(method="mpifa", density=DENSITY), calib, progress=False)
    except ValueError as error:
        if _raised_by_pifa(error):
            return done("refused", _one_line(error))
        return done("failed", f"{type(error).__name__}: {_one_line(error)} (raised by the model's code)")
    except Exception as error:  # noqa: BLE001
        frame = _culprit(error)
        return done("failed", f"{type(error).__name__}: {_one_line(error)} (at {Path(frame.filename).name}:"
                              f"{frame.lineno})")
    record["replay_difference"] = report.replay_difference
    record["compressed_linears"] = len(report.modules)
    record["stage"] = "compressed forward"
    try:
        logits = _logits(model, calib)
    except Exception as error:  # noqa: BLE001
        return done("failed", f"the compressed model's forward fails ({type(error).__name__}: {_one_line(error)})")
    if not torch.isfinite(logits).all():
        return done("failed", "the compressed model's logits are not finite")
    record["logits_relative_change"] = float((logits - dense).norm() / dense.norm().clamp_min(1e-12))
    from pifa.model import find_blocks

    record["blocks"] = find_blocks(model)[0]
    record["ignored_in_blocks"] = ignored
    record["coverage"] = round(sum(m.params_before for m in report.modules) / max(1, linear_weights), 4)
    reason = f"{len(report.modules)} linears in {record['blocks']} compressed"
    if record["coverage"] < 0.25:
        reason += (f", only {100 * record['coverage']:.0f} % of the model's linear weights (outside embeddings and "
                   "the LM head)")
    if ignored:
        reason += f"; the default ignore patterns skip {len(ignored)} linears of the blocks (e.g. {ignored[0]})"
    if record["parameters"] > MAX_PARAMS:
        reason += f"; the tiny model still has {record['parameters']:,} parameters"
    return done("supported", reason)


def _child(model_type: str, connection: Any) -> None:
    torch.set_num_threads(1)
    logging.getLogger("pifa").setLevel(logging.ERROR)  # the solver's notes on tiny random layers
    try:
        record = check_architecture(model_type)
    except BaseException as error:  # noqa: BLE001 - the parent must get an answer
        record = {"architecture": model_type, "status": "failed", "stage": "walker",
                  "reason": f"{type(error).__name__}: {_one_line(error)}", "replay_difference": None, "seconds": None}
    connection.send(record)
    connection.close()


def run_isolated(model_type: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """``check_architecture`` in a forked process, killed after ``timeout`` seconds."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    start = time.perf_counter()
    process = context.Process(target=_child, args=(model_type, send), daemon=True)
    process.start()
    send.close()
    record = None
    if receive.poll(timeout):
        try:
            record = receive.recv()
        except EOFError:
            record = None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    seconds = round(time.perf_counter() - start, 2)
    if record is None:
        if seconds >= timeout:
            reason = f"timed out after {timeout:.0f} s"
        else:
            reason = f"the process died (exit code {process.exitcode})"
        record = {"architecture": model_type, "status": "failed", "reason": reason, "replay_difference": None,
                  "stage": "unknown"}
    record["seconds"] = seconds
    return record


def architectures() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# what the refusals, failures and partial compressions found so far mean (matched on the reason; diagnosed by hand
# on transformers 5.25, see docs/architectures.md): (pattern, explanation)
CAUSES: tuple[tuple[str, str], ...] = (
    (r"targeted linears never called", "a block holds linears its forward never calls on token ids: the "
     "cross-attention of an encoder-decoder's decoder run as a causal LM, or a weight the model reads directly "
     "(Mamba's `dt_proj`, LongCat-Flash's router `classifier`). pifa refuses rather than guess; "
     "`ignore=(\"*encoder_attn*\", ...)` names them out."),
    (r"is too small for a 1 x", "an MoE shared-expert gate (`Linear(hidden, 1)`, in the real models too) has no rank "
     "that fits density 0.5, and the uniform allocation refuses; `ignore=(\"*shared_expert_gate*\", ...)` leaves "
     "it dense."),
    (r"no block list found", "the decoder layers are of several classes (hybrid attention / Mamba / cross-attention "
     "stacks): `pifa.model.find_blocks` only accepts a list of same-type blocks."),
    (r"no linear in .* matches targets", "the default ignore patterns (`*norm*`, `*embed*`) match the block list's own "
     "path (`roberta_prelayernorm.encoder.layer`; phi4_multimodal's `embed_tokens_extend.audio_embed...`, an audio "
     "encoder `find_blocks` chose because it holds the most linears), so nothing is left to compress."),
    (r"never reached the last transformer block", "`find_blocks` chose the vision encoder (the list with the most "
     "linears), which a forward on token ids alone never runs."),
    (r"unpack|attn_output", "engine: the blocks return several values that the model's loop unpacks (hidden states "
     "plus attention weights, states or indices, or an output object); the capture's stand-ins hand back the "
     "hidden states alone (as a tensor or a 1-tuple), so the model's own code fails during the capture instead of "
     "pifa refusing."),
    (r"has no attribute 'weight'", "engine: the model reads a linear's `.weight` (its dtype) inside the block after "
     "the layer was swapped; pifa's compressed layers have no `weight`, so the compressed model (or the rest of the "
     "compression) fails."),
    (r"expanded size of the tensor", "engine: the model builds a KV cache whatever `use_cache` says (XLM); the capture "
     "keeps that live cache object among the block inputs, every replay appends to it, and the second pass over a "
     "block attends to twice the keys. The guard replays each block once and does not see it."),
    (r"context of -1 tokens", "pifa: the calibration-length check reads `max_position_embeddings`, which XLNet sets "
     "to -1 (no limit), and refuses every calibration; past it, XLNet's blocks return two streams (see above)."),
    (r"ignore patterns skip", "partial: the default ignore pattern `*norm*` matches a container of the block's "
     "linears (DBRX's `norm_attn_norm`), so only the rest is compressed."),
    (r"adapter_list", "partial: the decoder layers are of two classes, so `find_blocks` settles on a small list of "
     "same-type adapters inside one layer."),
    (r"timm|shared_kv_states", "not runnable here: Gemma 3n's vision tower needs the `timm` package; the Gemma 4 "
     "assistants are speculative-decoding drafters that read the main model's KV states."),
)


def causes(records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Each cause in ``CAUSES`` with the architectures whose reason matches it; then any unexplained non-supported."""
    import re

    found, explained = [], set()
    for pattern, text in CAUSES:
        names = [r["architecture"] for r in records if re.search(pattern, r["reason"])]
        if names:
            found.append((text, names))
            explained.update(names)
    other = [r["architecture"] for r in records if r["status"] != "supported" and r["architecture"] not in explained]
    if other:
        found.append(("not diagnosed: see the reason in the table.", other))
    return found


def _difference(record: dict[str, Any]) -> str:
    value = record.get("replay_difference")
    return "" if value is None else f"{value:.3g}"


def counts(records: list[dict[str, Any]]) -> dict[str, int]:
    return {status: sum(r["status"] == status for r in records) for status in ("supported", "refused", "skipped",
                                                                                 "failed")}


def summary(records: list[dict[str, Any]]) -> str:
    c = counts(records)
    return (f"{len(records)} architectures: {c['supported']} supported, {c['refused']} refused, "
            f"{c['skipped']} skipped, {c['failed']} failed")


def _coverage(record: dict[str, Any]) -> str:
    value = record.get("coverage")
    return "" if value is None else f"{100 * value:.0f} %"


def text_table(records: list[dict[str, Any]]) -> str:
    rows = [("architecture", "status", "replay_diff", "coverage", "seconds", "reason")]
    rows += [(r["architecture"], r["status"], _difference(r), _coverage(r),
              f"{r['seconds']:.1f}" if r.get("seconds") else "", r["reason"]) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(line.rstrip() for line in lines)


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "# Architectures",
        "",
        "Every model type the installed transformers builds as a causal LM "
        "(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), as a tiny random model, compressed with mpifa at density "
        f"{DENSITY} on random token ids [{SAMPLES}, {SEQ_LEN}]. Made by:",
        "",
        "```bash",
        COMMAND,
        "```",
        "",
        f"transformers {meta['transformers']}, torch {meta['torch']}, pifa {meta['pifa']}; "
        f"{meta['seconds']:.0f} s in all.",
        "",
        f"**{summary(records)}.**",
        "",
        "- **supported**: compressed, the replay guard passed (the engine's replay of the dense blocks equals the "
        "model's own forward; *replay difference* is the largest difference it found) and the compressed model's "
        "logits are finite;",
        "- **refused**: pifa stopped before compressing with its own one-line error (the reason);",
        "- **skipped**: nothing for pifa to judge: the tiny model cannot be built, or its own forward does not run "
        "on token ids alone (it needs pixel, audio or other inputs);",
        "- **failed**: anything else (an error that is not a clean refusal, non-finite logits, a time-out).",
        "",
        "*Coverage*: the compressed linears' weights over all the model's linear weights outside its embeddings and "
        "LM head (a multimodal model's vision or audio tower counts in the total and is not compressed).",
        "",
        "Tiny configs: the config class's defaults with hidden size 64, 4 layers (more where a layer of every kind "
        "needs them), 4 heads (2 key-value heads where the defaults group them), head size 16, vocabulary 256, small "
        "MLP and expert sizes, sliding windows of 8 tokens (shorter than the calibration); per-layer type lists, "
        "layer index lists and per-layer dicts cut to the layers kept, with every kind kept, so mixed stacks stay "
        "mixed (`benchmarks/arch_matrix.py`: `shrink`, and `OVERRIDES` where the defaults do not build a model "
        "or a layout cannot be cut generically). The causal-LM class is built with "
        "`AutoModelForCausalLM.from_config` (MusicGen's and Qwen4-Exp's with their own class, whose config is "
        "not the mapped one), offline, in float32; each architecture runs in a forked process with a 120 s limit.",
        "",
        "| architecture | status | replay difference | coverage | reason |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['architecture']} | {r['status']} | {_difference(r)} | {_coverage(r)} | {cell(r['reason'])} |"
              for r in records]
    lines += ["", "## What the refusals, failures and partial compressions mean", ""]
    lines += [f"- {text} ({', '.join(names)})" for text, names in causes(records)]
    return "\n".join(lines) + "\n"


def _write_tables(records: list[dict[str, Any]], meta: dict[str, Any], txt: str, md: str) -> None:
    Path(txt).write_text(f"{COMMAND}\n{summary(records)} in {meta['seconds']:.0f} s\n\n{text_table(records)}\n")
    Path(md).write_text(markdown(records, meta))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="model types to run (default: all; then nothing is written)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per architecture")
    parser.add_argument("--json", default=str(ROOT / "results" / "architectures.json"))
    parser.add_argument("--txt", default=str(ROOT / "results" / "architectures.txt"))
    parser.add_argument("--md", default=str(ROOT / "docs" / "architectures.md"))
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from --json, running nothing")
    args = parser.parse_args(argv)
    if args.tables_only:
        saved = json.loads(Path(args.json).read_text())
        _write_tables(saved["architectures"], saved["meta"], args.txt, args.md)
        return 0
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    names = args.only or architectures()
    start = time.perf_counter()
    records = []
    for number, name in enumerate(names, 1):
        record = run_isolated(name, args.timeout)
        records.append(record)
        print(f"[{number}/{len(names)}] {name}: {record['status']} ({record['seconds']:.1f} s) {record['reason']}",
              file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    print(text_table(records))
    print(summary(records), f"in {seconds:.0f} s")
    if args.only:
        return 0
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "pifa": pifa.__version__,
            "python": platform.python_version(), "command": COMMAND, "seconds": round(seconds, 1),
            "density": DENSITY, "samples": SAMPLES, "seq_len": SEQ_LEN, "timeout_s": args.timeout,
            "counts": counts(records)}
    for path in (args.json, args.txt, args.md):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "architectures": records}, indent=1) + "\n")
    _write_tables(records, meta, args.txt, args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
