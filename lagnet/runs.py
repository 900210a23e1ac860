"""Run folders that never lose work: checked arguments, recorded configuration, safe resumes.

A run folder holds ``config.json`` (the settings of the run), ``last.pth`` (written after every
epoch), ``best.pth`` (only ever replaced by a strictly better model), ``log.json``,
``summary.json`` and ``curves.png``. :meth:`RunFolder.open` decides what a start may do
*without writing anything*: a new run into a missing or empty folder, a resume whose recorded
configuration matches, or a refusal that names the problem. Only :meth:`RunFolder.create`
writes, once every argument is known to be good, so a failed start leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lagnet._io import atomic_write
from lagnet.checkpoint import load_checkpoint, save_checkpoint, save_json

__all__ = [
    "CONFIG_NAME",
    "RunFolder",
    "RunFolderError",
    "check_output_folder",
    "resolve_device",
]

CONFIG_NAME = "config.json"
"""The file of a run folder that records its configuration."""

LAST_NAME = "last.pth"
BEST_NAME = "best.pth"
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
        ValueError: ``path`` or one of its parents is a file, or the folder is not writable.
    """
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
    names = list(items)
    shown = ", ".join(names[:_MAX_SHOWN])
    return shown + (f" (and {len(names) - _MAX_SHOWN} more)" if len(names) > _MAX_SHOWN else "")


def _run_entries(path: Path) -> list[str]:
    """Names in ``path`` that belong to a run (folders moved aside by --overwrite excluded)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if not p.name.startswith(PREVIOUS_PREFIX))


def _peek(path: Path) -> Any:
    """A checkpoint memory-mapped (tensors are not read), for its small entries; None if bad."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a foreign or corrupt file: the caller describes it without its state
        return None


def _value(value: Any) -> str:
    return json.dumps(value)


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
        flag: str = "--output",
    ) -> RunFolder:
        """Check what a start with ``config`` may do in ``path``; writes nothing.

        Args:
            path: the run folder.
            config: this start's settings; ``config[epochs_key]`` is the number of epochs.
            resume: continue the run recorded in ``path/last.pth``.
            overwrite: move an existing run's files aside (into ``previous-<time>/``).
            fixed_keys: settings a resume may not change (the differing ones are listed).
            epochs_key: the key of the epoch count (a resume may raise it).
            metric_key: the key of ``checkpoint["state"]`` holding the best score so far.

        Raises:
            RunFolderError: a run exists and neither ``resume`` nor ``overwrite`` is given;
                ``resume`` without ``last.pth``; a resume with another fixed setting;
                ``resume`` together with ``overwrite``.
            ValueError: ``path`` is not a writable folder.
        """
        target = check_output_folder(path, flag)
        run = cls(target, dict(config), overwrite=overwrite)
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite exclude each other: choose one")
        entries = _run_entries(target)
        last = target / LAST_NAME
        if resume:
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
            run._resume_from(last, fixed_keys, epochs_key, metric_key)
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
        self, last: Path, fixed_keys: Iterable[str], epochs_key: str, metric_key: str
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
        self.best_metric = self._best_so_far(state, metric_key)
        if wanted <= done:
            self.finished = True
            self.notes.append(
                f"the run in {str(self.path)!r} is finished: {done} of {wanted} epochs done, "
                f"nothing to do (pass --epochs above {done} to train further)"
            )
            return
        if wanted != recorded.get(epochs_key):
            self.notes.append(
                f"extending the run from {recorded.get(epochs_key)} to {wanted} epochs "
                f"({done} done)"
            )
        for key in sorted(set(self.config) - set(fixed)):
            if key in recorded and key != epochs_key and recorded[key] != self.config[key]:
                self.notes.append(
                    f"{key} changed: {_value(recorded[key])} -> {_value(self.config[key])}"
                )
        self.notes.insert(0, f"resuming {str(last)!r} after epoch {done}")

    def _best_so_far(self, state: Mapping[str, Any], metric_key: str) -> float:
        best = float(state.get(metric_key, float("-inf")))
        best_file = self.path / BEST_NAME
        if best_file.is_file():  # best.pth may be newer than last.pth after a crash
            # a file that is not a run checkpoint leaves the recorded score as it is
            with contextlib.suppress(KeyError, TypeError, ValueError):
                best = max(best, float(_peek(best_file)["state"][metric_key]))
        return best

    def create(self, *, write_config: bool = True) -> None:
        """Make the folder (moving an earlier run aside with ``overwrite``), record the config.

        Raises:
            RunFolderError: the earlier files cannot be moved aside (nothing is changed then).
        """
        if self.finished:
            raise RuntimeError("a finished run is not created again")
        entries = _run_entries(self.path)
        if self.checkpoint is None and entries:
            self._move_aside(entries)
        self.path.mkdir(parents=True, exist_ok=True)
        if write_config:
            save_json(self.config, self.path / CONFIG_NAME)

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
        """Write ``last.pth`` atomically."""
        return save_checkpoint(checkpoint, self.path / LAST_NAME)

    def save_best(self, checkpoint: Any, metric: float) -> bool:
        """Write ``best.pth`` if ``metric`` is strictly better than every earlier best."""
        if not metric > self.best_metric:
            return False
        save_checkpoint(checkpoint, self.path / BEST_NAME)
        self.best_metric = metric
        return True

    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``name`` in the folder as JSON, atomically."""
        return save_json(obj, self.path / name)

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``name`` in the folder atomically."""
        return atomic_write(self.path / name, lambda f: f.write(data), durable=False)
