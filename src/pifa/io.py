"""Safe save and load of compressed models: tensors in safetensors, structure in JSON (see
:mod:`pifa.format` for the directory's layout and schema).

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
from .format import (
    CONFIG_NAME, FORMAT_VERSION, HF_CONFIG_NAME, WEIGHTS_NAME, check_entry, check_tensor_shapes, compressed_modules,
    is_pifa_quantization_config, quant_method_of, quantization_config_dict, read_pifa_config,
)
from .layers import LAYER_KINDS, PivotLinear
from .model import is_linear, linear_shape
from .validate import parse_dtype

if TYPE_CHECKING:
    import transformers

    from .report import CompressionReport

logger = logging.getLogger(__name__)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    compression: dict[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    report: CompressionReport | None = None,
) -> Path:
    """Write ``model`` (a Hugging Face model, possibly with compressed layers) to directory ``path``.

    The directory appears only once complete (written under a temporary name, then
    renamed). An existing ``path`` is an error unless ``overwrite``. ``extra_files`` maps
    file names to text written beside the weights (e.g. the compression report). With the
    ``report`` of the run, the linears a sparse method pruned are listed under ``pruned``.
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
        _write_directory(model, tmp, tokenizer, compression, report)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        crash_point("save")
        _replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _set_quantization_config(config: Any, modules: dict[str, dict[str, Any]]) -> None:
    """Point ``config.quantization_config`` at ``modules`` (drop a stale pifa block when there are none)."""
    current = getattr(config, "quantization_config", None)
    if current is not None and not is_pifa_quantization_config(current):
        if modules:
            raise ValueError(
                f"the model's config already has a {quant_method_of(current)!r} quantization_config; "
                "it cannot also be saved with pifa's compressed layers"
            )
        return  # not ours, no compressed layers: leave it as it is
    if modules:
        config.quantization_config = quantization_config_dict(modules)
    elif hasattr(config, "quantization_config"):
        del config.quantization_config


def _write_directory(model: nn.Module, directory: Path, tokenizer: Any, compression: dict[str, Any] | None,
                     report: CompressionReport | None) -> None:
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
    pruned = report.pruned_modules() if report is not None else {}
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


def model_class(architectures: Any) -> type[nn.Module]:
    """The transformers model class that ``config.architectures`` names (``AutoModel`` when none).

    Only transformers' own ``PreTrainedModel`` subclasses are accepted: a name such as
    ``"pipeline"`` or ``"AutoTokenizer"`` is refused, and no code from a model folder is ever used.
    """
    import transformers

    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(a, str) for a in architectures)):
        raise ValueError(f"config.json: 'architectures' must be a list of class names, got {architectures!r}")
    for arch in architectures or []:
        cls = getattr(transformers, arch, None) if arch.isidentifier() and not arch.startswith("_") else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ValueError(f"config.json: architectures names {arch!r}, which is not a transformers model class")
        return cls
    return transformers.AutoModel


def build_from_config(config: transformers.PretrainedConfig) -> nn.Module:
    """``config``'s model with fresh weights, never with code from a model folder."""
    cls = model_class(config.architectures)
    if hasattr(cls, "from_config"):  # the Auto classes
        return cls.from_config(config, trust_remote_code=False)
    return cls(config)


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
            model = build_from_config(config)
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
        check_entry(name, entry, source)
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
    return parse_dtype(dtype if dtype is not None else spec.get("dtype", "float32"))


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

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    _check_quantization_config(config, spec)
    model = _build_skeleton(config, spec, _resolve_dtype(dtype, spec))
    _materialize(model, torch.device(device or "cpu"))
    missing, unexpected = safetensors.torch.load_model(model, str(Path(path) / WEIGHTS_NAME), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{WEIGHTS_NAME} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval()
