"""Measured-sensitivity rank allocation (``allocation="sensitivity"``).

For every targeted linear and a few candidate densities, the linear alone is replaced by its
whitened truncation (one eigen-decomposition per linear, every candidate rank a prefix of it)
and the model's next-token distributions on a small calibration subset are compared with the
dense model's: mean KL(dense || perturbed) per token. Between measured ranks the KL is
interpolated linearly; a multiple-choice knapsack (:func:`pifa.rank_search.knapsack_choice`)
over the measured and ``GRID`` evenly spaced ranks per linear, then a greedy fill of what its
rounding left, picks one rank per linear that minimises the summed KL within the parameter
budget (per pool: all linears, or attention and MLP when the split is fixed). The weights are
restored bit for bit after each measurement.

Cost: one forward pass of the blocks from the perturbed one onwards (plus the head) per linear
and candidate, on ``sensitivity_samples`` sequences of at most ``MEASURE_TOKENS`` tokens, the
head restricted to the ``MEASURE_VOCAB`` tokens the dense model finds most probable there (the
KL is that of the distributions conditioned on those tokens: SmolLM2's full 49,152-token head
costs as much as 8 of its 30 blocks, a third of an average measurement); the report records it (``allocation_cost``:
seconds and block forward passes).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed, solver
from .budget import layer_parameters, out_of_reach, rank_for_density, rank_kind
from .capture import BlockInputs
from .model import linear_weight, write_weight
from .rank_search import discretise_costs, knapsack_choice

CANDIDATE_DENSITIES = (0.2, 0.35, 0.5, 0.65, 0.8)  # plus each linear's uniform density, its half, and full rank
MEASURE_TOKENS = 256  # the KL is measured on the first tokens of each measurement sequence
MEASURE_VOCAB = 2048  # the KL is measured on the dense model's most probable tokens (see SensitivityProbe)
BINS = 20000  # budget resolution of the knapsack: costs round up, so choices never exceed the budget
GRID = 48  # knapsack candidates per linear besides the measured ranks (KL interpolated), then a greedy fill


@dataclass
class SensitivityCost:
    seconds: float
    forward_passes: int  # block forward passes (each over the subset), head passes counted as one each
    reused: int = 0  # measurements taken from a SensitivityCache instead of measured


class SensitivityCache:
    """Measured KLs kept across ``compress``/``plan`` calls, for a sweep over densities of one model.

    Pass the same instance to every call (``sensitivity_cache=``). A measurement is reused only
    when the dense model's logits on the measurement subset are bit-identical to those of the
    run that measured it and the calibration tokens are the same (they set the whitening), with
    the same measurement settings, linear, rank and truncation (layer kind, whitening, damping);
    measurements never depend on the target density, so a sweep measures only the ranks it has
    not seen.

    ``path``: a JSON file that keeps the measurements between processes (``pifa compress
    --sensitivity-cache``). It is read when the cache is made (a file that is not a pifa
    sensitivity cache is an error, never overwritten) and rewritten atomically after every
    linear it measured, so an interrupted run keeps what it measured. It holds the measurements of
    every model and calibration it has seen, each under its own key.
    """

    FORMAT = "pifa-sensitivity-cache"
    VERSION = 1

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.key: str | None = None
        self.kl: dict[tuple[str, str, bool, float, int], float] = {}
        self.store: dict[str, dict[tuple[str, str, bool, float, int], float]] = {}
        if self.path is None:
            return
        if self.path.is_dir():
            raise ValueError(f"sensitivity cache {str(path)!r} is a directory; give a file name")
        if not os.access(self.path.resolve().parent, os.W_OK):
            raise ValueError(f"sensitivity cache {str(path)!r}: its directory does not exist or is not writable")
        if self.path.exists():
            self.store = self._read(self.path)
        self._probe()

    def _tmp(self) -> Path:
        assert self.path is not None
        return self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")

    def _probe(self) -> None:
        """Create (and remove) the file :meth:`flush` writes through, before anything is measured: ``os.access``
        says yes to root in a read-only folder, and on a read-only or full file system."""
        tmp = self._tmp()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                os.write(fd, b"{}\n")
            finally:
                os.close(fd)
        except OSError as exc:
            raise ValueError(f"sensitivity cache {str(self.path)!r} is not writable ({exc.strerror or exc}): refused "
                             "before measuring anything") from None
        finally:
            with contextlib.suppress(OSError):
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink()

    def start(self, key: str) -> None:
        if key != self.key:
            self.key = key
            self.kl = self.store.setdefault(key, {})

    @classmethod
    def _read(cls, path: Path) -> dict[str, dict[tuple[str, str, bool, float, int], float]]:
        problem = f"{str(path)!r} is not a pifa sensitivity cache"
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{problem} ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT or not isinstance(data.get("keys"), dict):
            raise ValueError(problem)
        if data.get("version") != cls.VERSION:
            raise ValueError(f"{problem} of version {cls.VERSION} (it says {data.get('version')!r})")
        store = {}
        try:
            for key, rows in data["keys"].items():
                store[str(key)] = {(str(name), str(kind), bool(whiten), float(damping), int(rank)): float(kl)
                                   for name, kind, whiten, damping, rank, kl in rows}
        except (TypeError, ValueError):
            raise ValueError(f"{problem} (malformed entries)") from None
        if not all(math.isfinite(kl) and kl >= 0 for rows in store.values() for kl in rows.values()):
            raise ValueError(f"{problem} (a KL is negative or not finite)")
        return store

    def flush(self) -> None:
        """Write every measurement to ``path`` (atomically; rank 0 only under torch.distributed)."""
        if self.path is None or not distributed.is_main():
            return
        keys = {key: [[*entry, kl] for entry, kl in sorted(rows.items())] for key, rows in self.store.items() if rows}
        text = json.dumps({"format": self.FORMAT, "version": self.VERSION, "keys": keys}) + "\n"
        tmp = self._tmp()
        try:
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk, a folder turned read-only: keep the measurements elsewhere
            raise ValueError(f"could not write sensitivity cache {str(self.path)!r} ({exc.strerror or exc}); "
                             f"{self._fallback(text)}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _fallback(self, text: str) -> str:
        """Write the measurements to a new file in the temporary folder; say where (or that they could not be)."""
        try:
            fd, name = tempfile.mkstemp(prefix="pifa-sensitivity-cache-", suffix=".json")
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        except OSError as exc:
            return f"the measurements could not be saved elsewhere either ({exc.strerror or exc})"
        return (f"the measurements so far are saved in {name!r}: move it there (or pass it as sensitivity_cache) "
                "and rerun to reuse them")


def _kl(dense_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(dense || perturbed) from log-probabilities and logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return max(0.0, float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean()))  # >= 0 up to round-off


class OutputHead:
    """From the last block's output to the logits: the final norm (and output projection, when
    there is one), then the output embeddings; ``restrict`` keeps a subset of the vocabulary."""

    def __init__(self, steps: list[nn.Module], lm_head: nn.Module, scale: float = 1.0,
                 softcap: float | None = None) -> None:
        self.steps, self.lm_head, self.tokens = steps, lm_head, None
        self.scale, self.softcap = scale, softcap  # logits * scale, then cap * tanh(logits / cap)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            hidden = step(hidden)
        if self.tokens is None:
            logits = self.lm_head(hidden)
        else:
            bias = None if getattr(self.lm_head, "bias", None) is None else self.lm_head.bias[self.tokens]
            logits = nn.functional.linear(hidden, self.weight, bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def restrict(self, tokens: torch.Tensor | None) -> None:
        """Logits of ``tokens`` only (None: the whole vocabulary); needs a linear output head."""
        self.tokens = tokens
        if tokens is not None:
            self.weight = self.lm_head.weight[tokens]


def output_head(model: nn.Module, blocks_name: str) -> OutputHead:
    """The last block's output to the logits: the base model's final norm (and output projection,
    when it has one), then the output embeddings. Checked by the caller."""
    base = model.get_submodule(blocks_name.rsplit(".", 1)[0]) if "." in blocks_name else model
    steps = [getattr(base, name) for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "project_out")
             if isinstance(getattr(base, name, None), nn.Module)]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head is None:
        raise ValueError("allocation 'sensitivity' measures next-token distributions: it needs a causal LM "
                         "with an output head")
    config = getattr(model, "config", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)  # Granite
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 and 3
    return OutputHead(steps, lm_head, scale, float(softcap) if softcap else None)


class SensitivityProbe:
    """Measures, block by block, each linear's output KL at candidate ranks (see the module docs)."""

    def __init__(self, blocks: nn.ModuleList, subset: list[BlockInputs], head: OutputHead,
                 logits: list[torch.Tensor], device: torch.device, vocab: int | None = None,
                 cache: SensitivityCache | None = None, calibration: list[torch.Tensor] = ()) -> None:
        """``subset``: every block's inputs for the measurement batches; ``logits``: the dense model's on them.

        The output head dominates the cost of a measurement for small models with large
        vocabularies, so the KL is measured between the next-token distributions conditioned on
        the ``vocab`` (default ``MEASURE_VOCAB``) tokens of largest total dense probability over
        the measured positions (the whole vocabulary when it is not larger or the head is not a
        plain linear); ``coverage`` is the dense probability mass those tokens hold (mean over
        positions). ``cache``: earlier measurements on the same dense model (see SensitivityCache);
        ``calibration``: every calibration batch (their tokens set the whitening, so they are part
        of the cache key).
        """
        self.start = time.perf_counter()
        self.cache, self.reused = cache or SensitivityCache(), 0
        digest = hashlib.sha256(repr((MEASURE_TOKENS, MEASURE_VOCAB if vocab is None else vocab)).encode())
        for x in (*logits, *calibration):
            digest.update(repr((x.dtype, tuple(x.shape))).encode())
            x = x.detach().cpu()
            digest.update((x.float() if x.is_floating_point() else x.long()).contiguous().numpy().tobytes())
        self.cache.start(digest.hexdigest())
        self.blocks, self.subset, self.head, self.device = blocks, subset, head, device
        self.hidden = [[i.hidden for i in subset]]
        for index, block in enumerate(blocks):
            self.hidden.append([i.call(index, block, h, device).to("cpu", h.dtype)
                                for i, h in zip(subset, self.hidden[-1])])
        self.passes = len(blocks) + 1
        for mine, reference in zip(self.hidden[-1], logits):
            ours = head(mine.to(device)).float()
            scale = float(reference.float().abs().max()) or 1.0
            if not torch.allclose(ours, reference.float().to(ours.device), rtol=1e-3, atol=1e-3 * scale):
                raise ValueError("allocation 'sensitivity' cannot reproduce this model's logits from its last block "
                                 "(final norm + output head); use allocation 'spectrum'")
        self.coverage, vocab = 1.0, MEASURE_VOCAB if vocab is None else vocab
        if vocab < logits[0].shape[-1] and isinstance(getattr(head, "lm_head", None), nn.Linear):
            probs = torch.cat([torch.softmax(x.float(), -1).reshape(-1, x.shape[-1]) for x in logits])
            tokens = probs.sum(0).topk(vocab).indices.sort().values
            self.coverage = float(probs[:, tokens].sum(-1).mean())
            head.restrict(tokens.to(device))
            logits = [x[..., tokens.to(x.device)] for x in logits]
        self.dense_logp = [torch.log_softmax(x.float(), -1) for x in logits]
        self.options: dict[str, list[tuple[int, int, float]]] = {}  # name -> (rank, cost, kl)
        self.kind: str = "pifa"  # the rank cost model of the measured layers (set by measure_block)

    def _measure(self, first: int) -> float:
        states = self.hidden[first]
        for index in range(first, len(self.blocks)):
            states = [i.call(index, self.blocks[index], h, self.device) for i, h in zip(self.subset, states)]
        self.passes += len(self.blocks) - first + 1
        return sum(_kl(d.to(h.device), self.head(h)) for d, h in zip(self.dense_logp, states)) / len(states)

    def measure_block(self, index: int, linears: dict[str, nn.Module], grams: dict[str, torch.Tensor],
                      shapes: dict[str, tuple[int, int]], densities: dict[str, float], kind: str, whiten: bool,
                      damping: float, multiple_of: int) -> None:
        """Every candidate rank of block ``index``'s linears (``grams``: their dense input statistics)."""
        rkind = self.kind = rank_kind(kind)
        for name, module in linears.items():
            m, n = shapes[name]
            top = min(m, n) if rkind == "pifa" else min(m, n, (m * n) // (m + n))
            wanted = (*CANDIDATE_DENSITIES, densities[name], densities[name] / 2)
            ranks = sorted({min(top, max(1, rank_for_density(m, n, d, rkind, multiple_of))) for d in wanted} | {top})
            measured = {r: 0.0 if r == min(m, n) else self.cache.kl.get((name, rkind, whiten, damping, r))
                        for r in ranks}  # full rank (PIFA only): the dense layer's cost and, to round-off, its weight
            missing = [r for r, kl in measured.items() if kl is None]
            self.reused += len(ranks) - len(missing) - (top == min(m, n))
            if missing:
                weight = linear_weight(module)
                original = module.weight.detach().clone()
                chol = solver.whitening(grams[name], damping) if whiten else None
                up, down, _ = solver.truncate(weight, chol, top)
                try:
                    for rank in missing:
                        write_weight(module, (up[:, :rank] @ down[:rank]).to(weight.dtype))
                        measured[rank] = self.cache.kl[(name, rkind, whiten, damping, rank)] = self._measure(index)
                finally:
                    with torch.no_grad():
                        module.weight.copy_(original)
                self.cache.flush()  # what was measured survives an interruption
            rows = [(r, layer_parameters(m, n, r, rkind), measured[r]) for r in ranks]
            self.options[name] = rows

    def choose(self, shapes: dict[str, tuple[int, int]], densities: dict[str, float], pools: dict[str, str],
               multiple_of: int = 1, ceilings: dict[str, int] | None = None,
               ) -> tuple[dict[str, int], dict[str, float], SensitivityCost]:
        """One rank per linear minimising the summed KL within each pool's budget (see :func:`choose_ranks`)."""
        ranks, scores = choose_ranks(self.options, shapes, densities, pools, self.kind, multiple_of, ceilings)
        return ranks, scores, self.cost()

    def cost(self) -> SensitivityCost:
        """What the measurements cost so far."""
        return SensitivityCost(time.perf_counter() - self.start, self.passes, self.reused)


def _below(curve: tuple[np.ndarray, np.ndarray], ceiling: int, full: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of a rank curve at or below ``ceiling``, and full rank."""
    ranks, kl = curve
    keep = (ranks <= ceiling) | (ranks == full)
    return ranks[keep], kl[keep]


def _curve(rows: list[tuple[int, int, float]], multiple_of: int) -> tuple[np.ndarray, np.ndarray]:
    """Every allowed rank from the smallest measured one to the largest (multiples of ``multiple_of``
    and the measured ranks) and its KL: measured, or linearly interpolated in rank in between."""
    measured = np.array([r for r, _, _ in rows], dtype=np.int64)
    kl = np.array([k for _, _, k in rows], dtype=np.float64)
    low, high = int(measured[0]), int(measured[-1])
    step = np.arange(-(-low // multiple_of) * multiple_of, high + 1, multiple_of, dtype=np.int64)
    ranks = np.union1d(measured, step)
    return ranks, np.interp(ranks, measured, kl)


def choose_ranks(options: dict[str, list[tuple[int, int, float]]], shapes: dict[str, tuple[int, int]],
                 densities: dict[str, float], pools: dict[str, str], kind: str, multiple_of: int = 1,
                 ceilings: dict[str, int] | None = None) -> tuple[dict[str, int], dict[str, float]]:
    """Ranks minimising the summed KL within each pool's budget sum(density m n), and the KL of each.

    ``options[name]``: (rank, parameters, KL) measured at ascending ranks. Between measured ranks
    the KL is interpolated linearly in rank. An exact multiple-choice knapsack
    (:func:`pifa.rank_search.knapsack_choice`, costs rounded up to ``budget / BINS`` units, so
    never over the budget) picks among the measured ranks and ``GRID`` evenly spaced ones per
    linear; a greedy fill then spends what the rounding left, one rank step at a time, best KL
    drop per parameter first. With an integer budget below ``BINS`` parameters and at most
    ``GRID`` ranks per linear the knapsack is exact over every allowed rank. With ``ceilings`` (each linear's
    break-even rank, see :mod:`pifa.latency`) the allowed ranks are those up to it, and full rank (dense).
    """
    curves = {name: _curve(rows, multiple_of) for name, rows in options.items()}
    if ceilings is not None:
        curves = {name: _below(curve, ceilings[name], min(shapes[name])) for name, curve in curves.items()}
    chosen: dict[str, int] = {}
    for pool in sorted(set(pools[name] for name in options)):
        members = [name for name in options if pools[name] == pool]
        budget = sum(densities[name] * shapes[name][0] * shapes[name][1] for name in members)
        picks = []
        for name in members:
            ranks, _ = curves[name]
            grid = ranks[np.unique(np.linspace(0, len(ranks) - 1, GRID).round().astype(np.int64))]
            pick = np.union1d(grid, [r for r, _, _ in options[name]])
            picks.append(pick[np.isin(pick, ranks)])
        costs = [[layer_parameters(*shapes[name], int(r), kind) for r in pick] for name, pick in zip(members, picks)]
        units, bins = discretise_costs(costs, budget, min(BINS, max(1, math.floor(budget))))
        scores = [np.interp(pick, *curves[name]) for name, pick in zip(members, picks)]
        try:
            choice = knapsack_choice([list(zip(u, s.tolist())) for u, s in zip(units, scores)], bins)
        except ValueError:
            if ceilings is None:
                raise
            raise ValueError(out_of_reach(sum(len(pick) == 1 for pick in picks), len(members))) from None
        start = {name: int(pick[j]) for name, pick, j in zip(members, picks, choice)}
        chosen.update(_fill(start, {name: curves[name] for name in members}, shapes, kind, budget))
    return chosen, {name: float(np.interp(rank, *curves[name])) for name, rank in chosen.items()}


def _fill(ranks: dict[str, int], curves: dict[str, tuple[np.ndarray, np.ndarray]], shapes: dict[str, tuple[int, int]],
          kind: str, budget: float) -> dict[str, int]:
    """Raise ranks one allowed step at a time while they fit, largest KL drop per parameter first
    (steps that raise the KL are never taken); deterministic (ties: name order)."""
    index = {name: int(np.searchsorted(curves[name][0], rank)) for name, rank in ranks.items()}
    spent = sum(layer_parameters(*shapes[name], rank, kind) for name, rank in ranks.items())

    def entry(name: str) -> tuple[float, str, int] | None:
        ranks_, kl = curves[name]
        k = index[name]
        if k + 1 >= len(ranks_) or kl[k + 1] > kl[k]:
            return None
        step = layer_parameters(*shapes[name], int(ranks_[k + 1]), kind) - layer_parameters(
            *shapes[name], int(ranks_[k]), kind)
        return (-(kl[k] - kl[k + 1]) / max(step, 1), name, step)

    heap = [e for e in map(entry, sorted(ranks)) if e is not None]
    heapq.heapify(heap)
    while heap:
        _, name, step = heapq.heappop(heap)
        if spent + step > budget:
            continue  # spent only grows: this layer's next step never fits again
        spent, index[name] = spent + step, index[name] + 1
        following = entry(name)
        if following is not None:
            heapq.heappush(heap, following)
    return {name: int(curves[name][0][k]) for name, k in index.items()}
