"""Resumable runs: every finished block is saved; a rerun with the same inputs skips it.

Layout of a checkpoint directory::

    progress.json          config, calibration fingerprint, finished blocks and their reports
    block_0003.safetensors the compressed block's tensors
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from .config import CompressionConfig
from .format import check_entry, compressed_modules
from .io import write_safetensors
from .layers import LAYER_KINDS
from .model import set_module
from .report import ModuleReport
from .validate import first_line

PROGRESS = "progress.json"


def fingerprint(batches: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(str(tuple(batch.shape)).encode())
        digest.update(batch.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """The model's config and every tensor: name, shape, dtype and all its bytes (sha256)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config.to_json_string() if config is not None else type(model).__name__).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class CheckpointWriteError(ValueError):
    """A block could not be saved (full disk, ...): the run stops, and the checkpoint is kept for ``--resume``."""


class Checkpoint:
    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.directory, self.state = directory, state
        # the blocks finished when the run started: under torchrun, rank 0 saves blocks while the other
        # ranks still ask, and every rank must make the same choice (restore or compress) for each block
        self.finished = frozenset(state["blocks"])

    @classmethod
    def open(cls, directory: str | os.PathLike, config: CompressionConfig, batches: list[torch.Tensor],
             model: nn.Module, model_id: str | None = None) -> Checkpoint:
        """Open (or start) the checkpoint in ``directory``; refuse one written for other inputs.

        ``model_id``: the model's fingerprint when ``model`` does not hold its tensors (streamed runs).
        """
        directory = Path(directory)  # created by the first save_block: bad input leaves nothing behind
        expected = {"config": config.to_dict(), "calibration": fingerprint(batches),
                    "model": model_id or model_fingerprint(model)}
        progress = directory / PROGRESS
        if progress.exists():
            try:
                state = json.loads(progress.read_text())
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise ValueError(f"checkpoint {str(directory)!r} is unreadable ({PROGRESS}: {exc}); "
                                 "start afresh with another checkpoint_dir") from None
            if not isinstance(state, dict) or not isinstance(state.get("blocks"), dict):
                raise ValueError(f"checkpoint {str(directory)!r} is corrupt ({PROGRESS} has no 'blocks' table); "
                                 "start afresh with another checkpoint_dir")
            if {k: state.get(k) for k in expected} != expected:
                raise ValueError(f"checkpoint {str(directory)!r} was written for another model, config or "
                                 "calibration data")
            return cls(directory, state)
        return cls(directory, {**expected, "blocks": {}})

    def has_block(self, index: int) -> bool:
        return str(index) in self.finished and (self.directory / f"block_{index:04d}.safetensors").exists()

    def save_block(self, index: int, block: nn.Module, prefix: str, reports: list[ModuleReport]) -> None:
        """Save a finished block: its tensors, then ``progress.json`` listing it (each written under a temporary
        name and renamed). A failed write (a full disk) is a :class:`CheckpointWriteError`; the checkpoint keeps
        the blocks saved before, untouched, and no temporary file."""
        tmp = self.directory / f"block_{index:04d}.safetensors.tmp"
        specs = compressed_modules(block)
        mine = [asdict(r) for r in reports if r.name.startswith(prefix + ".")]
        state = {**self.state, "blocks": {**self.state["blocks"], str(index): {"modules": specs, "reports": mine}}}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_safetensors(block, tmp)
            os.replace(tmp, self.directory / f"block_{index:04d}.safetensors")
            _write_atomic(self.directory / PROGRESS, json.dumps(state, indent=1).encode())
        except (OSError, safetensors.SafetensorError) as exc:
            for leftover in (tmp, (self.directory / PROGRESS).with_name(PROGRESS + ".tmp")):
                leftover.unlink(missing_ok=True)
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
                first_line(exc, 200))
            saved = len(self.state["blocks"])
            raise CheckpointWriteError(
                f"could not write block {index} to checkpoint {str(self.directory)!r} ({detail}); the checkpoint "
                f"keeps the {saved} block{'s' if saved != 1 else ''} saved before it: free some space and rerun with "
                "the same checkpoint_dir to resume") from None
        self.state = state

    def restore_block(self, index: int, block: nn.Module, prefix: str) -> list[ModuleReport]:
        """Swap the saved compressed layers into ``block`` and load its tensors."""
        entry = self.state["blocks"][str(index)]
        file = self.directory / f"block_{index:04d}.safetensors"
        param = next(block.parameters())
        try:
            for local, spec in entry["modules"].items():
                check_entry(local, spec, f"checkpoint {PROGRESS}")
                layer = LAYER_KINDS[spec["kind"]](spec["in_features"], spec["out_features"], spec["rank"],
                                                 bias=spec["bias"], device=param.device, dtype=param.dtype)
                set_module(block, local, layer)
            safetensors.torch.load_model(block, str(file), strict=True, device=str(param.device))
            return [ModuleReport(**r) for r in entry["reports"]]
        except (KeyError, TypeError, AttributeError, RuntimeError, safetensors.SafetensorError) as exc:
            first = first_line(exc)
            raise ValueError(f"checkpoint {str(self.directory)!r} is corrupt (block {index}: {first}); "
                             "start afresh with another checkpoint_dir") from None
