"""Input weights are complete before any work: every tensor the model needs is in the checkpoint, with the
model's shape and a dtype of its kind (floating point, integer, bool).

transformers fills a tensor missing from a checkpoint (or, with ``ignore_mismatched_sizes``, one of the wrong
shape) with random values and only logs a report; it reads a tensor whose header says ``I32`` for float32
data as integers (weights around 1e9). A model built that way compresses and evaluates without an error.
Every input path refuses both in one line, through the functions here: the dense folder (one file or
shards) and a GGUF file by transformers' loading report (:func:`check_loading_info`), the streamed folder
and a compressed folder by comparing the safetensors headers with the model skeleton (:func:`check_model_tensors`),
and every safetensors input by the shapes and dtype kinds of its header (:func:`header_conflicts`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

Header = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype such as "F32")

_KINDS = {"BOOL": "bool", "C64": "complex", "C128": "complex"}


def dtype_kind(dtype: str | torch.dtype) -> str:
    """"float", "integer", "bool" or "complex" for a safetensors dtype name ("F32", "I64", ...) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bool:
            return "bool"
        if dtype.is_complex:
            return "complex"
        return "float" if dtype.is_floating_point else "integer"
    name = str(dtype).upper()
    if name in _KINDS:
        return _KINDS[name]
    return "float" if name.startswith(("F", "BF")) else "integer"  # F64, F32, F16, BF16, F8_*; I*, U*


