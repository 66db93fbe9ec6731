"""Measured layer latency, for plans that never make a layer slower than the dense one it replaces.

A :class:`LatencyTable` holds, for each linear shape (out, in) of a model, the time of the dense layer and of
its factored forms (PIFA, low-rank) at a grid of ranks, at decode (one token) and at prefill (``PREFILL``
tokens), measured on one device, dtype and thread count (its ``key``), with cold weights as in a real model
(each form timed over rotating copies whose bytes exceed the last-level cache twice, so every call reads its
weights from memory, as each linear does when the rest of the model ran in between; a layer timed hot in
cache overstates what its extra kernel launches cost against the bytes it saves). From it come each shape's
**break-even rank** (the largest rank whose factored form decodes no slower than the dense layer) and the
predicted speed-up of a plan: of the targeted linears, and of the whole model's decode step once that step
is timed (:func:`time_decode_step`: what is not a targeted linear, the output head, attention, norms and the
framework's own work, costs the same before and after). Tables are cached in a JSON file
(:func:`load_or_measure`); a table measured elsewhere (another device, dtype, thread count or torch) is never
used silently.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .budget import rank_kind
from .layers import LowRankLinear, PivotLinear
from .model import kv_cache_name

logger = logging.getLogger(__name__)

FORMAT = "pifa-latency-table"
VERSION = 3  # 3: factors laid out by shape (pifa.layers.column_major); 2: cold weights; 1 timed each layer hot in cache
PREFILL = 128  # tokens of the prefill measurement
GRID = 12  # ranks measured per shape and kind, evenly spaced up to full rank
ROUNDS = 9  # interleaved timing rounds; the median is kept
ROUND_SECONDS = 4e-3  # each form's calls per round last about this long
DECODE_CONTEXT = 64  # tokens in the KV cache when a whole model's decode step is timed
DECODE_STEPS = 9  # decode steps timed (after one warm-up step); the median is kept
MAX_COPIES = 256  # rotating copies of one form at most (tiny shapes stay partly in cache)
DEFAULT_CACHE_BYTES = 32 * 2**20  # last-level cache assumed where the system does not say


def device_key(device: torch.device | str, dtype: torch.dtype) -> dict[str, str | int]:
    """What a latency table is valid for: where and how it was measured."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": f"{device.type}:{name}", "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "torch": torch.__version__.split("+")[0]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def cache_bytes(device: torch.device | str) -> int:
    """The last-level cache of ``device``: CUDA's L2, else the largest CPU cache sysfs lists."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size) or DEFAULT_CACHE_BYTES
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def _shape_key(m: int, n: int) -> str:
    return f"{m}x{n}"


@dataclass
class LatencyTable:
    """Seconds per call: ``dense[shape] = (decode, prefill)``, ``factored[kind][shape] = [(rank, decode,
    prefill), ...]`` at ascending ranks."""

    key: dict[str, str | int]
    dense: dict[str, tuple[float, float]] = field(default_factory=dict)
    factored: dict[str, dict[str, list[tuple[int, float, float]]]] = field(default_factory=dict)

    def covers(self, shapes: set[tuple[int, int]], kind: str) -> bool:
        rows = self.factored.get(rank_kind(kind), {})
        return all(_shape_key(m, n) in self.dense and _shape_key(m, n) in rows for m, n in shapes)

    def time(self, m: int, n: int, kind: str, rank: int | None, prefill: bool = False) -> float:
        """Seconds per call of an (m, n) linear: dense when ``rank`` is None, else its factored form at ``rank``
        (interpolated linearly between measured ranks)."""
        column = 1 if prefill else 0
        if rank is None:
            return self.dense[_shape_key(m, n)][column]
        rows = self.factored[rank_kind(kind)][_shape_key(m, n)]
        points, slowest = [], 0.0
        for row in rows:  # a running maximum: time never falls with the rank (timing noise can make it seem to)
            slowest = max(slowest, row[1 + column])
            points.append((row[0], slowest))
        if rank <= points[0][0]:
            return points[0][1]
        for (r0, t0), (r1, t1) in zip(points, points[1:]):
            if rank <= r1:
                return t0 + (t1 - t0) * (rank - r0) / (r1 - r0)
        return points[-1][1]

    def break_even(self, m: int, n: int, kind: str) -> int:
        """The largest rank whose factored (m, n) layer decodes no slower than the dense one (0: none)."""
        dense = self.time(m, n, kind, None)
        best = 0
        for rank in range(1, min(m, n) + 1):
            if self.time(m, n, kind, rank) <= dense:
                best = rank
            elif best and rank > best * 2:  # past the crossing (the time grows with the rank)
                break
        return best

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "key": self.key,
                "dense": self.dense, "factored": self.factored}

    @classmethod
    def from_dict(cls, data: object, source: str) -> LatencyTable:
        if isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") != VERSION:
            raise ValueError(f"{source} was measured by another pifa (latency table version {data.get('version')!r}, "
                             f"this pifa reads version {VERSION}: cold weights, factors laid out by shape); give "
                             "another file or delete it to measure again")
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError
            dense = {k: (float(v[0]), float(v[1])) for k, v in data["dense"].items()}
            factored = {kind: {k: [(int(r), float(d), float(p)) for r, d, p in rows] for k, rows in shapes.items()}
                        for kind, shapes in data["factored"].items()}
            if not isinstance(data["key"], dict):
                raise ValueError
            return cls(dict(data["key"]), dense, factored)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{source} is not a pifa latency table (format {FORMAT} version {VERSION})") from None


def _timed(copies: list[nn.Module], x: torch.Tensor, reps: int) -> float:
    """Seconds per call over ``reps`` calls, rotating through ``copies`` of one form."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    for i in range(reps):
        copies[i % len(copies)](x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) / reps


