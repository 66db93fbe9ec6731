"""Loading a dense Hugging Face model and its tokenizer for compression (safetensors or GGUF, never pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ..format import check_no_custom_code, read_header, weight_files
from ..inputs import check_declared_sizes, check_header_fits, check_loading_info, quiet_load_report
from ..io import build_from_config, model_class
from ..validate import first_line, parse_device, parse_dtype
from .gguf import GGUF_SUFFIX, find_gguf, load_gguf


def resolve_device(device: str | None) -> torch.device:
    """"auto" -> CUDA when available, else the CPU; a device this machine lacks is a one-line ``ValueError``."""
    return parse_device(device)


def check_local(path: Path) -> None:
    """A local model folder: config.json and safetensors weights (pickle files are never loaded)."""
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        raise ValueError(
            f"model directory {str(path)!r} has no safetensors weights"
            + (" (pickle .bin/.pt files are never loaded)" if pickled else "")
        )
    weight_files(path)  # model.safetensors or an index's shards; a malformed or foreign index: refused, never guessed


def _local_architectures(path: Path) -> Any:
    """``architectures`` of a local config.json (read as data, never as code)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"config.json of model {str(path)!r} nests its JSON too deeply") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"config.json of model {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"config.json of model {str(path)!r} is not a JSON object")
    return config.get("architectures")


def load_dense(model: str, dtype: str | None = "auto", device: str | None = "auto") -> tuple[nn.Module, Any]:
    """A dense model and its tokenizer from a local directory, a GGUF file (or a folder holding exactly
    one), or a hub id when online.

    Never runs code from the model folder: a folder whose configs carry an ``auto_map`` is refused,
    and every transformers call passes ``trust_remote_code=False``.
    """
    dtype_value = parse_dtype(dtype, allow_auto=True)  # bad --dtype / --device: their own error, not the model's
    target = parse_device(device)
    path = Path(model)
    if path.suffix.lower() == GGUF_SUFFIX and not path.exists():
        raise ValueError(f"model {model!r} does not exist")
    located = find_gguf(path)
    if located is not None:
        check_no_custom_code(located[0])
        return load_gguf(path, dtype_value, target)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {model!r} is not a directory (nor a .gguf file)")
        check_local(path)
        check_no_custom_code(path)
        architectures = _local_architectures(path)
    elif "/" in model and not model.startswith((".", "/")):
        architectures = None
    else:
        raise ValueError(f"model {model!r} does not exist")
    try:
        config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=False)
        if getattr(config, "auto_map", None):
            raise ValueError(f"model {model!r} carries custom code ('auto_map' in its config); "
                             "pifa never runs code from a model folder")
        cls = model_class(architectures or config.architectures)
        if path.exists():  # sizes checked against the files before transformers allocates anything
            check_sizes_before_loading(config, path, f"model {model!r}")
        # transformers' load report is checked below and refused in one line (a wrong shape too, which it would
        # otherwise refuse pointing at the report)
        with quiet_load_report():
            dense, info = cls.from_pretrained(model, dtype=dtype_value, use_safetensors=True, trust_remote_code=False,
                                              output_loading_info=True, ignore_mismatched_sizes=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:  # transformers, hub and safetensors errors
        message = first_line(exc)
        if message.startswith(f"model {model!r}"):
            raise ValueError(message) from None
        raise ValueError(f"could not load model {model!r}: {message}") from None
    except Exception as exc:  # safetensors' SafetensorError derives from Exception only
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ValueError(f"could not load model {model!r}: model.safetensors is corrupt ({exc})") from None
    check_complete(dense, info, path if path.exists() else None, f"model {model!r}")
    try:
        dense = dense.to(target)
    except torch.OutOfMemoryError:
        raise ValueError(f"model {model!r} does not fit in the memory of {target}") from None
    return dense.eval(), tokenizer


def check_sizes_before_loading(config: Any, folder: Path, source: str) -> None:
    """What ``config`` declares against the headers of ``folder``'s weights, before the model is loaded: the
    layer count and sizes (:func:`pifa.inputs.check_declared_sizes`), then every tensor of the model built on the
    meta device (nothing allocated) that the files hold under its name, of its shape and dtype kind. A config
    declaring a hidden size the files do not have would otherwise make transformers allocate every linear at
    the declared size before it reports the mismatch."""
    header = read_header(weight_files(folder))
    check_declared_sizes(config, header, source)
    with torch.device("meta"):
        skeleton = build_from_config(config)
    check_header_fits(header, skeleton, source)


def check_complete(model: nn.Module, info: Any, folder: Path | None, source: str) -> None:
    """The dense model transformers loaded holds only the checkpoint's tensors: none missing or of the wrong shape
    (its loading report ``info``), none read from integer data as float weights (the headers of ``folder``'s
    safetensors files, when local). See :mod:`pifa.inputs`."""
    check_loading_info(info, source)
    if folder is not None:
        check_header_fits(read_header(weight_files(folder)), model, source)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder (never with code from the folder)."""
    check_no_custom_code(path)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"could not load the tokenizer of {str(path)!r}: {first_line(exc)}") from None
