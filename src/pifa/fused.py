"""Fused siblings: compressed linears that read the same input run their first GEMM as one.

In a Llama block q/k/v read one tensor and gate/up another. A PIFA layer's first GEMM is
``x @ pivot_weight^T`` and a low-rank layer's is ``x @ down^T``; for siblings these stack into one
(sum of ranks, in) weight, so one GEMM replaces three (or two) launches. ``fuse_siblings(model)``
finds the groups with one probe forward (forward pre-hooks record which compressed layers receive the
same tensor object, as the compression engine's ``group_by_input`` does), concatenates each group's
first-stage weights into one tensor, and re-points every sibling's first-stage parameter to its rows
of it (``param.data = weight[a:b]``): no extra memory, and the parameters, their names and the
state dict stay per-linear (saved folders are unchanged; ``state_dict`` returns copies of the rows).

At run time the first sibling called with an input computes the fused product and keeps it (keyed on
the input tensor's identity and version counter) until every sibling has taken its columns; any other
call order, a sibling called twice, or an input changed in place recomputes, so the result never
depends on the order. (Tensors made under ``torch.inference_mode`` keep no version counter: for them
an in-place change between two siblings' calls on the same tensor object would go unseen; no
transformers model does that to the input of q/k/v or gate/up.)

The fused path is eager inference only: under ``torch.compile`` (tracing), or when autograd is
recording (grad enabled and a parameter or the input requires grad), each sibling runs its own first
GEMM on its rows, exactly as an unfused layer does. Moving or casting the model (``.to``) breaks the
sharing; the next fused call re-concatenates and re-points the parameters.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LowRankLinear, PivotLinear, is_compressed, laid_out

FIRST_STAGE = {PivotLinear: "pivot_weight", LowRankLinear: "down"}
"""The name of each compressed kind's first-stage (rank, in) weight."""


def first_stage_name(module: nn.Module) -> str:
    return next(name for cls, name in FIRST_STAGE.items() if isinstance(module, cls))


class FusedGroup:
    """The shared first stage of a group of sibling layers (a plain object: never in a state dict)."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        ranks = [m.rank for m in members]
        self.bounds = [(sum(ranks[:i]), sum(ranks[: i + 1])) for i in range(len(members))]
        self.weight: torch.Tensor = torch.empty(0)
        self._input: Any = None
        self._version = -1
        self._product: torch.Tensor | None = None
        self._taken: set[int] = set()
        self.rebuild()

    def rebuild(self) -> None:
        """Concatenate the members' first-stage weights and point every member's parameter at its rows."""
        with torch.no_grad():
            params = [getattr(m, first_stage_name(m)) for m in self.members]
            self.weight = laid_out(torch.cat([p.detach() for p in params]))  # as one factor of its shape is
            for member, param, (a, b) in zip(self.members, params, self.bounds):
                param.data = self.weight[a:b]
                member._fused_ptr = param.data_ptr()
        self.release()

    def release(self) -> None:
        self._input, self._version, self._product, self._taken = None, -1, None, set()

    def product(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s first-stage output for ``x``, from one fused GEMM per input."""
        member = self.members[index]
        if getattr(member, first_stage_name(member)).data_ptr() != member._fused_ptr:  # moved or cast
            self.rebuild()
        ref = self._input() if self._input is not None else None
        version = -2 if x.is_inference() else x._version  # inference tensors keep no version counter
        if ref is not x or self._version != version or index in self._taken:
            self._product = F.linear(x, self.weight)
            self._input, self._version, self._taken = weakref.ref(x), version, set()
        product = self._product
        self._taken.add(index)
        if len(self._taken) == len(self.members):  # every sibling has its part: drop the references
            self.release()
        a, b = self.bounds[index]
        return product[..., a:b]


def _input_groups(model: nn.Module, probe: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names of compressed layers fed the same tensor object in one forward, groups of two or more."""
    from .capture import group_by_input

    order: list[tuple[str, torch.Tensor]] = []
    handles = [module.register_forward_pre_hook(lambda _m, args, name=name: order.append((name, args[0])))
               for name, module in model.named_modules() if is_compressed(module)]
    try:
        with torch.no_grad():
            model(**probe)
    finally:
        for handle in handles:
            handle.remove()
    return [group for group in group_by_input(order) if len(group) > 1]


def _default_probe(model: nn.Module) -> dict[str, torch.Tensor]:
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device)}


def fuse_siblings(model: nn.Module, probe: dict[str, torch.Tensor] | None = None) -> list[list[str]]:
    """Fuse the first GEMM of compressed layers that read the same input; returns the fused groups.

    ``probe``: keyword arguments for one forward of ``model`` that finds the groups (default: two
    token ids). Idempotent; layers already fused are re-grouped. Undo with ``unfuse_siblings``.
    Members must share dtype and device; a group mixing them is left unfused.
    """
    unfuse_siblings(model)
    modules = dict(model.named_modules())
    fused = []
    for names in _input_groups(model, probe or _default_probe(model)):
        members = [modules[name] for name in names]
        weights = [getattr(m, first_stage_name(m)) for m in members]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            continue
        group = FusedGroup(members)
        for index, member in enumerate(members):
            member._fused = (group, index)
        fused.append(names)
    return fused


def unfuse_siblings(model: nn.Module) -> int:
    """Give every fused layer its own first-stage weight again; returns how many were fused."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "_fused", None) is None:
                continue
            param = getattr(module, first_stage_name(module))
            param.data = param.detach().clone()
            module._fused = None
            module.relayout_()  # the clone of a row block of the group's weight may be laid out otherwise
            count += 1
    return count


def fused_groups(model: nn.Module) -> list[list[str]]:
    """The fused groups of ``model`` by layer name (empty when nothing is fused)."""
    names = {id(m): n for n, m in model.named_modules()}
    groups: dict[int, list[str]] = {}
    for module in model.modules():
        fused = getattr(module, "_fused", None)
        if fused is not None and id(fused[0]) not in groups:
            groups[id(fused[0])] = [names[id(m)] for m in fused[0].members]
    return list(groups.values())
