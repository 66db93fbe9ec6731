"""Argument checks shared by the library: each raises ``ValueError`` with one line naming the value."""

from __future__ import annotations

from typing import Any

import torch

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} {value!r} must be {wanted}")
    return value


def parse_dtype(value: str | torch.dtype | None, allow_auto: bool = False) -> torch.dtype | str:
    """A floating torch dtype from its name (``"float32"``, ``"torch.bfloat16"``, ...) or itself.

    With ``allow_auto``, ``None`` and ``"auto"`` give ``"auto"`` (keep the checkpoint's dtype).
    Only float32, bfloat16 and float16 are supported: float64 and the float8 types are refused.
    """
    if allow_auto and value in (None, "auto"):
        return "auto"
    if isinstance(value, torch.dtype):
        resolved = value
    else:
        resolved = getattr(torch, str(value).removeprefix("torch."), None)
    name = str(resolved).removeprefix("torch.") if isinstance(resolved, torch.dtype) else None
    if name not in SUPPORTED_DTYPES:
        choices = ("auto, " if allow_auto else "") + ", ".join(SUPPORTED_DTYPES)
        raise ValueError(f"unsupported dtype {str(value).removeprefix('torch.')!r}; use {choices}")
    return resolved
