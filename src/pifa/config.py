"""``CompressionConfig``: one frozen, versioned description of a compression run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .budget import check_density
from .sparse import RULES as SPARSE_RULES
from .sparse import parse_pattern, resolve_density
from .validate import check_finite_number, check_positive_int

CONFIG_VERSION = 1


@dataclass(frozen=True)
class Method:
    """What a method does: the layer every target becomes and the solver steps that fit it.

    ``layer_kind`` is "lowrank" (up @ down), "pivot" (PIFA) or "sparse" (zeros written into the
    dense weight by ``sparse_rule``); ``whiten`` fits factors to the calibration statistics
    (SVD-LLM); ``reconstruct`` runs the M reconstruction on the two activation streams.
    """

    name: str
    layer_kind: str
    whiten: bool = False
    reconstruct: bool = False
    sparse_rule: str | None = None

    @property
    def low_rank(self) -> bool:
        return self.sparse_rule is None


METHODS: dict[str, Method] = {
    "svd": Method("svd", "lowrank"),
    "svd-llm": Method("svd-llm", "lowrank", whiten=True),
    "m": Method("m", "lowrank", whiten=True, reconstruct=True),
    "mpifa": Method("mpifa", "pivot", whiten=True, reconstruct=True),
    **{rule: Method(rule, "sparse", sparse_rule=rule) for rule in SPARSE_RULES},
}
LOW_RANK_METHODS = tuple(name for name, method in METHODS.items() if method.low_rank)
SPARSE_METHODS = tuple(name for name, method in METHODS.items() if not method.low_rank)
ALLOCATIONS = ("uniform", "owl", "spectrum", "sensitivity")
PIVOT_METHODS = ("lu", "qr")
# Never compressed by default: the head and embeddings, norms, poolers, and the sparse-attention indexer of
# DeepSeek-V3.2-style models (DeepSeek V3.2, GLM-MoE-DSA, HY-V4, ...): a small module that picks which tokens
# each query attends to (a discrete choice, like a router) and reads its linears' ``weight.dtype``.
DEFAULT_IGNORE = ("*lm_head*", "*embed*", "*norm*", "*pooler*", "*.indexer.*")


def _field(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CompressionConfig:
    """How to compress. ``density`` is the KEPT fraction of the targeted linears' weights.

    Attributes:
        density: kept fraction over all targeted linears (parameter-weighted), in (0, 1].
        method: "svd" (plain truncation), "svd-llm" (whitened), "m" (whitened + the
            M reconstruction), "mpifa" (M, then PIFA re-encoding; the default).
        attn_density: optional density of the attention linears; the MLP density is
            then solved so that the total hits ``density``.
        allocation: "uniform", "owl" (outlier-aware, per block), "spectrum" (per-linear ranks that
            minimise the summed discarded whitened energy within the budget) or "sensitivity"
            (per-linear ranks that minimise the summed measured output KL within the budget);
            the last two for low-rank methods only.
        sensitivity_samples: calibration sequences the sensitivity allocation measures KL on.
        owl_threshold, owl_lambda: OWL's outlier multiple M and density spread l.
        mix: the M target's weight on the dense stream (lambda).
        als_steps: alternating least-squares steps of M.
        ridge: M's pull of U V toward W, relative to the mean diagonal of the statistics.
        damping: relative damping added to X X^T before the Cholesky factorization.
        rank_multiple_of: round every rank down to a multiple of this.
        targets: fnmatch patterns of module names to compress (empty: every linear in
            the transformer blocks).
        ignore: fnmatch patterns never compressed.
        pivot_method: "lu" or "qr" for the PIFA re-encoding.
        permute: N:M sparse methods only: prune every linear in the input-channel order (RIA's channel
            permutation) whose groups of M keep the most of the rule's score; the weight is written
            back in the original order (the model computes the same as the pruned permuted layer).
    """

    density: float = _field(None, "kept fraction of the targeted linears' weights, in (0, 1] (default 0.5, "
                                  "or N/M for an N:M pattern)")
    method: str = _field("mpifa", "svd | svd-llm (whitened) | m (whitened + M) | mpifa (M + PIFA); "
                                  "sparse baselines: magnitude | wanda | sparsegpt | ria")
    pattern: str = _field("unstructured", "sparse methods: unstructured, or N:M such as 2:4 or 4:8")
    permute: bool = _field(False, "sparse methods with an N:M pattern: RIA's channel permutation (per linear, the "
                                  "input order whose groups of M keep the most score; the weight is stored in the "
                                  "original order, a hardware N:M kernel needs the recorded permutation)")
    attn_density: float | None = _field(None, "attention density; the MLP density is solved to hit --density")
    allocation: str = _field("uniform", "uniform, owl (outlier-aware per block), spectrum (per-linear ranks from "
                                        "the whitened spectra of the dense model) or sensitivity (per-linear ranks "
                                        "from the measured output KL of each truncation, knapsack); the last two "
                                        "for low-rank methods")
    sensitivity_samples: int = _field(2, "sensitivity: calibration sequences the output KL is measured on")
    owl_threshold: float = _field(5.0, "OWL: a score is an outlier above this multiple of the mean")
    owl_lambda: float = _field(0.08, "OWL: block densities spread over density +- this")
    mix: float = _field(0.25, "M: weight of the dense stream in the target")
    als_steps: int = _field(2, "M: alternating least-squares steps")
    ridge: float = _field(1e-3, "M: pull of U V toward W (relative to the statistics' mean diagonal)")
    damping: float = _field(1e-6, "relative damping of X X^T before Cholesky")
    rank_multiple_of: int = _field(1, "round every rank down to a multiple of this")
    targets: tuple[str, ...] = _field((), "fnmatch patterns of modules to compress (default: all block linears)")
    ignore: tuple[str, ...] = _field(DEFAULT_IGNORE, "fnmatch patterns never compressed")
    pivot_method: str = _field("lu", "PIFA pivoting: lu (fast) or qr (smallest coefficients)")
    latency_table: str | None = _field(None, "PIFA plans: a latency table file (measured on this machine and cached "
                                             "there when missing); no linear is planned at a rank whose PIFA form "
                                             "decodes slower than its dense form: it stays dense instead")
    speedup: float | None = _field(None, "PIFA plans with a latency table: plan for this predicted decode speed-up "
                                         "instead of a density: of the whole model's decode step (timed on the "
                                         "dense model, in memory on the compression device, one process), else of "
                                         "the targeted linears (sensitivity ranks: the least measured KL within "
                                         "that latency budget; other allocations: the largest density that reaches "
                                         "it)")
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        _choice("method", self.method, tuple(METHODS))
        parse_pattern(self.pattern)
        if self.method in SPARSE_METHODS:
            density = 0.5 if self.density is None and parse_pattern(self.pattern) is None else self.density
            object.__setattr__(self, "density", resolve_density(self.pattern, density))
        elif self.pattern != "unstructured":
            raise ValueError(f"pattern {self.pattern!r} needs a sparse method ({', '.join(SPARSE_METHODS)})")
        elif self.density is None:
            object.__setattr__(self, "density", 0.5)
        check_density(self.density)
        if self.attn_density is not None:
            check_density(self.attn_density, "attn_density")
        _choice("allocation", self.allocation, ALLOCATIONS)
        if self.allocation in ("spectrum", "sensitivity") and not self.spec.low_rank:
            raise ValueError(f"allocation {self.allocation!r} chooses ranks: it needs a low-rank method "
                             f"({', '.join(LOW_RANK_METHODS)}), not {self.method!r}")
        _choice("pivot_method", self.pivot_method, PIVOT_METHODS)
        if not 0 <= self.mix <= 1:
            raise ValueError(f"mix {self.mix!r} is outside [0, 1]")
        check_positive_int(self.als_steps, "als_steps", minimum=0)
        check_positive_int(self.sensitivity_samples, "sensitivity_samples")
        check_positive_int(self.rank_multiple_of, "rank_multiple_of")
        for name in ("ridge", "damping", "owl_lambda", "owl_threshold"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be >= 0")
        for name in ("mix", "ridge", "damping", "owl_lambda", "owl_threshold"):
            check_finite_number(getattr(self, name), name)
        if not isinstance(self.permute, bool):
            raise ValueError(f"permute must be true or false, got {self.permute!r}")
        if self.permute and (self.nm is None or self.spec.low_rank):
            raise ValueError(f"permute reorders the groups of an N:M pattern: it needs a sparse method "
                             f"({', '.join(SPARSE_METHODS)}) and a pattern such as 2:4, not {self.method!r} "
                             f"with pattern {self.pattern!r}")
        if self.nm is not None and (self.attn_density is not None or self.allocation != "uniform"):
            option = "attn_density" if self.attn_density is not None else f"allocation {self.allocation!r}"
            raise ValueError(f"{option} cannot apply to the N:M pattern {self.pattern}: every group of "
                             f"{self.nm[1]} weights keeps exactly {self.nm[0]}")
        for name in ("targets", "ignore"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)) or not all(
                    isinstance(p, str) for p in patterns):
                raise ValueError(f"{name} must be a tuple of fnmatch patterns (strings), got {patterns!r}")
        if (self.latency_table is not None or self.speedup is not None) and self.layer_kind != "pivot":
            raise ValueError(f"latency_table and speedup plan PIFA layers: they need method 'mpifa', not "
                             f"{self.method!r}")
        if self.speedup is not None:
            if self.latency_table is None:
                raise ValueError("speedup needs a latency_table (the measured layer times it plans with)")
            check_finite_number(self.speedup, "speedup")
            if not self.speedup > 1:
                raise ValueError(f"speedup {self.speedup!r} must be > 1")
        if self.latency_table is not None and (not isinstance(self.latency_table, str) or not self.latency_table):
            raise ValueError(f"latency_table must be a file path, got {self.latency_table!r}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"unknown CompressionConfig version {self.version!r} (this pifa reads {CONFIG_VERSION})")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))

    @property
    def spec(self) -> Method:
        """What ``method`` does (its entry in :data:`METHODS`)."""
        return METHODS[self.method]

    @property
    def layer_kind(self) -> str:
        """What every target becomes: "pivot" for mpifa, "sparse" (zeros in place) for the sparse
        baselines, "lowrank" otherwise."""
        return self.spec.layer_kind

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, None when unstructured."""
        return parse_pattern(self.pattern)

    @property
    def uses_calibration(self) -> bool:
        return self.spec.whiten or not self.spec.low_rank

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown CompressionConfig fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        import difflib

        close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6) if isinstance(value, str) else []
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown {name} {value!r}; {hint}choose one of {', '.join(allowed)}")
