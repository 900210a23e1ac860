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
        other = _describe_non_checkpoint(p)
        if other is not None:
            raise ValueError(
                f"{what} file {str(p)!r} is not a checkpoint: it is {other} (a checkpoint is "
                "a file written by torch.save, such as best.pth or last.pth of lagnet train)"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"refusing to load {what} from {str(p)!r}: it is not a plain tensor checkpoint "
            f"(torch.load with weights_only=True failed: {first}). Files that carry pickled "
            "code are never executed; re-save the state_dict alone."
        ) from err


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"%PDF", "a PDF document"),
)


def _describe_non_checkpoint(path: Path) -> str | None:
    """What ``path`` is when its first bytes show it is not a ``torch.save`` file (a JSON or
    text file, an image, a NumPy array, ...), or ``None`` when it may be one (a zip archive
    holding ``data.pkl``, a legacy pickle, or bytes that say nothing)."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):  # torch's zip format, or another zip (e.g. .npz)
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return None
        if any(n.endswith("data.pkl") for n in names):
            return None
        npz = names and all(n.endswith(".npy") for n in names)
        return "a NumPy .npz archive" if npz else "a zip archive without data.pkl"
    if head[:1] == b"\x80":  # a pickle: torch's legacy format
        return None
    if head[8:9] == b"{" and b"\x00" in head[:8]:  # safetensors: header length, then JSON
        return None
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    text = head.lstrip()
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:  # may end inside a character: judge the rest
        decoded = text[:-4].decode("utf-8", errors="replace")
        if "\ufffd" in decoded:
            return None
    if decoded[:1] in ("{", "["):
        return "a JSON file"
    if all(c.isprintable() or c in "\n\r\t" for c in decoded):
        return "a text file"
    return None


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
