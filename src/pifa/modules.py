"""Finding things in a model and swapping layers: the only module surgery of the pipeline."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator

import torch
from torch import nn

from .layers import LowRankLinear, PivotLinear


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old or very new transformers
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2), both y = x W^T + b in effect."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear, Conv1D or compressed layer."""
    if hasattr(module, "out_features"):
        return module.out_features, module.in_features
    return module.nf, module.weight.shape[0]  # Conv1D stores its weight as (in, out)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear or Conv1D."""
    weight = module.weight.detach()
    return weight if isinstance(module, nn.Linear) else weight.T


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the nn.ModuleList of same-type blocks holding the most linears."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        count = sum(is_linear(m) or isinstance(m, (LowRankLinear, PivotLinear)) for m in module.modules())
        if count and (best is None or count > best[0]):
            best = (count, name, module)
    if best is None:
        raise ValueError(
            f"no block list found in {type(model).__name__}: looked for an nn.ModuleList of "
            "same-type transformer blocks containing nn.Linear or Conv1D layers"
        )
    return best[1], best[2]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def target_linears(
    block: nn.Module, prefix: str, targets: tuple[str, ...], ignore: tuple[str, ...]
) -> dict[str, nn.Module]:
    """Linears of ``block`` to compress, by full name ``prefix.local``, in registration order."""
    found = {}
    for local, module in block.named_modules():
        full = f"{prefix}.{local}"
        if is_linear(module) and (not targets or _matches(full, targets)) and not _matches(full, ignore):
            found[full] = module
    return found


def is_attention(name: str) -> bool:
    """Attention linears by name (self_attn, attention, attn); everything else counts as MLP."""
    parts = name.lower().split(".")
    return any("attn" in part or "attention" in part for part in parts)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def build_layer(kind: str, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype, pivot_method: str = "lu") -> nn.Module:
    """A LowRankLinear or PivotLinear from float64 factors, cast to ``dtype``."""
    bias = None if bias is None else bias.to(torch.float64)
    if kind == "pivot":
        layer = PivotLinear.from_factors(up, down, bias, method=pivot_method)
    else:
        layer = LowRankLinear.from_factors(up, down, bias)
    return layer.to(dtype)


@contextlib.contextmanager
def inference_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, no KV cache, no grad; restores mode and ``use_cache`` afterwards, also on errors."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        model.eval()
        if config is not None and use_cache is not None:
            config.use_cache = False
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[list]:
    """Own a list of hook handles; every one is removed on exit, also on errors."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()
