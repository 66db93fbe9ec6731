"""Honest timing: warm-up, interleaved rounds, medians. For benchmarks, never for tests."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    rounds: int = 7,
    min_seconds: float = 0.05,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median milliseconds per call of each function, timed side by side.

    Every function is warmed up, then each round times every function in turn (so a
    slow phase of a shared machine hits all of them alike); within a round a function
    is called often enough to run at least ``min_seconds``.
    """
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        inner[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3 / inner[name])
    return {name: statistics.median(values) for name, values in samples.items()}
