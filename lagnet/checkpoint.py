"""Checkpoint files: atomic saves, and loads that never execute pickled code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lagnet._io import atomic_write

__all__ = [
    "load_checkpoint",
    "load_state_dict_file",
    "save_checkpoint",
    "save_json",
    "state_dict_from",
]


def save_checkpoint(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Save ``obj`` with ``torch.save`` atomically: a temporary file in the same folder,
    flushed to disk, then renamed over ``path``. A crash (even SIGKILL) mid-write leaves the
    previous file intact, never a truncated one.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"checkpoint folder does not exist: {str(target.parent)!r}")
    return atomic_write(target, lambda f: torch.save(obj, f))


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    what: str = "checkpoint",
) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a plain tensor checkpoint (e.g. it carries pickled code,
            which is never executed) or is corrupt.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(p)!r}")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError for code, RuntimeError/EOFError for corruption
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"refusing to load {what} from {str(p)!r}: it is not a plain tensor checkpoint "
            f"(torch.load with weights_only=True failed: {first}). Files that carry pickled "
            "code are never executed; re-save the state_dict alone."
        ) from err


def load_state_dict_file(path: str | os.PathLike[str], *, what: str = "weights") -> dict[str, Any]:
    """Load a state dict saved with ``torch.save`` (``weights_only=True``).

    Accepts a bare state dict or a checkpoint dict holding one under ``"model"``,
    ``"state_dict"`` or ``"model_state_dict"``.
    """
    return state_dict_from(load_checkpoint(path, what=what), source=str(path), what=what)


def state_dict_from(obj: Any, *, source: str, what: str = "weights") -> dict[str, Any]:
    """The state dict in a loaded checkpoint: ``obj`` itself, or the dict under ``"model"``,
    ``"state_dict"`` or ``"model_state_dict"``; ``source`` names the file in the error."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                obj = inner
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError(
            f"{what} file {source!r} does not hold a state dict ({type(obj).__name__})"
        )
    return obj


def save_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON atomically (temporary file in the same folder, rename)."""
    data = json.dumps(obj, indent=2).encode()
    return atomic_write(path, lambda f: f.write(data), durable=False)
