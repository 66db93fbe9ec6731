"""Safe save and load of compressed models: tensors in safetensors, structure in JSON (see
:mod:`pifa.format` for the directory's layout and schema).

Loading rebuilds the skeleton on the meta device from ``config.json``, swaps in empty
compressed layers, materialises it and loads the tensors. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from ._version import __version__
from .faults import crash_point
from .format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HF_CONFIG_NAME,
    WEIGHTS_NAME,
    check_entry,
    check_no_custom_code,
    check_tensor_shapes,
    compressed_modules,
    is_pifa_quantization_config,
    is_sentinel,
    quant_method_of,
    quantization_config_dict,
    read_pifa_config,
    sentinel_tensors,
    weight_files,
)
from .inputs import check_declared_sizes, check_model_tensors
from .layers import LAYER_KINDS, PivotLinear
from .model import is_linear, linear_shape
from .validate import first_line, parse_device, parse_dtype

if TYPE_CHECKING:
    import transformers

    from .report import CompressionReport

logger = logging.getLogger(__name__)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def write_safetensors(module: nn.Module, file: str | os.PathLike, extra: dict[str, torch.Tensor] | None = None) -> None:
    """``module``'s state dict (tensors shared under several names stored once) plus ``extra`` to ``file``.

    The header's metadata is exactly ``{"format": "pt"}``: safetensors writes metadata from a hash map in
    an order that changes from process to process, so any second key (``save_model`` adds one per tied
    tensor) would make the same model give different bytes from run to run.
    """
    state = {name: tensor.contiguous() for name, tensor in unique_tensors(module.state_dict()).items()}
    state.update(extra or {})
    safetensors.torch.save_file(state, str(file), metadata={"format": "pt"})


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tensor shared under several names (tied weights) kept under one name, as
    safetensors (and ``save_pretrained``) store it."""
    state = dict(state)
    for removed in safetensors.torch._remove_duplicate_names(state).values():
        for name in removed:
            del state[name]
    return state


def writing_error(path: str | os.PathLike, exc: BaseException) -> ValueError:
    """A one-line ``ValueError`` for a failed write (full disk, read-only folder, a file in the way, ...)."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
        first_line(exc))
    return ValueError(f"could not write {str(path)!r}: {detail}")


def missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, nearest first."""
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def remove_created(folders: list[Path]) -> None:
    """Remove the folders a failed write created (nearest first), as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def check_writable_folder(path: str | os.PathLike, what: str = "output") -> None:
    """One-line ``ValueError`` unless ``path`` could be created: its nearest existing ancestor must be a
    writable folder (``path`` itself may exist). Creates nothing."""
    path = Path(path).absolute()
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"cannot write {what} {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ValueError(f"cannot write {what} {str(path)!r}: folder {str(ancestor)!r} is not writable")
            return


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

    The directory appears only once complete (written under a temporary name, then renamed). ``path``
    may be missing or an empty folder (as ``save_pretrained`` and ``tempfile.TemporaryDirectory()``
    allow); a non-empty folder is an error unless ``overwrite``. ``extra_files`` maps file names to text
    written beside the weights (e.g. the compression report). With the ``report`` of the run, the linears
    a sparse method pruned are listed under ``pruned``. A failed write (full disk, read-only folder)
    is a one-line ``ValueError`` and leaves nothing behind: no temporary folder, no parent folder it created.
    """
    if not hasattr(model, "config"):
        raise ValueError(f"expected a Hugging Face model with a .config, got {type(model).__name__}")
    with staged_directory(path, overwrite) as tmp:
        modules = compressed_modules(model)
        write_safetensors(model, tmp / WEIGHTS_NAME, sentinel_tensors(modules, _model_dtype(model)))
        write_metadata(model, tmp, modules, tokenizer, compression, report)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path`` to write into; renamed to ``path`` when the block ends without error.

    ``path`` may be missing or an empty folder; a non-empty folder is an error unless ``overwrite``.
    A failed write (full disk, read-only folder) is a one-line ``ValueError``; any error leaves nothing
    behind: no temporary folder, no parent folder this created. Temporary folders of killed runs are removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"output directory {str(path)!r} already exists and is not empty "
                         "(pass overwrite=True to replace it)")
    check_writable_folder(path)
    created = missing_parents(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.partial"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        yield tmp
        crash_point("save")
        if not overwrite and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"output {str(path)!r} appeared while it was being written (pass overwrite=True to "
                             "replace it)")
        _replace_directory(tmp, path)
    except (OSError, safetensors.SafetensorError) as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise writing_error(path, exc) from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise


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


