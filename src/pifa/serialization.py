"""Safe save and load of compressed models: tensors in safetensors, structure in JSON.

A compressed model directory holds the Hugging Face ``config.json``, ``model.safetensors``
and ``pifa_config.json``::

    {"format_version": 1, "library_version": "0.1.0", "dtype": "float32",
     "modules": {"model.layers.0.self_attn.q_proj":
                 {"kind": "pivot", "in_features": 64, "out_features": 64, "rank": 16, "bias": false}},
     "compression": {...}}   # optional: how the model was compressed

Loading rebuilds the skeleton on the meta device from ``config.json``, swaps in empty
compressed layers, materialises it and loads the tensors. Nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from ._version import __version__
from .layers import LowRankLinear, PivotLinear
from .loading import model_class
from .modules import is_linear, linear_shape

if TYPE_CHECKING:  # transformers is imported lazily: `pifa --help` stays fast
    import transformers

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "pifa_config.json"
WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
REQUIRED_FILES = (HF_CONFIG_NAME, WEIGHTS_NAME, CONFIG_NAME)
LAYER_KINDS: dict[str, type[nn.Module]] = {"lowrank": LowRankLinear, "pivot": PivotLinear}


def module_spec(layer: nn.Module) -> dict[str, Any]:
    """The JSON description of one compressed layer."""
    kind = next(k for k, cls in LAYER_KINDS.items() if isinstance(layer, cls))
    return {
        "kind": kind,
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
        if isinstance(module, tuple(LAYER_KINDS.values()))
    }


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    compression: dict[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (a Hugging Face model, possibly with compressed layers) to directory ``path``.

    The directory appears only once complete (written under a temporary name, then
    renamed). An existing ``path`` is an error unless ``overwrite``. ``extra_files`` maps
    file names to text written beside the weights (e.g. the compression report).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"output directory {str(path)!r} already exists (pass overwrite=True to replace it)")
    if not hasattr(model, "config"):
        raise ValueError(f"expected a Hugging Face model with a .config, got {type(model).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        _write_directory(model, tmp, tokenizer, compression)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_directory(model: nn.Module, directory: Path, tokenizer: Any, compression: dict[str, Any] | None) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # what from_pretrained and load_compressed build
    config.save_pretrained(directory)
    safetensors.torch.save_model(model, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    spec: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "dtype": str(_model_dtype(model)).removeprefix("torch."),
        "modules": compressed_modules(model),
    }
    if compression is not None:
        spec["compression"] = compression
    (directory / CONFIG_NAME).write_text(json.dumps(spec, indent=2) + "\n")


def _replace_directory(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first and removed after."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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
        _check_entry(name, entry)
    return spec


def _check_entry(name: str, entry: Any) -> None:
    keys = ("kind", "in_features", "out_features", "rank", "bias")
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise ValueError(f"{CONFIG_NAME}: module {name!r} needs the fields {keys}")
    if entry["kind"] not in LAYER_KINDS:
        raise ValueError(f"{CONFIG_NAME}: module {name!r} has unknown kind {entry['kind']!r}")


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


def _build_skeleton(config: transformers.PretrainedConfig, spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The model on the meta device with empty compressed layers swapped in."""
    with torch.device("meta"):
        model = model_class(config.architectures)(config)
        model.to(dtype)
        for name, entry in spec["modules"].items():
            try:
                original = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{CONFIG_NAME} names module {name!r}, which the model does not have") from None
            layer = LAYER_KINDS[entry["kind"]](
                entry["in_features"], entry["out_features"], entry["rank"], bias=entry["bias"], dtype=dtype
            )
            _check_replaceable(name, original, layer)
            model.set_submodule(name, layer)
    return model


def _check_replaceable(name: str, original: nn.Module, layer: nn.Module) -> None:
    shape = linear_shape(original) if is_linear(original) else None
    if shape != (layer.out_features, layer.in_features):
        raise ValueError(
            f"{CONFIG_NAME} gives module {name!r} shape {(layer.out_features, layer.in_features)}, "
            f"the model has {shape}"
        )


def _materialize(model: nn.Module, device: torch.device) -> None:
    """meta -> empty tensors on ``device``; re-tie weights; recompute non-persistent buffers."""
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for module in model.modules():
        if module._non_persistent_buffers_set and not isinstance(module, PivotLinear):
            model._init_weights(module)


def _resolve_dtype(dtype: torch.dtype | str | None, spec: dict[str, Any]) -> torch.dtype:
    value = dtype if dtype is not None else spec.get("dtype", "float32")
    if isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown floating dtype {value!r}")
    return resolved


def load_compressed(
    path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
) -> nn.Module:
    """Load a directory written by ``save_compressed``; returns the model in eval mode.

    ``dtype`` defaults to the dtype the model was saved in, ``device`` to the CPU.
    """
    spec = read_pifa_config(path)
    check_tensor_shapes(path, spec)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    model = _build_skeleton(config, spec, _resolve_dtype(dtype, spec))
    _materialize(model, torch.device(device or "cpu"))
    missing, unexpected = safetensors.torch.load_model(model, str(Path(path) / WEIGHTS_NAME), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{WEIGHTS_NAME} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval()
