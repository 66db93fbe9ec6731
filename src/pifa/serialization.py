"""Safe save and load of compressed models: tensors in safetensors, structure in JSON.

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
"library_version": ..., "modules": {...}}``), so that, once ``pifa`` is imported,
``transformers.AutoModel*.from_pretrained`` rebuilds the compressed model through the
quantizer plugin in :mod:`pifa.hf_integration`. ``pifa_config.json`` stays the source
``load_compressed`` reads.

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
from .faults import crash_point
from .layers import LowRankLinear, PivotLinear
from .loading import model_class
from .modules import is_linear, linear_shape
from .sparse import PRUNED_ATTR

if TYPE_CHECKING:  # transformers is imported lazily: `pifa --help` stays fast
    import transformers

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "pifa_config.json"
WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
REQUIRED_FILES = (HF_CONFIG_NAME, WEIGHTS_NAME, CONFIG_NAME)
LAYER_KINDS: dict[str, type[nn.Module]] = {"lowrank": LowRankLinear, "pivot": PivotLinear}
QUANT_METHOD = "pifa"  # the ``quant_method`` of the ``quantization_config`` block in config.json


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


def pruned_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Linears that a sparse method pruned in this process: shape and pattern, by qualified name.

    They stay dense-shaped (zeros in the weight), so loading needs nothing from this table;
    ``pifa info`` uses it to report their achieved density.
    """
    table = {}
    for name, module in model.named_modules():
        pattern = getattr(module, PRUNED_ATTR, None)
        if pattern is not None:
            out_features, in_features = linear_shape(module)
            table[name] = {"out_features": out_features, "in_features": in_features, "pattern": pattern}
    return table


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
    for stale in path.parent.glob(f".{path.name}.*.partial"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        _write_directory(model, tmp, tokenizer, compression)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        crash_point("save")
        _replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def quantization_config_dict(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` for a model with these compressed modules."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "modules": copy.deepcopy(modules),
    }


def _quant_method(quantization_config: Any) -> Any:
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    return getattr(method, "value", method)


def is_pifa_quantization_config(quantization_config: Any) -> bool:
    """Whether a config's ``quantization_config`` (a dict or a config object) is pifa's."""
    return quantization_config is not None and _quant_method(quantization_config) == QUANT_METHOD


def _set_quantization_config(config: Any, modules: dict[str, dict[str, Any]]) -> None:
    """Point ``config.quantization_config`` at ``modules`` (drop a stale pifa block when there are none)."""
    current = getattr(config, "quantization_config", None)
    if current is not None and not is_pifa_quantization_config(current):
        if modules:
            raise ValueError(
                f"the model's config already has a {_quant_method(current)!r} quantization_config; "
                "it cannot also be saved with pifa's compressed layers"
            )
        return  # not ours, no compressed layers: leave it as it is
    if modules:
        config.quantization_config = quantization_config_dict(modules)
    elif hasattr(config, "quantization_config"):
        del config.quantization_config


def _write_directory(model: nn.Module, directory: Path, tokenizer: Any, compression: dict[str, Any] | None) -> None:
    modules = compressed_modules(model)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # what from_pretrained and load_compressed build
    _set_quantization_config(config, modules)
    config.save_pretrained(directory)
    safetensors.torch.save_model(model, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    spec: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "dtype": str(_model_dtype(model)).removeprefix("torch."),
        "modules": modules,
    }
    pruned = pruned_modules(model)
    if pruned:
        spec["pruned"] = pruned
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
    pruned = spec.get("pruned", {})
    if not isinstance(pruned, dict) or not all(
            isinstance(e, dict) and {"out_features", "in_features", "pattern"} <= e.keys() for e in pruned.values()):
        raise ValueError(f"{CONFIG_NAME}: 'pruned' must map module names to out_features, in_features and pattern")
    return spec


def _check_entry(name: str, entry: Any, source: str = CONFIG_NAME) -> None:
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


def _build_skeleton(config: transformers.PretrainedConfig, spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The model on the meta device with empty compressed layers swapped in.

    Built with ``dtype`` as torch's default dtype, as ``from_pretrained`` does: buffers the model
    creates in an explicit dtype (e.g. rotary ``inv_freq`` in float32) keep it, so the logits match
    ``from_pretrained(..., dtype=dtype)`` exactly.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config.architectures)(config)
            replace_with_compressed_layers(model, spec["modules"])  # in the dtype of the linears they replace
    finally:
        torch.set_default_dtype(previous)
    config.dtype = dtype
    return model


def resolve_module_name(model: nn.Module, name: str) -> str | None:
    """``name`` as a submodule of ``model``, allowing for the base-model prefix (e.g. ``model.``).

    A table written for ``LlamaForCausalLM`` names ``model.layers.0...``; loaded into the base
    ``LlamaModel`` that is ``layers.0...`` (and the other way round), as transformers does for weights.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        elif hasattr(model, prefix):
            candidates.append(f"{prefix}.{name}")
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def replace_with_compressed_layers(
    model: nn.Module,
    modules: dict[str, dict[str, Any]],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    source: str = CONFIG_NAME,
) -> list[str]:
    """Swap the linears named in ``modules`` (a ``pifa_config.json`` table) for empty compressed layers.

    Each new layer is created on ``device`` in ``dtype`` (by default those of the linear it replaces),
    uninitialised: the caller loads the tensors. Returns the names of the replaced modules in ``model``.
    """
    replaced = []
    for name, entry in modules.items():
        _check_entry(name, entry, source)
        target = resolve_module_name(model, name)
        if target is None:
            raise ValueError(f"{source} names module {name!r}, which the model does not have")
        original = model.get_submodule(target)
        weight = getattr(original, "weight", None)
        layer_dtype = dtype or (weight.dtype if isinstance(weight, torch.Tensor) else None)
        layer_device = device or (weight.device if isinstance(weight, torch.Tensor) else None)
        layer = LAYER_KINDS[entry["kind"]](
            entry["in_features"], entry["out_features"], entry["rank"], bias=entry["bias"],
            dtype=layer_dtype, device=layer_device,
        )
        _check_replaceable(name, original, layer, source)
        model.set_submodule(target, layer)
        replaced.append(target)
    return replaced


def _check_replaceable(name: str, original: nn.Module, layer: nn.Module, source: str = CONFIG_NAME) -> None:
    shape = linear_shape(original) if is_linear(original) else None
    if shape != (layer.out_features, layer.in_features):
        raise ValueError(
            f"{source} gives module {name!r} shape {(layer.out_features, layer.in_features)}, "
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


def _check_quantization_config(config: Any, spec: dict[str, Any]) -> None:
    """config.json's pifa ``quantization_config`` (when present) must describe the same modules."""
    block = getattr(config, "quantization_config", None)
    if not is_pifa_quantization_config(block):
        return  # written before config.json carried it, or another method's (the skeleton ignores it)
    modules = block.get("modules") if isinstance(block, dict) else getattr(block, "modules", None)
    if modules != spec["modules"]:
        raise ValueError(
            f"the quantization_config in {HF_CONFIG_NAME} and {CONFIG_NAME} describe different compressed modules"
        )


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
    _check_quantization_config(config, spec)
    model = _build_skeleton(config, spec, _resolve_dtype(dtype, spec))
    _materialize(model, torch.device(device or "cpu"))
    missing, unexpected = safetensors.torch.load_model(model, str(Path(path) / WEIGHTS_NAME), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{WEIGHTS_NAME} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval()
