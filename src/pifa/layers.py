"""Compressed linear layers: ``LowRankLinear`` (up @ down) and ``PivotLinear`` (PIFA).

Both are drop-in replacements for ``nn.Linear``: they accept inputs of shape
(..., in_features), return (..., out_features) in the input's dtype and device, keep
the bias, support autograd and ``torch.compile``, and densify with ``to_linear()``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .pivot import DEFAULT_PIVOT_METHOD, PivotMethod, check_factors, pivot_factorize
from .validate import all_finite


def check_rank(rank: int, out_features: int, in_features: int) -> None:
    """Raise ``ValueError`` unless 1 <= rank <= min(out_features, in_features)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_features, in_features):
        raise ValueError(
            f"rank {rank!r} is outside [1, min(out, in) = {min(out_features, in_features)}] "
            f"for a {out_features} x {in_features} layer"
        )


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear``, checked to be finite."""
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"expected an nn.Linear, got {type(linear).__name__}")
    weight = linear.weight.detach()
    if not all_finite(weight):
        raise ValueError("linear weight has non-finite values (NaN or Inf)")
    return weight


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``weight`` (m x n) in float64: up (m x rank), down (rank x n), sqrt(S) on each side."""
    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def column_major(rows: int, cols: int) -> bool:
    """How a (rows, cols) factor is stored: column-major (its transpose contiguous) when it has more rows
    than columns, row-major otherwise. ``x @ W^T`` for one token then runs about 1.4-2x faster on CPU for a
    tall factor (the up factor, PIFA's coefficients) and keeps the faster row-major form for a wide one (the
    down factor, the pivot rows); each shape alone prefills within 0.91-1.09x either way
    (``benchmarks/bench_layout.py``: the shapes alone and SmolLM2's whole decode step and prefill)."""
    return rows > cols


