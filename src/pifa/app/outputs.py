"""What the commands write, made safe: outputs that never overlap their inputs, one run per output at a
time (an exclusive lock), and nothing left behind by a failed run (parent folders it created, its lock).
"""

from __future__ import annotations

import os
import re
import stat
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
LOCK_MAX_BYTES = 24
LOCK_CONTENT = re.compile(rb"[0-9]{1,20}\n?|")  # what pifa writes there: its pid, or nothing yet


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
    killed process; its stale lock file is simply taken over by the next run. Anything else at the lock path
    (a symbolic link, a hard link, a folder, a file holding other data than a pid) is refused in one line,
    untouched, and so is the file a link points to: the lock is opened with ``O_NOFOLLOW``.
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
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(f"output {str(self.out)!r} is in use by another pifa run (pid {holder}, lock file "
                                 f"{str(self.path)!r}); wait for it to finish") from None
            try:  # the holder removes the file before unlocking: a lock on a removed file is no lock
                current = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                try:
                    self._check_ours(fd)
                except BaseException:
                    os.close(fd)
                    raise
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def _open(self) -> int:
        """The lock file, created new or (a killed run's) reopened, never through a link nor any other kind of file.

        ``O_NOFOLLOW``: a symbolic link at the lock path is refused, its target never opened; what is opened
        must be the regular file (one link to it) that ``lstat`` saw, so no other file is ever truncated.
        """
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        while True:
            try:
                return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            try:
                seen = os.lstat(self.path)
            except FileNotFoundError:  # removed in between by the run that held it: create it again
                continue
            self._check_kind(seen)
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if os.path.islink(self.path):  # ELOOP: it became a link since lstat
                    self._check_kind(os.lstat(self.path))
                raise writing_error(self.path, exc) from None
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino):  # replaced since lstat: look again
                os.close(fd)
                continue
            return fd

    def _refuse(self, what: str) -> ValueError:
        return ValueError(f"lock file {str(self.path)!r} {what}, not a lock file of pifa; pifa writes neither into "
                          "it nor through it: move it away")

    def _check_kind(self, status: os.stat_result) -> None:
        if stat.S_ISLNK(status.st_mode):
            raise self._refuse(f"is a symbolic link (to {os.readlink(self.path)!r})")
        if not stat.S_ISREG(status.st_mode):
            raise self._refuse("is not a regular file")
        if status.st_nlink != 1:
            raise self._refuse(f"is one of {status.st_nlink} hard links to the same file")

    def _check_ours(self, fd: int) -> None:
        """A file left by pifa holds nothing or one pid (a killed run's); anything else is someone's data."""
        self._check_kind(os.fstat(fd))
        content = os.pread(fd, LOCK_MAX_BYTES + 1, 0)
        if not LOCK_CONTENT.fullmatch(content):
            raise self._refuse("holds other data than a pid")

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
