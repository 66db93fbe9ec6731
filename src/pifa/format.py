"""The compressed-model format: file names, the module table's schema, and its validation.

A compressed model directory holds the Hugging Face ``config.json``, ``model.safetensors``
and ``pifa_config.json``::

    {"format_version": 1, "library_version": "0.1.0", "dtype": "float32",
     "modules": {"model.layers.0.self_attn.q_proj":
                 {"kind": "pivot", "in_features": 64, "out_features": 64, "rank": 16, "bias": false}},
     "pruned": {"model.layers.0.mlp.up_proj":     # optional: linears a sparse method zeroed
                {"out_features": 64, "in_features": 32, "pattern": "2:4"}},
     "compression": {...}}   # optional: how the model was compressed

When the model has compressed layers, ``config.json`` also carries the same module table as a
``quantization_config`` block (``{"quant_method": "pifa", "format_version": 1,
"library_version": ..., "modules": {...}}``), so that transformers' ``from_pretrained`` rebuilds
the compressed model through the quantizer plugin in :mod:`pifa.hf`. ``pifa_config.json`` stays
the source ``load_compressed`` reads. This module reads and checks; :mod:`pifa.io` writes and loads.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import safetensors
from torch import nn

from ._version import __version__
from .layers import LAYER_KINDS, is_compressed, layer_kind

FORMAT_VERSION = 1
CONFIG_NAME = "pifa_config.json"
WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
REQUIRED_FILES = (HF_CONFIG_NAME, WEIGHTS_NAME, CONFIG_NAME)
QUANT_METHOD = "pifa"  # the ``quant_method`` of the ``quantization_config`` block in config.json


def module_spec(layer: nn.Module) -> dict[str, Any]:
    """The JSON description of one compressed layer."""
    return {
        "kind": layer_kind(layer),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "rank": layer.rank,
        "bias": layer.bias is not None,
    }


def compressed_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Specs of every compressed layer of ``model``, by qualified name."""
    return {
        name: module_spec(module)
        for name, module in model.named_modules()
        if is_compressed(module)
    }


def quantization_config_dict(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` for a model with these compressed modules."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "modules": copy.deepcopy(modules),
    }


def quant_method_of(quantization_config: Any) -> Any:
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    return getattr(method, "value", method)


def is_pifa_quantization_config(quantization_config: Any) -> bool:
    """Whether a config's ``quantization_config`` (a dict or a config object) is pifa's."""
    return quantization_config is not None and quant_method_of(quantization_config) == QUANT_METHOD


def read_pifa_config(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a compressed model directory and return its ``pifa_config.json``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise ValueError(f"{str(path)!r} is missing {name}")
    try:
        spec = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{CONFIG_NAME} in {str(path)!r} is not valid JSON: {exc}") from None
    version = spec.get("format_version") if isinstance(spec, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown {CONFIG_NAME} format_version {version!r} (this pifa reads {FORMAT_VERSION})")
    modules = spec.get("modules")
    if not isinstance(modules, dict):
        raise ValueError(f"{CONFIG_NAME} has no 'modules' table")
    for name, entry in modules.items():
        check_entry(name, entry)
    pruned = spec.get("pruned", {})
    if not isinstance(pruned, dict) or not all(
            isinstance(e, dict) and {"out_features", "in_features", "pattern"} <= e.keys() for e in pruned.values()):
        raise ValueError(f"{CONFIG_NAME}: 'pruned' must map module names to out_features, in_features and pattern")
    return spec


def check_entry(name: str, entry: Any, source: str = CONFIG_NAME) -> None:
    keys = ("kind", "in_features", "out_features", "rank", "bias")
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise ValueError(f"{source}: module {name!r} needs the fields {keys}")
    if entry["kind"] not in LAYER_KINDS:
        raise ValueError(f"{source}: module {name!r} has unknown kind {entry['kind']!r}")


def expected_shapes(name: str, entry: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes that ``pifa_config.json`` implies for one compressed module."""
    m, n, r = entry["out_features"], entry["in_features"], entry["rank"]
    if entry["kind"] == "lowrank":
        shapes = {"down": (r, n), "up": (m, r)}
    else:
        shapes = {"pivot_weight": (r, n), "coeff": (m - r, r), "pivot_index": (r,)}
    if entry["bias"]:
        shapes["bias"] = (m,)
    return {f"{name}.{key}": shape for key, shape in shapes.items()}


def check_tensor_shapes(path: str | os.PathLike, spec: dict[str, Any]) -> None:
    """Compare ``model.safetensors``' header with the shapes ``spec`` implies (reads no tensor data)."""
    weights = Path(path) / WEIGHTS_NAME
    try:
        with safetensors.safe_open(str(weights), framework="pt") as handle:
            stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file: {exc}") from None
    for name, entry in spec["modules"].items():
        for key, shape in expected_shapes(name, entry).items():
            if key not in stored:
                raise ValueError(f"{WEIGHTS_NAME} lacks tensor {key!r} that {CONFIG_NAME} describes")
            if stored[key] != shape:
                raise ValueError(
                    f"tensor {key!r} has shape {stored[key]} in {WEIGHTS_NAME} but {CONFIG_NAME} implies {shape}"
                )