def write_metadata(model: nn.Module, directory: Path, modules: dict[str, dict[str, Any]], tokenizer: Any = None,
                   compression: dict[str, Any] | None = None, report: CompressionReport | None = None) -> None:
    """Everything beside the weights: ``config.json`` (with the ``quantization_config`` for ``modules``),
    ``pifa_config.json`` and the tokenizer. ``model`` may sit on the meta device (streamed compression)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # what from_pretrained and load_compressed build
    _set_quantization_config(config, modules)
    config.save_pretrained(directory)
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
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first and removed after
    (an empty folder is simply replaced)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
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


@contextlib.contextmanager
def building_on_meta(dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside are on the meta device, built with ``dtype`` as torch's default dtype, as
    ``from_pretrained`` does: buffers the model creates in an explicit dtype (e.g. rotary ``inv_freq`` in
    float32) keep it, so the logits match ``from_pretrained(..., dtype=dtype)`` exactly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(previous)


def _build_skeleton(config: transformers.PretrainedConfig, spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The model on the meta device with empty compressed layers swapped in (see :func:`building_on_meta`)."""
    with building_on_meta(dtype):
        model = build_from_config(config)
        replace_with_compressed_layers(model, spec["modules"])  # in the dtype of the linears they replace
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
    path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
    fuse: bool = False,
) -> nn.Module:
    """Load a directory written by ``save_compressed``; returns the model in eval mode.

    ``dtype`` defaults to the dtype the model was saved in, ``device`` to the CPU. ``fuse=True``: compressed
    layers that read the same input (q/k/v, gate/up) share one first GEMM in eager inference
    (``pifa.fuse_siblings``: the same outputs to round-off, not bit for bit, hence off by default; the
    parameters and state dict are unchanged).
    """
    load_dtype = parse_dtype(dtype) if dtype is not None else None
    load_device = parse_device(device or "cpu")
    spec = read_pifa_config(path)
    check_no_custom_code(path)
    header = check_tensor_shapes(path, spec)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError, RecursionError) as exc:  # unreadable or too deep JSON, unknown model_type
        first = first_line(exc)
        raise ValueError(f"could not read {HF_CONFIG_NAME} of {str(path)!r}: {first}") from None
    _check_quantization_config(config, spec)
    check_declared_sizes(config, header, f"compressed model {str(path)!r}")
    model = _build_skeleton(config, spec, load_dtype or _resolve_dtype(None, spec))
    # the uncompressed tensors too (embeddings, head, norms): present, of their shape and dtype kind, before any
    # tensor data is read
    check_model_tensors(header, model, f"compressed model {str(path)!r}")
    _materialize(model, load_device)
    missing: set[str] | None = None
    unexpected: set[str] = set()
    for file in weight_files(path):  # one file, or a streamed run's shards
        file_missing, file_unexpected = safetensors.torch.load_model(model, str(file), strict=False)
        missing = set(file_missing) if missing is None else missing & set(file_missing)
        unexpected |= {key for key in file_unexpected if not is_sentinel(key, spec["modules"])}
    if missing or unexpected:
        raise ValueError(
            f"the weights of {str(path)!r} do not match the model: missing {sorted(missing or ())[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.eval()
    if fuse:
        from .fused import fuse_siblings

        fuse_siblings(model)
    return model
