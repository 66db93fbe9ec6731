"""Loading a dense Hugging Face model and its tokenizer for compression (safetensors only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ..io import model_class
from ..validate import parse_dtype


def resolve_device(device: str | None) -> torch.device:
    """"auto" -> CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}") from None


def _check_local(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        raise ValueError(
            f"model directory {str(path)!r} has no safetensors weights"
            + (" (pickle .bin/.pt files are never loaded)" if pickled else "")
        )


def load_dense(model: str, dtype: str | None = "auto", device: str | None = "auto") -> tuple[nn.Module, Any]:
    """A dense model and its tokenizer from a local directory (or a hub id when online).

    Never runs code from the model folder (``trust_remote_code=False`` everywhere).
    """
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
        config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=False)
        cls = model_class(architectures or config.architectures)
        dense = cls.from_pretrained(model, dtype=parse_dtype(dtype, allow_auto=True), use_safetensors=True,
                                    trust_remote_code=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:  # transformers, hub and safetensors errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"could not load model {model!r}: {first}") from None
    except Exception as exc:  # safetensors' SafetensorError derives from Exception only
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ValueError(f"could not load model {model!r}: model.safetensors is corrupt ({exc})") from None
    return dense.to(resolve_device(device)).eval(), tokenizer