def laid_out(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D ``tensor`` stored as ``column_major`` says (itself when it already is)."""
    if column_major(*tensor.shape):
        return tensor if tensor.t().is_contiguous() else tensor.t().contiguous().t()
    return tensor.contiguous()


def _factor(rows: int, cols: int, **factory: Any) -> nn.Parameter:
    """An empty (rows, cols) factor in its layout (``column_major``). ``.to``, ``to_empty``, ``copy_`` and
    ``load_state_dict`` keep the layout; files store contiguous (rows, cols) tensors as before."""
    if column_major(rows, cols):
        return nn.Parameter(torch.empty(cols, rows, **factory).t())
    return nn.Parameter(torch.empty(rows, cols, **factory))


class _CompressedLinear(nn.Module):
    """What both compressed layers share: the constructor, shapes, bias, parameter counting, repr.

    Subclasses define ``_make_factors(**factory)`` (their empty parameters and buffers) and
    ``_dense_weight() -> Tensor`` (out, in) used by ``to_linear``.
    """

    in_features: int
    out_features: int
    rank: int
    _fused: Any = None  # (FusedGroup, index) once pifa.fused.fuse_siblings shared the first stage

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._make_factors(device=device, dtype=dtype)  # type: ignore[attr-defined]

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():
            return True
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _fused_first_stage(self, x: torch.Tensor) -> torch.Tensor | None:
        """This layer's columns of its group's fused first GEMM (eager inference only), else None."""
        if self._fused is None or self._needs_autograd(x):
            return None
        group, index = self._fused
        return group.product(index, x)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._fused is not None and not keep_vars:  # rows of the group's weight: save a tensor of its own
            for name, param in self._parameters.items():
                if param is not None and prefix + name in destination:
                    destination[prefix + name] = destination[prefix + name].clone()

    def relayout_(self) -> None:
        """Store the factors in their layout again (``column_major``) after a loader replaced them with
        row-major tensors (transformers 5 assigns loaded tensors directly). The values are unchanged."""
        if self._fused is not None:  # rows of the group's weight, laid out by the group
            return
        with torch.no_grad():
            for name, param in self._parameters.items():
                if param is not None and name != "bias" and param.device.type != "meta":
                    param.data = laid_out(param.data)

    def num_parameters(self) -> int:
        """Stored weights plus bias (index buffers are not counted)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, params={self.num_parameters()} "
            f"({self.num_parameters() / dense:.1%} of dense)"
        )

    def to_linear(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear`` (same dtype and device)."""
        weight = self._dense_weight()  # type: ignore[attr-defined]
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _copy_bias(layer: _CompressedLinear, bias: torch.Tensor | None) -> None:
    if bias is not None:
        with torch.no_grad():
            layer.bias.copy_(bias)


class LowRankLinear(_CompressedLinear):
    """y = up(down(x)) + bias with ``down``: (rank, in_features), ``up``: (out_features, rank)."""

    def _make_factors(self, **factory: Any) -> None:
        self.down = _factor(self.rank, self.in_features, **factory)
        self.up = _factor(self.out_features, self.rank, **factory)

    @classmethod
    def from_factors(
        cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """Layer from ``up`` (out x rank), ``down`` (rank x in) and an optional ``bias`` (out,)."""
        check_factors(up, down, bias)
        (m, r), n = up.shape, down.shape[1]
        layer = cls(n, m, r, bias=bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            layer.up.copy_(up)
            layer.down.copy_(down)
        _copy_bias(layer, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Plain truncated SVD of ``linear.weight`` at ``rank``."""
        weight = dense_weight(linear)
        check_rank(rank, *weight.shape)
        up, down = svd_factors(weight, rank)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_factors(up.to(weight.dtype), down.to(weight.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self._fused_first_stage(x)
        return F.linear(F.linear(x, self.down) if z is None else z, self.up, self.bias)

    def _dense_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return (self.up.double() @ self.down.double()).to(self.up.dtype)


class PivotLinear(_CompressedLinear):
    """PIFA layer: pivot rows ``pivot_weight`` (rank, in) and ``coeff`` (out - rank, rank).

    Forward: z = x pivot_weight^T gives the outputs of the pivot rows ``pivot_index``;
    the other rows (``other_index``, increasing) are z coeff^T; then the bias is added.
    Cost r (out + in - r) multiply-adds per token, r^2 fewer than ``LowRankLinear``.
    """

    def _make_factors(self, **factory: Any) -> None:
        rank, out_features, device = self.rank, self.out_features, factory["device"]
        self.pivot_weight = _factor(rank, self.in_features, **factory)
        self.coeff = _factor(out_features - rank, rank, **factory)
        self.register_buffer("pivot_index", torch.arange(rank, device=device))
        # Derived from pivot_index (see _refresh_index); not saved.
        self.register_buffer("gather_index", torch.arange(out_features, device=device), persistent=False)
        self.register_buffer("other_index", torch.arange(rank, out_features, device=device), persistent=False)

    @classmethod
    def from_factors(
        cls,
        up: torch.Tensor,
        down: torch.Tensor,
        bias: torch.Tensor | None = None,
        method: PivotMethod = DEFAULT_PIVOT_METHOD,
    ) -> PivotLinear:
        """Lossless PIFA encoding of ``up @ down`` (out x rank, rank x in) plus ``bias``."""
        check_factors(up, down, bias)
        pivoting, pivot_rows = pivot_factorize(up, down, method)
        (m, r), n = up.shape, down.shape[1]
        layer = cls(n, m, r, bias=bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            layer.pivot_weight.copy_(pivot_rows)
            layer.coeff.copy_(pivoting.coeff)
            layer.pivot_index.copy_(pivoting.pivot_index)
        layer._refresh_index()
        _copy_bias(layer, bias)
        return layer

    @classmethod
    def from_low_rank(cls, layer: LowRankLinear, method: PivotMethod = DEFAULT_PIVOT_METHOD) -> PivotLinear:
        """Lossless re-encoding of a ``LowRankLinear``."""
        bias = None if layer.bias is None else layer.bias.detach()
        return cls.from_factors(layer.up.detach(), layer.down.detach(), bias, method)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, method: PivotMethod = DEFAULT_PIVOT_METHOD) -> PivotLinear:
        """Plain truncated SVD at ``rank``, then PIFA."""
        return cls.from_low_rank(LowRankLinear.from_linear(linear, rank), method)

    def _refresh_index(self) -> None:
        """Rebuild the derived index buffers from ``pivot_index``; reject an invalid one."""
        m, r = self.out_features, self.rank
        pivot = self.pivot_index
        seen = torch.zeros(m, dtype=torch.bool, device=pivot.device)
        if pivot.shape != (r,) or bool((pivot < 0).any()) or bool((pivot >= m).any()):
            raise ValueError(f"pivot_index must hold {r} row indices in [0, {m}), got shape {tuple(pivot.shape)}")
        seen[pivot] = True
        if int(seen.sum()) != r:
            raise ValueError("pivot_index has repeated rows")
        other = torch.nonzero(~seen).flatten()
        gather = torch.empty(m, dtype=torch.long, device=pivot.device)
        gather[pivot] = torch.arange(r, device=pivot.device)
        gather[other] = torch.arange(r, m, device=pivot.device)
        self.other_index, self.gather_index = other, gather

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "pivot_index" in state_dict:
            self._refresh_index()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._needs_autograd(x):
            z = F.linear(x, self.pivot_weight)
            y = torch.cat([z, F.linear(z, self.coeff)], dim=-1).index_select(-1, self.gather_index)
            return y if self.bias is None else y + self.bias
        return self._forward_inference(x, self._fused_first_stage(x))

    def _forward_inference(self, x: torch.Tensor, fused: torch.Tensor | None = None) -> torch.Tensor:
        """Same maths with both GEMMs writing into one buffer (T, out) and one gather (no autograd);
        ``fused``: this layer's first-stage output, already computed by its fused group."""
        x2 = x.reshape(-1, self.in_features)
        buf = x2.new_empty(x2.shape[0], self.out_features)
        z, rest = buf[:, : self.rank], buf[:, self.rank :]
        if fused is None:
            torch.mm(x2, self.pivot_weight.t(), out=z)
        else:
            z.copy_(fused.reshape(-1, self.rank))
        if self.bias is None:
            torch.mm(z, self.coeff.t(), out=rest)
        else:
            torch.addmm(self.bias[self.other_index], z, self.coeff.t(), out=rest)
            z.add_(self.bias[self.pivot_index])
        # torch.gather with a broadcast index beats index_select along dim 1 on CPU (fp32 2048 x 4096:
        # 6.7 vs 10.0 ms; bf16 512 x 4096: 1.4 vs 5.5 ms).
        out = torch.gather(buf, 1, self.gather_index.expand(buf.shape[0], -1))
        return out.reshape(*x.shape[:-1], self.out_features)

    def _dense_weight(self) -> torch.Tensor:
        with torch.no_grad():
            weight = torch.empty(self.out_features, self.in_features, dtype=torch.float64, device=self.coeff.device)
            pivot = self.pivot_weight.double()
            weight[self.pivot_index] = pivot
            weight[self.other_index] = self.coeff.double() @ pivot
            return weight.to(self.pivot_weight.dtype)


LAYER_KINDS: dict[str, type[_CompressedLinear]] = {"lowrank": LowRankLinear, "pivot": PivotLinear}
"""The compressed layer kinds, by the name ``pifa_config.json`` gives them; their parameter counts
are ``pifa.budget.layer_parameters`` (r (m + n) and r (m + n - r))."""


def is_compressed(module: nn.Module) -> bool:
    """Whether ``module`` is one of pifa's compressed layers."""
    return isinstance(module, tuple(LAYER_KINDS.values()))


def layer_kind(module: nn.Module) -> str:
    """The ``LAYER_KINDS`` name of a compressed layer."""
    return next(kind for kind, cls in LAYER_KINDS.items() if isinstance(module, cls))


def build_layer(kind: str, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype, pivot_method: PivotMethod = DEFAULT_PIVOT_METHOD) -> nn.Module:
    """A ``kind`` layer from float64 factors up (m, r) and down (r, n), cast to ``dtype``."""
    bias = None if bias is None else bias.to(torch.float64)
    if kind == "pivot":
        layer = PivotLinear.from_factors(up, down, bias, method=pivot_method)
    elif kind == "lowrank":
        layer = LowRankLinear.from_factors(up, down, bias)
    else:
        raise ValueError(f"unknown layer kind {kind!r}; choose one of {', '.join(LAYER_KINDS)}")
    return layer.to(dtype)
