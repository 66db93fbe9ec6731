"""``CompressionReport``: what a compression run did, per module and in total."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

_NM_ONLY = ("nm_in_storage", "input_permutation")  # left out of the JSON where they do not apply


@dataclass
class ModuleReport:
    """One compressed module. ``calib_error`` is ||(W - W') X~||^2 / ||W X~||^2 on calibration data;
    ``allocation_score`` what chose its rank when an allocation scored the layers (e.g. spectrum)."""

    name: str
    kind: str
    out_features: int
    in_features: int
    rank: int
    params_before: int
    params_after: int
    calib_error: float
    allocation_score: float | None = None  # what chose the rank (spectrum: discarded whitened energy), if any
    # sparse N:M: whether the stored weight is N:M as stored (None: unstructured or not pruned) and, after
    # RIA's channel permutation, the input order perm in which it is (W[:, perm] is N:M; None: as stored)
    nm_in_storage: bool | None = None
    input_permutation: list[int] | None = None


@dataclass
class CompressionReport:
    config: dict[str, Any]
    modules: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration_tokens: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    allocation_cost: dict[str, float] = field(default_factory=dict)  # a measured allocation's seconds and passes
    # latency-table plans: the linears' decode and prefill, the whole model's decode step (decode_model) if timed
    predicted_speedup: dict[str, float] = field(default_factory=dict)
    replay_difference: float | None = None  # the guard's largest |replay - model's own forward| (see capture)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent inside the block to ``stage_seconds[name]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    def pruned_modules(self) -> dict[str, dict[str, Any]]:
        """The linears a sparse method pruned (zeros in a dense weight): shape and pattern, by name.

        Loading needs nothing from this table; ``pifa info`` uses it to count their kept weights. For an
        N:M pattern, ``kernel`` says whether a hardware N:M kernel can use the stored weight directly
        ("hardware 2:4 kernel: direct") or only with its inputs reordered ("needs the input permutation"):
        then ``input_permutation`` is perm, W[:, perm] is N:M and W x = W[:, perm] x[perm].
        """
        pattern = self.config.get("pattern", "unstructured")
        table = {}
        for m in self.modules:
            if m.kind != "sparse":
                continue
            entry: dict[str, Any] = {"out_features": m.out_features, "in_features": m.in_features, "pattern": pattern}
            if pattern != "unstructured":  # reports from before the permutation: N:M as stored
                direct = m.nm_in_storage is not False and m.input_permutation is None
                entry["kernel"] = f"hardware {pattern} kernel: direct" if direct else "needs the input permutation"
                if m.input_permutation is not None:
                    entry["input_permutation"] = list(m.input_permutation)
            table[m.name] = entry
        return table

    @property
    def density(self) -> float:
        """Achieved density: kept fraction of the targeted linears' weights."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "density": self.density,
            "seconds": self.seconds,
            "calibration_tokens": self.calibration_tokens,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            **({"allocation_cost": self.allocation_cost} if self.allocation_cost else {}),
            **({"predicted_speedup": self.predicted_speedup} if self.predicted_speedup else {}),
            **({"replay_difference": self.replay_difference} if self.replay_difference is not None else {}),
            "modules": [{k: v for k, v in asdict(m).items() if v is not None or k not in _NM_ONLY}
                        for m in self.modules],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def table(self) -> str:
        from .tables import format_table

        rows = [
            {"module": m.name, "kind": m.kind, "shape": f"{m.out_features}x{m.in_features}", "rank": m.rank,
             "before": m.params_before, "after": m.params_after, "calib_err": f"{m.calib_error:.4f}"}
            for m in self.modules
        ]
        speedup = self.config.get("speedup")
        target = f"decode speed-up {speedup}x" if speedup else self.config.get("density")
        summary = (
            f"{len(self.modules)} modules, {self.params_after:,} of {self.params_before:,} weights kept: "
            f"density {self.density:.4f} (target {target}), {self.seconds:.1f} s"
        )
        if self.predicted_speedup:
            summary += "; " + speedup_summary(self.predicted_speedup)
        if self.allocation_cost:
            cost = self.allocation_cost
            summary += (f"; the {self.config.get('allocation')} allocation took {cost['seconds']:.1f} s "
                        f"and {cost['forward_passes']:,} block forward passes")
        return format_table(rows) + "\n" + summary


def speedup_summary(predicted: dict[str, float]) -> str:
    """A latency-table plan's predicted speed-ups in words (``Report.predicted_speedup``, a plan's ``speedup``)."""
    text = (f"predicted speed-up of these linears: decode {predicted['decode']:.2f}x, "
            f"prefill {predicted['prefill']:.2f}x")
    if "decode_model" in predicted:
        text += f"; of the whole model's decode step: {predicted['decode_model']:.2f}x"
    return text
