"""Run folders that never lose work: checked arguments, recorded configuration, safe resumes.

A run folder holds ``config.json`` (the settings of the run), ``last.pth`` (written after every
epoch), ``best.pth`` (only ever replaced by a strictly better model), ``log.json``,
``summary.json`` and ``curves.png``. :meth:`RunFolder.open` decides what a start may do
*without writing anything*: a new run into a missing or empty folder, a resume whose recorded
configuration matches, or a refusal that names the problem. Only :meth:`RunFolder.create`
writes, once every argument is known to be good, so a failed start leaves no folder behind.

Every epoch writes ``last.pth`` (the full resumable state) before ``best.pth`` (the deployable
model: weights, model configuration and metrics), so a process killed at any moment leaves a
folder that ``--resume`` continues; a resume also completes a ``best.pth`` or ``log.json`` that
the kill cut short. A training holds the folder's lock (``.lock``: pid, host, start time) while
it runs, so a second one is refused, and a lock left by a dead process is named and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lagnet._io import atomic_write, is_temporary, remove_stale_temporaries
from lagnet._validation import show_some
from lagnet.checkpoint import load_checkpoint, save_checkpoint, save_json

__all__ = [
    "BEST_KEYS",
    "CONFIG_NAME",
    "LOCK_NAME",
    "METRIC_NAMES",
    "RunFolder",
    "RunFolderError",
    "check_output_folder",
    "deployable_checkpoint",
    "entry_metrics",
    "read_recorded_config",
    "resolve_device",
]

CONFIG_NAME = "config.json"
"""The file of a run folder that records its configuration."""

LAST_NAME = "last.pth"
BEST_NAME = "best.pth"
LOG_NAME = "log.json"
LOCK_NAME = ".lock"
"""The lock file of a run folder: the holder's pid, host and start time while a run writes."""
BEST_KEYS: tuple[str, ...] = ("model", "model_config", "config", "lagnet_version")
"""What ``best.pth`` keeps of a run checkpoint, besides its ``metrics`` and ``epoch``."""
METRIC_NAMES: tuple[str, ...] = ("mAP", "rank1", "rank5", "mINP")
"""The scores of a log entry that ``best.pth`` records as its ``metrics``."""
PREVIOUS_PREFIX = "previous-"
"""Old files moved aside by ``--overwrite`` go to ``previous-YYYYmmdd-HHMMSS/`` in the folder."""

_MAX_SHOWN = 5


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (existing run, missing checkpoint, changed config)."""


def resolve_device(spec: object, flag: str = "--device") -> torch.device:
    """Parse a device string and check that this machine has it.

    Raises:
        ValueError: not a device name, or a CUDA/MPS device this machine does not have.
    """
    if not isinstance(spec, (str, torch.device)):
        raise TypeError(f"{flag} must be a string such as 'cpu' or 'cuda:0', got {spec!r}")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {spec!r} is not a device; use cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{flag} {spec}: CUDA is not available on this machine (no GPU or no CUDA "
                "driver visible to torch); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {spec}: this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {spec}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"{flag} {spec}: unsupported device type {device.type!r}")
    return device


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_folder(path: str | os.PathLike[str], flag: str = "--output") -> Path:
    """Check that ``path`` is (or can become) a writable folder, leaving nothing behind.

    The nearest existing folder on the way to ``path`` gets a temporary sub-folder, removed at
    once, so read-only file systems and missing permissions are found before any work.

    Raises:
        ValueError: ``path`` is empty, ``path`` or one of its parents is a file, or the folder
            is not writable.
    """
    if not os.fspath(path).strip():
        raise ValueError(f"{flag} is empty (an unset shell variable?); give the run folder's path")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {str(target)!r} exists and is not a folder")
    probe = _nearest_existing(target.absolute())
    if not probe.is_dir():
        raise ValueError(f"{flag} {str(target)!r}: {str(probe)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lagnet-write-check-", dir=probe))
    except OSError as err:
        raise ValueError(
            f"{flag} {str(target)!r} is not writable: cannot create files in {str(probe)!r} "
            f"({err.strerror or err})"
        ) from None
    return target


def _show(items: Iterable[str]) -> str:
    return show_some(items, _MAX_SHOWN)


def _run_entries(path: Path) -> list[str]:
    """Names in ``path`` that belong to a run: not the folders moved aside by --overwrite, the
    lock file, or the temporary files of an interrupted write."""
    if not path.is_dir():
        return []
    return sorted(
        p.name
        for p in path.iterdir()
        if not p.name.startswith(PREVIOUS_PREFIX)
        and p.name != LOCK_NAME
        and not is_temporary(p.name)
    )


def _peek(path: Path) -> Any:
    """A checkpoint memory-mapped (tensors are not read), for its small entries; None if bad."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a foreign or corrupt file: the caller describes it without its state
        return None


