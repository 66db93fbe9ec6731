"""Loading a dense Hugging Face model and its tokenizer for compression (safetensors only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def resolve_device(device: str | None) -> torch.device:
    """"auto" -> CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}") from None


def resolve_dtype(dtype: str | None) -> Any:
    """"auto" keeps the checkpoint's dtype; otherwise a floating torch dtype name."""
    if dtype in (None, "auto"):
        return "auto"
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return value


def _check_local(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        raise ValueError(
            f"model directory {str(path)!r} has no safetensors weights"
            + (" (pickle .bin/.pt files are never loaded)" if pickled else "")
        )


def model_class(architectures: list[str] | None) -> type[nn.Module]:
    """The transformers class named by config.architectures (AutoModel when none is known)."""
    import transformers

    for arch in architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_dense(model: str, dtype: str | None = "auto", device: str | None = "auto") -> tuple[nn.Module, Any]:
    """A dense model and its tokenizer from a local directory (or a hub id when online)."""
    import transformers

    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {model!r} is not a directory")
        _check_local(path)
        architectures = json.loads((path / "config.json").read_text()).get("architectures")
    elif "/" in model and not model.startswith((".", "/")):
        architectures = None
    else:
        raise ValueError(f"model {model!r} does not exist")
    try:
        config = transformers.AutoConfig.from_pretrained(model)
        cls = model_class(architectures or config.architectures)
        dense = cls.from_pretrained(model, dtype=resolve_dtype(dtype), use_safetensors=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:  # transformers, hub and safetensors errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"could not load model {model!r}: {first}") from None
    except Exception as exc:  # safetensors' SafetensorError derives from Exception only
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ValueError(f"could not load model {model!r}: model.safetensors is corrupt ({exc})") from None
    return dense.to(resolve_device(device)).eval(), tokenizer
