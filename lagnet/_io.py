"""Atomic file writes: the one helper every writer in lagnet goes through.

A write goes to ``.NAME.XXXXXXXX.tmp`` beside ``NAME`` and is renamed over it once complete.
An exception, Ctrl-C or SIGTERM (under :func:`terminate_on_sigterm`) removes the temporary file;
only SIGKILL or a power cut can leave one, and :func:`remove_stale_temporaries` clears those.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO

__all__ = [
    "TEST_KILL_ENV",
    "Terminated",
    "atomic_write",
    "is_temporary",
    "remove_stale_temporaries",
    "terminate_on_sigterm",
]

TEST_KILL_ENV = "LAGNET_TEST_KILL_AT"
"""Test-only hook: ``NAME:PHASE:SIGNAL`` (PHASE ``before``/``during``/``after``, SIGNAL ``TERM``
or ``KILL``) makes the process signal itself at that point of writing ``NAME``, so the kill
tests stop a run at an exact moment. Never set it outside tests."""

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")
"""The temporary names ``atomic_write`` makes (``tempfile.mkstemp``: 8 random characters)."""


class Terminated(BaseException):
    """The process received SIGTERM (raised by :func:`terminate_on_sigterm`'s handler).

    A ``BaseException`` like ``KeyboardInterrupt``, so cleanup code runs and ordinary
    ``except Exception`` handlers do not swallow it.
    """

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only).

    Outside the main thread (where handlers cannot be set) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _test_hook(name: str, phase: str) -> None:
    """The test-only kill point (see :data:`TEST_KILL_ENV`); a no-op unless it is set."""
    spec = os.environ.get(TEST_KILL_ENV)
    if not spec or spec.rsplit(":", 1)[0] != f"{name}:{phase}":
        return
    sig = signal.SIGKILL if spec.endswith(":KILL") else signal.SIGTERM
    os.kill(os.getpid(), sig)  # SIGTERM's Python handler runs as this call returns


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[IO[bytes]], object],
    *,
    durable: bool = True,
) -> Path:
    """Write ``path`` through ``write(file)`` atomically.

    ``write`` receives a binary file open on a temporary file ``.NAME.XXXXXXXX.tmp`` in the same
    folder; once it returns, the file is flushed (and, with ``durable``, fsynced), then renamed
    over ``path``. An exception, Ctrl-C or SIGTERM (see :func:`terminate_on_sigterm`) mid-write
    leaves any previous ``path`` intact and no temporary file; after a SIGKILL the previous
    ``path`` is intact and :func:`remove_stale_temporaries` removes the temporary file.

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"folder does not exist: {str(target.parent)!r}")
    _test_hook(target.name, "before")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 & ~umask)
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            _test_hook(target.name, "during")
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(target.parent)
    _test_hook(target.name, "after")
    return target


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Remove the temporary files ``atomic_write`` left in ``folder`` (a killed writer's).

    Only names of its own pattern (``.NAME.XXXXXXXX.tmp``) are touched. Call it only while no
    other process writes into ``folder`` (e.g. holding the run folder's lock).

    Returns:
        ``(name, size in bytes)`` of each file removed.
    """
    removed: list[tuple[str, int]] = []
    base = Path(folder)
    if not base.is_dir():
        return removed
    for entry in sorted(base.iterdir()):
        if _TEMPORARY.fullmatch(entry.name) and entry.is_file():
            size = entry.stat().st_size
            entry.unlink(missing_ok=True)
            removed.append((entry.name, size))
    return removed


def is_temporary(name: str) -> bool:
    """True for a name of ``atomic_write``'s temporary files."""
    return _TEMPORARY.fullmatch(name) is not None


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
