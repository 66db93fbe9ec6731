"""Finding things in a model and swapping layers: the only module surgery of the pipeline, and the
context managers that change a model's state (mode, cache, device, hooks) and restore it."""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from .layers import is_compressed


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old or very new transformers
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2), both y = x W^T + b in effect.

    A subclass that overrides ``forward`` counts only if it computes just that (Falcon's FalconLinear does):
    Llama 4's and PhiMoE's routers return (scores, logits) and DeepSeek-V4's grouped linear applies its weight
    per group, so a compressed layer computing x W^T cannot stand in for them (see ``_computes_linear``)."""
    conv1d = _conv1d_type()
    for base in (nn.Linear, conv1d):
        if base is not None and isinstance(module, base):
            return type(module).forward is base.forward or _computes_linear(module, base)
    return False


def _computes_linear(module: nn.Module, base: type) -> bool:
    """Whether ``module`` (a subclass of ``base`` with a forward of its own) returns x W^T + b on a probe row;
    a module whose weight is not materialized (meta device) is taken at its class's word."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.is_meta or not weight.is_floating_point():
        return True
    n = weight.shape[1] if base is nn.Linear else weight.shape[0]
    probe = torch.randn(1, n, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            got = module(probe)
            want = base.forward(module, probe)
    except Exception:  # noqa: BLE001 - a forward that rejects a plain row is no plain linear
        return False
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and bool(torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.abs().max()))))


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
    """The transformer block list: the nn.ModuleList of same-type blocks holding the most linears.

    Only linears *inside* the blocks count: a list of bare linears is not a block list (a block
    cannot replace itself, so compressing it would change nothing).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        count = sum(is_linear(m) or is_compressed(m) for block in module for m in block.modules() if m is not block)
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
        if not local:  # the block itself: it cannot be swapped from inside
            continue
        full = f"{prefix}.{local}"
        if is_linear(module) and (not targets or _matches(full, targets)) and not _matches(full, ignore):
            found[full] = module
    return found


def is_attention(name: str) -> bool:
    """Attention linears by name (self_attn, attention, attn); everything else counts as MLP."""
    parts = name.lower().split(".")
    return any("attn" in part or "attention" in part for part in parts)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace submodule ``name`` of ``root`` (never ``root`` itself: an empty name is an error)."""
    if not name:
        raise ValueError(f"cannot replace {type(root).__name__} itself: name a submodule")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block; restores the training flag afterwards, also on errors."""
    was_training = model.training
    try:
        model.eval()
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def inference_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, no KV cache, no grad; restores mode and ``use_cache`` afterwards, also on errors.

    ``use_cache`` is turned off in the model's config and in its sub-configs (a multimodal model's language model
    reads its text config's: Gemma 3's would otherwise pass every block a cache that each replay extends)."""
    saved = [(c, c.use_cache) for c in _configs(getattr(model, "config", None))
             if getattr(c, "use_cache", None) is not None]
    try:
        for config, _ in saved:
            config.use_cache = False
        with eval_mode(model), torch.no_grad():
            yield
    finally:
        for config, use_cache in saved:
            config.use_cache = use_cache


def _configs(config: object) -> list:
    """``config`` and the configs nested in it (sub-configs of a composite model), each once."""
    found: list = []
    pending = [config]
    while pending:
        current = pending.pop()
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        attributes = getattr(current, "__dict__", {})
        pending += [value for value in attributes.values() if type(value).__name__.endswith("Config")
                    and hasattr(value, "to_dict")]
    return found


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU when it has none."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """``module`` moved to ``device`` for the block and back to where it was, also on errors."""
    home = module_device(module)
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[list]:
    """Own a list of hook handles; every one is removed on exit, also on errors."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


def write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out, in) weight into a targeted linear's own parameter (nn.Linear, or GPT-2's transposed
    Conv1D), in place."""
    with torch.no_grad():
        module.weight.copy_(weight if isinstance(module, nn.Linear) else weight.T)


def context_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's config declares it reads (``max_position_embeddings``), or None where
    it declares none: a missing or non-integer value, or a non-positive one (XLNet's -1 means no limit)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def kv_cache_name(model: nn.Module) -> str:
    """The KV cache's argument and output name: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