def _value(value: Any) -> str:
    return json.dumps(value)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"


def deployable_checkpoint(
    checkpoint: Mapping[str, Any], *, metrics: Mapping[str, float], epoch: int
) -> dict[str, Any]:
    """The ``best.pth`` of a run checkpoint: the model and what rebuilds and describes it.

    ``{"model": state_dict, "model_config": {...}, "metrics": {...}, "epoch": int, "config":
    {...}, "lagnet_version": str}``; no optimizer, scheduler or random state (about a quarter
    of ``last.pth``). :func:`lagnet.build_lagnet` (``weights=``) and ``lagnet evaluate /
    export / embed --weights`` load it, as they load ``last.pth`` and older full ``best.pth``.
    """
    kept = {k: checkpoint[k] for k in BEST_KEYS if k in checkpoint}
    return {**kept, "metrics": dict(metrics), "epoch": int(epoch)}


def read_recorded_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The settings the run in folder ``path`` recorded: its ``config.json``, else the
    configuration in its ``last.pth``; ``None`` when there is neither (or it is unreadable)."""
    folder = Path(path)
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        if isinstance(config, dict):
            return config
    last = folder / LAST_NAME
    ckpt = _peek(last) if last.is_file() else None
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    return dict(config) if isinstance(config, dict) else None


def entry_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """The scores (:data:`METRIC_NAMES`) of a log entry."""
    return {k: float(entry[k]) for k in METRIC_NAMES if k in entry}


def _best_record(obj: Any, metric_key: str) -> tuple[float, int] | None:
    """``(score, epoch)`` of a ``best.pth``: the deployable form, or an older full checkpoint."""
    if not isinstance(obj, dict):
        return None
    try:
        if "metrics" in obj and "epoch" in obj:
            return float(obj["metrics"][metric_key.removeprefix("best_")]), int(obj["epoch"])
        return float(obj["state"][metric_key]), int(obj["state"]["epoch"])
    except (KeyError, TypeError, ValueError):
        return None


def _holder(text: str) -> dict[str, Any] | None:
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) and "pid" in info else None


def _describe_holder(info: Mapping[str, Any]) -> str:
    started = info.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(started)))
        if isinstance(started, (int, float))
        else "at an unknown time"
    )
    return f"pid {info.get('pid')} on host {info.get('host')!s}, started {when}"


def _process_gone(info: Mapping[str, Any]) -> bool:
    """True when ``info`` names a process of this host that no longer runs."""
    if info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return False


class _Lock:
    """The exclusive lock of a run folder (``.lock``), held until :meth:`release`.

    POSIX: ``fcntl.flock`` on the file, so the kernel releases it when the holder dies however
    it dies; the file keeps the holder's pid, host and start time, emptied on release, so a
    lock left filled was left by a process that died (a stale lock, named and taken over).
    Elsewhere: the file is created exclusively (``O_EXCL``) and removed on release; a stale one
    is taken over only when it names a process of this host that no longer runs.
    """

    def __init__(self, folder: Path, flag: str) -> None:
        self.path = folder / LOCK_NAME
        self.flag = flag
        self.fd: int | None = None
        self.notes: list[str] = []
        self.created = False

    def _me(self) -> bytes:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        return (json.dumps(info) + "\n").encode()

    def _refuse(self, info: Mapping[str, Any] | None) -> RunFolderError:
        who = _describe_holder(info) if info else "another process"
        return RunFolderError(
            f"{self.flag} {str(self.path.parent)!r} is in use by another training ({who}; lock "
            f"file {LOCK_NAME}); wait for it to end, or choose another {self.flag}"
        )

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            self._acquire_exclusive()
            return
        self.created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise self._refuse(_holder(self.path.read_text(errors="replace"))) from None
        previous = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous is not None:
            self.notes.append(
                f"taking over the stale lock of {_describe_holder(previous)}: that process "
                "ended without releasing it (killed?)"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._me(), 0)
        self.fd = fd

    def _acquire_exclusive(self) -> None:  # pragma: no cover - not POSIX
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _holder(self.path.read_text(errors="replace"))
                if info is None or not _process_gone(info):
                    raise self._refuse(info) from None
                self.notes.append(
                    f"taking over the stale lock of {_describe_holder(info)}: that process no "
                    "longer runs"
                )
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, self._me())
            self.fd = fd
            return
        raise self._refuse(None)

    def release(self, *, undo: bool = False) -> None:
        """Release the lock; ``undo`` also removes a lock file this lock created."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            os.close(fd)
            self.path.unlink(missing_ok=True)
            return
        if undo and self.created:
            self.path.unlink(missing_ok=True)
        os.ftruncate(fd, 0)  # an empty lock file: released cleanly
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass
class RunFolder:
    """What a training start may do with its output folder; see :meth:`open`.

    Attributes:
        path: the run folder.
        config: the configuration of this start (a JSON-able mapping).
        checkpoint: the contents of ``last.pth`` when resuming, else ``None``.
        start_epoch: epochs already done (0 for a new run).
        finished: resuming a run that already has ``config["epochs"]`` epochs: nothing to do.
        notes: what the start does differently from a plain new run, one line each.
        best_metric: the score ``best.pth`` holds (``-inf`` when there is none).
    """

    path: Path
    config: dict[str, Any]
    checkpoint: dict[str, Any] | None = None
    start_epoch: int = 0
    finished: bool = False
    overwrite: bool = False
    notes: list[str] = field(default_factory=list)
    best_metric: float = float("-inf")
    metric_key: str = "best_mAP"
    flag: str = "--output"
    _replace_config: bool = False
    _created: bool = False
    _lock: _Lock | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        config: Mapping[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
        fixed_keys: Iterable[str] = (),
        epochs_key: str = "epochs",
        metric_key: str = "best_mAP",
        milestones_key: str = "milestones",
        flag: str = "--output",
    ) -> RunFolder:
        """Check what a start with ``config`` may do in ``path``; writes nothing.

        A folder that holds only ``config.json`` (a start that stopped before its first epoch
        ended) holds no trained state: a start, with or without ``resume``, begins afresh.

        Args:
            path: the run folder.
            config: this start's settings; ``config[epochs_key]`` is the number of epochs.
            resume: continue the run recorded in ``path/last.pth``.
            overwrite: move an existing run's files aside (into ``previous-<time>/``).
            fixed_keys: settings a resume may not change (the differing ones are listed).
            epochs_key: the key of the epoch count (a resume may raise or lower it).
            metric_key: the key of ``checkpoint["state"]`` holding the best score so far.
            milestones_key: the key of the epochs where the learning rate steps down (a
                shortened run that no longer reaches one says so).

        Raises:
            RunFolderError: a run exists and neither ``resume`` nor ``overwrite`` is given;
                ``resume`` without ``last.pth``; a resume with another fixed setting;
                ``resume`` together with ``overwrite``.
            ValueError: ``path`` is not a writable folder.
        """
        target = check_output_folder(path, flag)
        run = cls(target, dict(config), overwrite=overwrite, metric_key=metric_key, flag=flag)
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite exclude each other: choose one")
        entries = _run_entries(target)
        last = target / LAST_NAME
        if entries == [CONFIG_NAME]:
            run._replace_config = True
            run.notes.append(
                f"{str(target)!r} holds only {CONFIG_NAME} (a start that stopped before its "
                "first epoch ended, no trained state): starting the run afresh"
            )
        elif resume:
            if not target.exists():
                raise RunFolderError(
                    f"--resume: the run folder {str(target)!r} does not exist "
                    f"(mistyped {flag}?); nothing to resume"
                )
            if not last.is_file():
                held = f"it holds {_show(entries)}" if entries else "it is empty"
                raise RunFolderError(
                    f"--resume: no checkpoint {str(last)!r} to resume from ({held}); "
                    "start a new run without --resume"
                )
            run._resume_from(last, fixed_keys, epochs_key, milestones_key)
        elif entries:
            if not overwrite:
                raise RunFolderError(
                    f"{flag} {str(target)!r} already holds {run._describe(entries, epochs_key)}; "
                    f"pass --resume to continue it, --overwrite to move its files aside into "
                    f"{PREVIOUS_PREFIX}<time>/, or choose another {flag}"
                )
            run.notes.append(
                f"moving the earlier files of {str(target)!r} ({_show(entries)}) aside "
                f"into {PREVIOUS_PREFIX}<time>/"
            )
        return run

    def _describe(self, entries: list[str], epochs_key: str) -> str:
        last = self.path / LAST_NAME
        if not last.is_file():
            return f"files ({_show(entries)})"
        try:
            ckpt = _peek(last)
            done = int(ckpt["state"]["epoch"])
            total = int(ckpt["config"][epochs_key])
        except (KeyError, TypeError):
            return f"a run ({_show(entries)})"
        status = "finished" if done >= total else "unfinished"
        return f"a run ({status}: {done} of {total} epochs done)"

    def _resume_from(
        self, last: Path, fixed_keys: Iterable[str], epochs_key: str, milestones_key: str
    ) -> None:
        ckpt = load_checkpoint(last, what="run checkpoint")
        recorded = ckpt.get("config") if isinstance(ckpt, dict) else None
        state = ckpt.get("state") if isinstance(ckpt, dict) else None
        if not isinstance(recorded, dict) or not isinstance(state, dict):
            raise RunFolderError(
                f"--resume: {str(last)!r} has no recorded configuration (not written by "
                "lagnet train); start a new run in another folder"
            )
        fixed = list(fixed_keys)
        differ = [k for k in fixed if recorded.get(k) != self.config.get(k)]
        if differ:
            listed = "; ".join(
                f"{k}: recorded {_value(recorded.get(k))}, now {_value(self.config.get(k))}"
                for k in differ
            )
            raise RunFolderError(
                f"--resume: the run in {str(self.path)!r} was started with other settings "
                f"({listed}); resume with the recorded settings, or start a new run"
            )
        done = int(state.get("epoch", 0))
        wanted = int(self.config[epochs_key])
        self.checkpoint = ckpt
        self.start_epoch = done
        self.best_metric = self._best_so_far(state)
        if wanted <= done:
            self.finished = True
            self.notes.append(
                f"the run in {str(self.path)!r} is finished: {done} of {wanted} epochs done, "
                f"nothing to do (pass --epochs above {done} to train further)"
            )
            return
        before = recorded.get(epochs_key)
        if isinstance(before, int) and wanted != before:
            change = "extending" if wanted > before else "shortening"
            self.notes.append(f"{change} the run from {before} to {wanted} epochs ({done} done)")
            steps = recorded.get(milestones_key) or []
            lost = [m for m in steps if isinstance(m, int) and wanted <= m < before]
            self.notes.extend(
                f"warning: the learning-rate step at milestone {m} (x0.1 from epoch {m + 1} on) "
                f"is no longer reached in {wanted} epochs"
                for m in lost
            )
        for key in sorted(set(self.config) - set(fixed)):
            if key in recorded and key != epochs_key and recorded[key] != self.config[key]:
                self.notes.append(
                    f"{key} changed: {_value(recorded[key])} -> {_value(self.config[key])}"
                )
        self.notes.insert(0, f"resuming {str(last)!r} after epoch {done}")

    def _best_so_far(self, state: Mapping[str, Any]) -> float:
        best = float(state.get(self.metric_key, float("-inf")))
        best_file = self.path / BEST_NAME
        if best_file.is_file():  # best.pth may be newer than last.pth (older lagnet wrote it first)
            record = _best_record(_peek(best_file), self.metric_key)
            if record is not None:  # a file that is not a run checkpoint leaves the score as is
                best = max(best, record[0])
        return best

    def create(self, *, write_config: bool = True) -> list[str]:
        """Make the folder, take its lock, and prepare it for training.

        Removes the temporary files of an interrupted write, moves an earlier run aside with
        ``overwrite``, records the config and, when resuming, completes what a kill cut short
        (:meth:`complete`). The lock is held until :meth:`close` (or the process ends).

        Returns:
            What was done besides, one line each (a stale lock taken over, files removed).

        Raises:
            RunFolderError: another training holds the folder; the earlier files cannot be
                moved aside (nothing is changed then).
        """
        if self.finished:
            raise RuntimeError("a finished run is not created again (see RunFolder.complete)")
        self.path.mkdir(parents=True, exist_ok=True)
        said = [] if self._lock is not None else self._take()
        self._created = True
        entries = _run_entries(self.path)
        if self.checkpoint is None and entries and not self._replace_config:
            try:
                self._move_aside(entries)
            except BaseException:
                assert self._lock is not None
                self._lock.release(undo=True)  # nothing was changed: no lock file either
                self._lock = None
                raise
        if write_config:
            save_json(self.config, self.path / CONFIG_NAME)
        if self.checkpoint is not None:
            said += self._repair()
        return said

    def complete(self) -> list[str]:
        """For a finished run: take the lock, remove temporary files left by a kill, and
        rewrite ``best.pth`` / ``log.json`` if a kill cut them short; then release the lock.

        Returns:
            What was done, one line each.
        """
        if self.checkpoint is None:
            return []
        try:
            said = [] if self._lock is not None else self._take()
            self._created = True
            return said + self._repair()
        finally:
            self.close()

    def lock(self) -> list[str]:
        """Take the folder's lock now if the folder exists (a resume or an overwrite), so a
        second training is refused before any work; :meth:`create` takes it otherwise.

        Returns:
            What was done besides, one line each (a stale lock taken over, files removed).

        Raises:
            RunFolderError: another training holds the folder.
        """
        return self._take() if self.path.is_dir() else []

    def _take(self) -> list[str]:
        if self._lock is None:
            self._lock = _Lock(self.path, self.flag)
            self._lock.acquire()
        said = list(self._lock.notes)
        removed = remove_stale_temporaries(self.path)
        if removed:
            names = _show(f"{name} ({_size(size)})" for name, size in removed)
            said.append(
                f"removed {len(removed)} temporary file(s) left by an interrupted write: {names}"
            )
        return said

    def _repair(self) -> list[str]:
        """Rewrite the ``best.pth`` and ``log.json`` of the epoch in ``last.pth`` if a kill
        stopped their writes (``last.pth`` is always written first)."""
        assert self.checkpoint is not None
        state = self.checkpoint.get("state", {})
        history = state.get("history", [])
        said: list[str] = []
        done = int(state.get("epoch", 0))
        last_entry = history[-1] if history else {}
        key = self.metric_key.removeprefix("best_")
        best_here = (
            key in last_entry
            and state.get("best_epoch", last_entry.get("epoch")) == done
            and float(last_entry[key]) == float(state.get(self.metric_key, float("nan")))
        )
        if best_here:
            record = _best_record(_peek(self.path / BEST_NAME), self.metric_key)
            if record is None or record[1] != done:
                metrics = entry_metrics(last_entry)
                best = deployable_checkpoint(self.checkpoint, metrics=metrics, epoch=done)
                save_checkpoint(best, self.path / BEST_NAME)
                self.best_metric = float(last_entry[key])
                said.append(f"wrote {BEST_NAME} of epoch {done} (its write was interrupted)")
        log = self.path / LOG_NAME
        text = json.dumps(history, indent=2)
        if not log.is_file() or log.read_text(errors="replace") != text:
            save_json(history, log)
            said.append(f"wrote {LOG_NAME} up to epoch {done} (its write was interrupted)")
        return said

    def close(self) -> None:
        """Release the folder's lock (a no-op when it is not held). A start that ended
        before :meth:`create` also removes the lock file it made, leaving the folder as it was."""
        if self._lock is not None:
            self._lock.release(undo=not self._created)
            self._lock = None

    def _move_aside(self, entries: list[str]) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path / f"{PREVIOUS_PREFIX}{stamp}"
        suffix = 1
        while aside.exists():
            aside = self.path / f"{PREVIOUS_PREFIX}{stamp}-{suffix}"
            suffix += 1
        moved: list[str] = []
        try:
            aside.mkdir()
            for name in entries:
                os.rename(self.path / name, aside / name)
                moved.append(name)
        except OSError as err:
            for name in reversed(moved):  # put back what moved, so nothing changes
                os.rename(aside / name, self.path / name)
            if aside.is_dir():
                aside.rmdir()
            raise RunFolderError(
                f"--overwrite: cannot move the earlier files of {str(self.path)!r} aside "
                f"({err.strerror or err}); nothing was changed"
            ) from None
        return aside

    def save_last(self, checkpoint: Any) -> Path:
        """Write ``last.pth`` (the full resumable state) atomically; call it before
        :meth:`save_best`, so every epoch is resumable whenever the process dies."""
        return save_checkpoint(checkpoint, self.path / LAST_NAME)

    def save_best(
        self,
        checkpoint: Any,
        metric: float,
        *,
        metrics: Mapping[str, float] | None = None,
        epoch: int | None = None,
    ) -> bool:
        """Write ``best.pth`` if ``metric`` is strictly better than every earlier best.

        With ``metrics`` and ``epoch`` (as ``lagnet train`` passes them), ``checkpoint`` is a
        run checkpoint and ``best.pth`` its deployable part (:func:`deployable_checkpoint`);
        without them, ``checkpoint`` is written as it is.
        """
        if not metric > self.best_metric:
            return False
        if metrics is not None and epoch is not None:
            checkpoint = deployable_checkpoint(checkpoint, metrics=metrics, epoch=epoch)
        save_checkpoint(checkpoint, self.path / BEST_NAME)
        self.best_metric = metric
        return True

    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``name`` in the folder as JSON, atomically."""
        return save_json(obj, self.path / name)

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``name`` in the folder atomically."""
        return atomic_write(self.path / name, lambda f: f.write(data), durable=False)
