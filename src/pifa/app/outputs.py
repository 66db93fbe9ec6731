"""What the commands write, made safe: outputs that never overlap their inputs, one run per output at a
time (an exclusive lock), and nothing left behind by a failed run (parent folders it created, its lock).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from types import TracebackType

from ..data import STDLIB_SOURCE
from ..io import check_writable_folder, missing_parents, remove_created, writing_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not serialised
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".pifa-lock"
CHECKPOINT_SUFFIX = ".pifa-checkpoint"


def companion(out: str | os.PathLike, suffix: str) -> Path:
    """The file or folder that sits beside ``out`` (its checkpoint, its lock)."""
    out = Path(out)
    return out.with_name(out.name + suffix)


def input_paths(model: str, calib: str | None = None) -> dict[str, Path]:
    """The local paths a run reads, by what they are: the model (folder or GGUF file) and the calibration text."""
    inputs = {}
    if Path(model).exists():
        inputs["the model"] = Path(model)
    if calib is not None:
        if Path(calib).exists():
            inputs["the calibration text"] = Path(calib)
        elif calib == STDLIB_SOURCE:
            inputs["the calibration text (the standard library)"] = Path(sysconfig.get_paths()["stdlib"])
    return inputs


def check_no_overlap(output: str | os.PathLike, inputs: dict[str, Path], what: str = "output") -> None:
    """One-line ``ValueError`` when ``output`` is, contains or lies inside one of ``inputs``.

    Writing (or replacing with ``--overwrite``) such an output would destroy the input.
    """
    out = Path(output).resolve()
    for name, path in inputs.items():
        source = path.resolve()
        if out == source:
            relation = "is"
        elif source in out.parents:
            relation = "lies inside"
        elif out in source.parents:
            relation = "contains"
        else:
            continue
        raise ValueError(f"{what} {str(output)!r} {relation} {name} ({str(path)!r}); "
                         "pifa never writes over or into its inputs: choose another path")


def check_json_target(path: str | os.PathLike | None, inputs: dict[str, Path]) -> None:
    """``--json PATH`` can be written (checked before any work, so results are never lost); creates nothing."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--json {str(path)!r} is a folder; give a file name")
    check_writable_folder(target, "--json")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise ValueError(f"--json {str(path)!r} is not writable")
        check_no_overlap(target, inputs, "--json")  # it would replace an input file


def write_json_file(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (creating its folder); a failure is a one-line ``ValueError``."""
    target = Path(path)
    created = missing_parents(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except OSError as exc:
        remove_created(created)
        raise writing_error(target, exc) from None


class OutputLock:
    """An exclusive advisory lock (``flock``) on an output and its checkpoint, held for one whole run.

    The lock file ``OUT.pifa-lock`` beside the output holds the holder's pid. A second run on the same
    output fails at once, naming that pid. On exit (also on errors) the lock file is removed and, after a
    failure, so are the parent folders this run created (when empty). The kernel drops the lock of a
    killed process; its stale lock file is simply taken over by the next run.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        absolute = Path(out).absolute()  # one lock however OUT is spelled (./out, out, a/../out)
        self.path = companion(absolute.parent.resolve() / absolute.name, LOCK_SUFFIX)
        self.created: list[Path] = []
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        check_writable_folder(self.out)
        self.created = missing_parents(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = self._acquire()
        except OSError as exc:
            remove_created(self.created)
            raise writing_error(self.path, exc) from None
        except BaseException:
            remove_created(self.created)
            raise
        return self

    def _acquire(self) -> int | None:
        if fcntl is None:  # pragma: no cover
            return None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(f"output {str(self.out)!r} is in use by another pifa run (pid {holder}, lock file "
                                 f"{str(self.path)!r}); wait for it to finish") from None
            try:  # the holder removes the file before unlocking: a lock on a removed file is no lock
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if exc_type is not None:
            remove_created(self.created)