def _factored(kind: str, m: int, n: int, rank: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    up = torch.randn(m, rank, dtype=torch.float64) / rank ** 0.5
    down = torch.randn(rank, n, dtype=torch.float64) / n ** 0.5
    layer = PivotLinear.from_factors(up, down) if rank_kind(kind) == "pifa" else LowRankLinear.from_factors(up, down)
    return layer.to(device=device, dtype=dtype)


def measure_table(shapes: set[tuple[int, int]], kinds: tuple[str, ...], device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32, grid: int = GRID, rounds: int = ROUNDS,
            progress: bool = True, cold_bytes: int | None = None) -> LatencyTable:
    """Time every shape's dense layer and its factored forms at ``grid`` ranks up to full rank, at decode and
    prefill; each time is the median of ``rounds`` rounds, the forms of a shape interleaved within a round.
    Each form rotates through as many copies as the dense layer needs to fill ``cold_bytes`` (default twice
    the last-level cache; 0: one copy, hot), so its weights are read from memory as in a model's forward."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    table = LatencyTable(device_key(device, dtype))
    cold = 2 * cache_bytes(device) if cold_bytes is None else cold_bytes
    kinds = tuple(sorted({rank_kind(k) for k in kinds}))
    with torch.inference_mode():
        for m, n in tqdm(sorted(shapes), desc="pifa latency", unit="shape", disable=not progress):
            top = min(m, n)
            ranks = sorted({max(1, round(top * (i + 1) / grid)) for i in range(grid)})
            copies = min(MAX_COPIES, max(1, math.ceil(cold / (m * n * dtype.itemsize))))
            forms: dict[tuple[str, int | None], nn.Module] = {
                ("dense", None): nn.Linear(n, m, bias=False).to(device=device, dtype=dtype)}
            forms.update({(kind, r): _factored(kind, m, n, r, device, dtype) for kind in kinds for r in ranks})
            layers = {key: [form] + [copy.deepcopy(form) for _ in range(copies - 1)] for key, form in forms.items()}
            times: dict[tuple[str, int | None], list[list[float]]] = {k: [[], []] for k in layers}
            for column, tokens in enumerate((1, PREFILL)):
                x = torch.randn(tokens, n, device=device, dtype=dtype)
                reps = max(3, int(ROUND_SECONDS / max(_timed(layers[("dense", None)], x, 3), 1e-7)))
                reps = max(reps, min(copies, 4 * reps))  # each round reaches most copies
                for layer in layers.values():  # warm-up
                    _timed(layer, x, 2)
                for _ in range(rounds):
                    for key, layer in layers.items():
                        times[key][column].append(_timed(layer, x, reps))
            median = {key: (statistics.median(d), statistics.median(p)) for key, (d, p) in times.items()}
            table.dense[_shape_key(m, n)] = median[("dense", None)]
            for kind in kinds:
                table.factored.setdefault(kind, {})[_shape_key(m, n)] = [(r, *median[(kind, r)]) for r in ranks]
    return table


def load_or_measure(path: str | os.PathLike, shapes: set[tuple[int, int]], kind: str,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    progress: bool = True, measure: bool = True) -> LatencyTable:
    """The table cached at ``path`` when it was measured here (same device, dtype, thread count, torch) and
    covers ``shapes``; otherwise measured now and written there (atomically). A file that is not a latency
    table, or one measured elsewhere, is refused in one line rather than used or overwritten."""
    path = Path(path)
    key = device_key(device, dtype)
    old: LatencyTable | None = None
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ValueError(f"latency table {path} is not a regular file")
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ValueError(f"{path} is not a pifa latency table (unreadable JSON)") from None
        old = LatencyTable.from_dict(data, str(path))
        if old.key != key:
            differ = ", ".join(f"{k} {old.key.get(k)!r} here {v!r}" for k, v in key.items() if old.key.get(k) != v)
            raise ValueError(f"latency table {path} was measured elsewhere ({differ}); give another file to measure "
                             "this machine")
        if old.covers(shapes, kind):
            return old
    if not measure:
        raise ValueError(f"latency table {path} does not cover this model's linears; measure it first in one "
                         "process (a plan with this latency_table measures it)")
    _check_writable(path)
    missing = {(m, n) for m, n in shapes if old is None or not old.covers({(m, n)}, kind)}
    table = measure_table(missing, (kind,), device, dtype, progress=progress)
    if old is not None:
        table.dense = {**old.dense, **table.dense}
        for k, rows in old.factored.items():
            table.factored[k] = {**rows, **table.factored.get(k, {})}
    _write(path, table)
    return table


def _check_writable(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write the latency table {path}: {folder} is not a writable folder")


def _write(path: Path, table: LatencyTable) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=path.name,
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(table.to_dict(), handle, indent=1)
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise ValueError(f"cannot write the latency table {path}: {error.strerror or error}") from None


def predicted_speedup(table: LatencyTable, shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None],
                      kind: str, prefill: bool = False, rest: float = 0.0) -> float:
    """Dense time of the targeted linears over their planned time (``ranks[name]`` None: kept dense), each plus
    ``rest``: the seconds of everything else in the step (0: the speed-up of the linears alone)."""
    dense = sum(table.time(m, n, kind, None, prefill) for m, n in shapes.values())
    planned = sum(table.time(m, n, kind, ranks.get(name), prefill) for name, (m, n) in shapes.items())
    return (dense + rest) / (planned + rest)


def time_decode_step(model: nn.Module, device: torch.device | str, context: int = DECODE_CONTEXT,
                     steps: int = DECODE_STEPS) -> float | None:
    """Seconds of one decode step of a causal LM (batch 1, a KV cache of ``context`` tokens; the median of
    ``steps`` after a warm-up step), or None when the model cannot be timed so: it does not generate, or its
    weights are not all on ``device`` (streamed, offloaded, meta)."""
    device = torch.device(device)
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        return None
    if any(p.device.type != device.type or (device.index is not None and p.device != device)
           for p in model.parameters()):
        return None
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions:  # learned position embeddings end there
        context = max(1, min(context, positions - steps - 2))
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(context, device=device).remainder(vocab).unsqueeze(0)
    training = model.training
    model.eval()
    try:
        return _decode_step_median(model, ids, steps, device)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:  # a forward pifa cannot drive so
        logger.warning("could not time the decode step (%s: %s): speed-ups are those of the targeted linears",
                       type(error).__name__, error)
        return None
    finally:
        model.train(training)


def _decode_step_median(model: nn.Module, ids: torch.Tensor, steps: int, device: torch.device) -> float | None:
    """Median seconds of ``steps`` single-token forwards after ``ids`` (and one warm-up step); None without a
    KV cache."""
    times = []
    with torch.inference_mode():
        name = kv_cache_name(model)
        cache = getattr(model(input_ids=ids, use_cache=True), name, None)
        if cache is None:
            return None
        for _ in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            cache = getattr(model(input_ids=ids[:, -1:], use_cache=True, **{name: cache}), name)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