def _names(keys: list[str]) -> str:
    shown = ", ".join(repr(key) for key in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def refuse_incomplete(source: str, missing: Iterable[str] = (),
                      mismatched: Iterable[tuple[str, Any, Any]] = (),
                      mistyped: Iterable[tuple[str, str, torch.dtype]] = ()) -> None:
    """One-line ``ValueError`` naming the first problem of ``source`` (e.g. ``"model 'path'"``), if any.

    ``missing``: tensor names; ``mismatched``: (name, stored shape, the model's shape); ``mistyped``:
    (name, stored safetensors dtype, the model's dtype).
    """
    missing = sorted(missing)
    if missing:
        raise ValueError(f"{source} lacks weights the model needs: {_names(missing)} (refused rather than "
                         "filled with random values)")
    mismatched = sorted((str(name), tuple(stored), tuple(wanted)) for name, stored, wanted in mismatched)
    if mismatched:
        name, stored, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ValueError(f"{source} holds weights of the wrong shape: {name!r} is {stored}, the model needs "
                         f"{wanted}{more}")
    mistyped = sorted(mistyped)
    if mistyped:
        name, stored, wanted = mistyped[0]
        more = f" (and {len(mistyped) - 1} more)" if len(mistyped) > 1 else ""
        raise ValueError(f"{source} stores {name!r} as {stored}, but the model holds it as "
                         f"{str(wanted).removeprefix('torch.')}{more}: {dtype_kind(stored)} data would be read as "
                         f"{dtype_kind(wanted)} weights")


def check_loading_info(info: Any, source: str) -> None:
    """Refuse what transformers' loading report (``from_pretrained(..., output_loading_info=True)``, a dict,
    or its ``LoadStateDictInfo``) lists as missing or of the wrong shape: it filled those with random values.
    Its own exceptions to the rule (``_keys_to_ignore_on_load_missing``, tied weights) are already applied."""
    get = info.get if isinstance(info, dict) else lambda key: getattr(info, key, None)
    mismatched = [entry if isinstance(entry, (tuple, list)) and len(entry) == 3 else (entry, "?", "?")
                  for entry in get("mismatched_keys") or ()]
    refuse_incomplete(source, missing=get("missing_keys") or (), mismatched=mismatched)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of ``model`` holds: parameters and persistent buffers (meta ones too)."""
    return model.state_dict(keep_vars=True)


def _candidates(model: nn.Module, key: str) -> list[str]:
    """``key`` as the model may name it: as is, without or with the base-model prefix (as transformers loads)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = [key]
    if prefix:
        names.append(key.removeprefix(prefix + ".") if key.startswith(prefix + ".") else f"{prefix}.{key}")
    return names


def header_conflicts(header: Header, model: nn.Module) -> tuple[list[tuple[str, Any, Any]],
                                                              list[tuple[str, str, torch.dtype]]]:
    """Header entries that contradict the model's tensor of that name: ``(mismatched, mistyped)``, the first as
    (name, stored shape, the model's shape), the second as (name, stored dtype, the model's dtype) where the
    dtype is of another kind (integer data for a floating-point weight, or the other way round; floating-point
    dtypes among themselves are fine, the loaders cast them). Names the model does not have are left to the
    loaders. Read from the header alone: no tensor data."""
    tensors = model_tensors(model)
    mismatched, mistyped = [], []
    for key, (shape, stored) in header.items():
        name = next((name for name in _candidates(model, key) if name in tensors), None)
        if name is None:
            continue
        if tuple(shape) != tuple(tensors[name].shape):
            mismatched.append((key, tuple(shape), tuple(tensors[name].shape)))
        if dtype_kind(stored) != dtype_kind(tensors[name].dtype):
            mistyped.append((key, stored, tensors[name].dtype))
    return mismatched, mistyped


def check_header_fits(header: Header, model: nn.Module, source: str) -> None:
    """One-line ``ValueError`` for the first entry of ``header`` that contradicts ``model`` (see
    :func:`header_conflicts`); a missing tensor is left to the loader's report."""
    mismatched, mistyped = header_conflicts(header, model)
    refuse_incomplete(source, mismatched=mismatched, mistyped=mistyped)


def check_model_tensors(header: Header, model: nn.Module, source: str) -> None:
    """Every tensor of ``model`` (its skeleton, on the meta device or not) is in ``header`` under its own name,
    with its shape and a dtype of its kind; one tensor shared under several names (tied weights) is needed
    once. For loaders that read the files themselves (streamed and compressed folders): nothing is renamed."""
    tensors = model_tensors(model)
    group = {name: id(tensor) for name, tensor in tensors.items()}  # tied by identity (when tied already) ...
    ties = getattr(model, "all_tied_weights_keys", None) or {}  # ... or by transformers' table (tied when loaded)
    for target, source_name in ties.items() if isinstance(ties, dict) else ():
        if target in group and source_name in group:
            old, new = group[target], group[source_name]
            group = {name: new if value == old else value for name, value in group.items()}
    present = {group[name] for name in tensors if name in header}
    missing, named = [], set()
    for name, value in group.items():  # each absent tensor once, by its first name
        if value not in present and value not in named:
            named.add(value)
            missing.append(name)
    refuse_incomplete(source, missing, *header_conflicts(header, model))


class _NoLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "log_state_dict_report"


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Drop transformers' multi-line load report while loading: pifa checks the same facts and refuses in one
    line (or accepts, and then the report held nothing that matters). A filter, not a logger level:
    transformers runs extra checks, with warnings of their own, when its logger's level is raised."""
    logger, quiet = logging.getLogger("transformers.modeling_utils"), _NoLoadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


# config.json sizes that set how much a model built from it allocates; each must fit the tensors in the files
SIZE_KEYS = ("hidden_size", "intermediate_size", "head_dim", "vocab_size")


def stored_blocks(header: Header) -> int:
    """The length of the longest numbered module list in ``header`` (``model.layers.0.``, ``h.11.``, ...):
    how many blocks the files hold."""
    lists: dict[str, set[int]] = {}
    for name in header:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                lists.setdefault(".".join(parts[:i]), set()).add(int(part))
                break
    return max((len(indices) for indices in lists.values()), default=0)


def _declared(config: Any, key: str) -> Any:
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 -- a property of an odd config may raise anything
        return None


def check_declared_sizes(config: Any, header: Header, source: str) -> None:
    """One-line ``ValueError`` when ``config`` (a transformers config) declares a model the tensors in ``header``
    cannot be: more layers (``num_hidden_layers``) than the files hold blocks, a ``hidden_size`` that is no
    dimension of any tensor, or a size (``SIZE_KEYS``) larger than every tensor dimension. Checked from the
    header alone, before a model is built: a config.json declaring 100,000 layers or a hidden size of 2^20
    would otherwise allocate (or build on the meta device) for minutes before any other check could refuse it.
    """
    configs = [config]
    text = getattr(config, "get_text_config", None)
    try:
        inner = text() if callable(text) else None
    except Exception:  # noqa: BLE001
        inner = None
    if inner is not None and inner is not config:
        configs.append(inner)
    dims = {d for shape, _ in header.values() for d in shape}
    largest = max(dims, default=0)
    blocks = stored_blocks(header)
    for cfg in configs:
        layers = _declared(cfg, "num_hidden_layers")
        if isinstance(layers, int) and not isinstance(layers, bool) and layers > blocks:
            raise ValueError(f"{source}: config.json declares {layers:,} layers (num_hidden_layers) but its weights "
                             f"hold {blocks}: refused before building the model")
        for key in SIZE_KEYS:
            value = _declared(cfg, key)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value > largest:
                raise ValueError(f"{source}: config.json declares {key} {value:,}, larger than any tensor in its "
                                 f"weights (the largest dimension is {largest:,}): refused before building the model")
            if key == "hidden_size" and value not in dims:
                raise ValueError(f"{source}: config.json declares hidden_size {value:,}, but no tensor in its weights "
                                 f"has that dimension: refused before building the model")
