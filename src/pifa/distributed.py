"""Data-parallel calibration on torch.distributed (``torchrun --nproc-per-node N -m pifa compress ...``).

Each rank takes every N-th calibration batch; the float64 statistics (G, H, the allocation
passes' Grams and norms) are summed over ranks with ``all_reduce`` at each group; every rank
solves the same system, and rank 0's solution is broadcast so that all ranks swap bit-identical
layers; rank 0 alone writes the output and the checkpoint. Without an initialised process group
(the default, a single process) every function here is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .validate import first_line

T = TypeVar("T")
TIMEOUT_ENV = "PIFA_DIST_TIMEOUT"  # seconds a collective waits for the other ranks (default 1800)


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_environment(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA devices); no-op when alone.

    Collectives give up after ``PIFA_DIST_TIMEOUT`` seconds (default 1800), so that a rank that died
    mid-run makes the others fail with an error instead of waiting for ever.
    """
    if not launched() or dist.is_initialized():
        return
    timeout = dist_timeout()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as exc:  # DistStoreError (a rank that never came), no MASTER_ADDR, ...
        raise ValueError(join_error(exc, timeout)) from None


MAX_TIMEOUT = 7 * 86400.0


def dist_timeout() -> float:
    """``PIFA_DIST_TIMEOUT`` in seconds (default 1800): a finite number in (0, one week]; else a one-line
    ``ValueError`` (``timedelta`` overflows on ``inf``, and a negative timeout would make every wait fail at once)."""
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        timeout = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not 0 < timeout <= MAX_TIMEOUT:  # false for nan too
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds above 0 and at most {MAX_TIMEOUT:g} "
                         "(one week)")
    return timeout


def join_error(exc: BaseException, timeout: float) -> str:
    """The one line for a process that could not join the process group its environment describes."""
    first = first_line(exc, 200)
    where = ", ".join(f"{key}={os.environ[key]}" for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
                      if key in os.environ)
    waited = f" within {timeout:g} s" if "time" in first.lower() else ""
    return (f"could not join the torch.distributed process group ({where}){waited}: "
            f"{type(exc).__name__}: {first} (start every rank with torchrun --nproc-per-node N -m pifa ...; "
            f"{TIMEOUT_ENV} sets the wait)")


def local_device(device: torch.device) -> torch.device:
    """Under torchrun with CUDA, each rank uses the GPU of its ``LOCAL_RANK``."""
    if launched() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's calibration batches: every ``world_size``-th, starting at its rank."""
    world = world_size()
    if len(batches) < world:
        raise ValueError(f"world size {world} is larger than the {len(batches)} calibration batches: every rank "
                         "needs at least one (a larger num_samples, or a smaller batch_size)")
    return list(batches[rank()::world])


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks (in place where possible); the tensor itself when alone."""
    if not active():
        return tensor
    comm = tensor.to(_comm_device())
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    if comm is not tensor:
        tensor.copy_(comm)
    return tensor


def broadcast_module(module: nn.Module) -> None:
    """Every parameter and buffer of ``module`` overwritten with rank 0's."""
    if not active():
        return
    for tensor in module.state_dict().values():
        comm = tensor.detach().to(_comm_device()).contiguous()  # collectives need contiguous tensors
        dist.broadcast(comm, src=0)
        if comm.data_ptr() != tensor.data_ptr():
            tensor.detach().copy_(comm)


def check_same_everywhere(value: Any, what: str) -> None:
    """One-line ``ValueError`` on every rank unless ``value`` (JSON-serialisable) is the same on all ranks."""
    if not active():
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise ValueError(f"rank {differing[0]} was started with other {what} than rank 0: every rank must get the "
                         "same command line")


def barrier() -> None:
    if active():
        dist.barrier()


def shut_down() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
