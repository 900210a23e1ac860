"""Decode once: every image of a split decoded, resized and kept as one uint8 tensor.

:class:`ImageCache` opens each file with :func:`lagnet.data.datasets.read_image` and resizes it
with torchvision's bicubic ``Resize`` on the PIL image, exactly as the first op of
:func:`lagnet.data.build_transforms`, so its uint8 pixels are what the PIL path hands to
``ToTensor``. The batch augmentation (:class:`lagnet.data.BatchTransform`) then runs on whole
batches where they are used. Optionally the decoded tensor is saved to a folder, keyed by the
file list, sizes, modification times and the input size, and later memory-mapped instead of
decoded again (several processes on one host then share the page cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from lagnet._io import atomic_write
from lagnet._progress import progress as progress_bar
from lagnet._validation import check_positive_int
from lagnet.data.datasets import read_image

__all__ = ["ImageCache"]

_MAX_LISTED = 10  # how many unreadable files the error message shows
_FORMAT = 1  # bump when the file layout, read_image or the resize changes within a release


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def _check_paths(paths: object) -> list[str]:
    if isinstance(paths, (str, bytes, os.PathLike)) or not isinstance(paths, Sequence):
        raise TypeError(
            f"paths must be a sequence of file paths, got {type(paths).__name__} ({paths!r:.80})"
        )
    out: list[str] = []
    for i, p in enumerate(paths):
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"paths[{i}] must be a str or os.PathLike, got {type(p).__name__}")
        out.append(os.fspath(p))
    if not out:
        raise ValueError("paths is empty: an image cache needs at least one image")
    return out


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class ImageCache:
    """A split's images decoded and bicubic-resized once: ``images`` ``(N, 3, H, W)`` uint8.

    ``images[i]`` holds, channels first, the uint8 pixels of
    ``Resize((H, W), BICUBIC)(read_image(paths[i]))``: exactly what the PIL path of
    :func:`lagnet.data.build_transforms` hands to ``ToTensor``.

    Args:
        paths: the image files, in dataset order (``images[i]`` is ``paths[i]``).
        height, width: the network's input size.
        workers: decoding threads (PIL releases the GIL while decoding and resizing); ``None``:
            every usable core.
        progress: show a progress bar while decoding (tqdm, when installed).
        cache_dir: a folder to save the decoded tensor in (created if needed) and to load it from
            on later builds. The file is named by a hash of the absolute paths, their sizes and
            modification times, the input size and the lagnet/Pillow/torchvision versions, so a
            changed, added or removed file makes a new one; it is written atomically and loaded
            by memory-mapping, so several processes on one host share one copy in the page
            cache. ``None``: decode every time.
        log: called once with :meth:`summary` after building (the CLI passes ``print``).
        pin_memory: decode straight into page-locked memory (when CUDA is available), for
            batches sent to a GPU asynchronously: unlike ``.to("cpu", pin_memory=True)`` after
            building, the host never holds two copies. A cache loaded from ``cache_dir`` is
            copied from the mapped file into pinned memory.

    Raises:
        OSError: one error naming every unreadable or corrupt image (all files are tried first).
        TypeError, ValueError: bad arguments.
    """

    images: torch.Tensor
    paths: list[str]
    height: int
    width: int
    source: Literal["decoded", "disk", "tensor"]
    """Where ``images`` came from: decoded now, loaded from ``cache_dir``, or given."""
    file: Path | None
    """The cache file in ``cache_dir`` (``None`` without one)."""
    seconds: float
    """Wall time of the build (decoding or loading), in seconds."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        height: int,
        width: int,
        *,
        workers: int | None = None,
        progress: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        log: Callable[[str], object] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.paths = _check_paths(paths)
        self.height = check_positive_int(height, "height")
        self.width = check_positive_int(width, "width")
        threads = usable_cores() if workers is None else check_positive_int(workers, "workers")
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}")
        for name, flag in (("progress", progress), ("pin_memory", pin_memory)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} ({flag!r})")
        pin = pin_memory and torch.cuda.is_available()
        start = time.perf_counter()
        self.file = None
        self.source = "decoded"
        if cache_dir is not None:
            self.file = self._cache_file(Path(cache_dir).expanduser())
        loaded = self._load(self.file) if self.file is not None else None
        if loaded is not None:
            self.images = loaded.pin_memory() if pin else loaded
            self.source = "disk"
        else:
            self.images = self._decode(threads, progress, pin)
            if self.file is not None:
                self._save(self.file)
        self.seconds = time.perf_counter() - start
        if log is not None:
            log(self.summary())

    # -- building ---------------------------------------------------------------------------

    def _decode(self, threads: int, progress: bool, pin: bool) -> torch.Tensor:
        n, h, w = len(self.paths), self.height, self.width
        images = torch.empty((n, 3, h, w), dtype=torch.uint8, pin_memory=pin)
        target = images.numpy()  # shares memory: threads write straight into the tensor

        def decode(index: int) -> str | None:
            path = self.paths[index]
            try:
                image = read_image(path)
                resized = tvf.resize(image, [h, w], interpolation=InterpolationMode.BICUBIC)
                pixels = np.asarray(resized)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                text = str(exc)
                return text if path in text else f"cannot read image {path!r}: {text}"
            if pixels.shape != (h, w, 3) or pixels.dtype != np.uint8:
                return (
                    f"cannot read image {path!r}: decoded to mode {resized.mode!r} "
                    f"(shape {pixels.shape}, {pixels.dtype}), expected 8-bit RGB"
                )
            target[index] = pixels.transpose(2, 0, 1)
            return None

        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lagnet-decode")
        try:
            results = progress_bar(
                pool.map(decode, range(n)),
                enabled=progress,
                total=n,
                desc="decoding images",
                unit="img",
                leave=False,
            )
            errors = [message for message in results if message is not None]
        finally:  # on Ctrl-C, drop the images not started instead of decoding them all
            pool.shutdown(wait=True, cancel_futures=True)
        if errors:
            shown = "\n  ".join(errors[:_MAX_LISTED])
            extra = len(errors) - _MAX_LISTED
            more = f"\n  ... and {extra} more" if extra > 0 else ""
            raise OSError(
                f"{len(errors)} of {n} images cannot be read (fix or remove them):\n  {shown}{more}"
            )
        return images

    def _cache_file(self, folder: Path) -> Path | None:
        """The cache file for these paths, or ``None`` when a file cannot be stat'ed."""
        files = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                return None  # decoding will name it among the unreadable files
            files.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
        from lagnet import __version__  # lagnet is fully imported by now

        key = {
            "format": _FORMAT,
            "lagnet": __version__,  # read_image's decoding may change between releases
            "height": self.height,
            "width": self.width,
            "pillow": PIL.__version__,
            "torchvision": torchvision.__version__,
            "files": files,
        }
        digest = hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()
        name = f"images-{self.height}x{self.width}-n{len(self.paths)}-{digest[:32]}.u8"
        return folder / name

    def _load(self, file: Path) -> torch.Tensor | None:
        nbytes = self.estimate_nbytes(len(self.paths), self.height, self.width)
        try:
            if file.stat().st_size != nbytes:
                return None
            # shared=False maps the file privately: read-only pages stay shared in the page
            # cache between processes, writes to the tensor never reach the file.
            flat = torch.from_file(str(file), shared=False, size=nbytes, dtype=torch.uint8)
        except (OSError, RuntimeError):
            return None
        return flat.view(len(self.paths), 3, self.height, self.width)

    def _save(self, file: Path) -> None:
        data = self.images.numpy()
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(file, lambda f: f.write(data.data))
        except OSError as exc:
            warnings.warn(
                f"could not save the image cache to {str(file)!r} ({exc}); it will be decoded "
                "again next time",
                RuntimeWarning,
                stacklevel=3,
            )
            self.file = None

    # -- use --------------------------------------------------------------------------------

    @classmethod
    def from_tensor(
        cls, images: torch.Tensor, paths: Sequence[str | os.PathLike[str]] | None = None
    ) -> ImageCache:
        """Wrap an existing ``(N, 3, H, W)`` uint8 tensor (no decoding; ``paths`` optional)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a (N, 3, H, W) uint8 tensor, got dtype {images.dtype} and shape "
                f"{tuple(images.shape)}"
            )
        n = images.shape[0]
        names = [f"<image {i}>" for i in range(n)] if paths is None else _check_paths(paths)
        if len(names) != n:
            raise ValueError(f"paths has {len(names)} entries but images holds {n} images")
        cache = cls.__new__(cls)
        cache.images = images.contiguous()
        cache.paths = names
        cache.height, cache.width = int(images.shape[2]), int(images.shape[3])
        cache.source, cache.file, cache.seconds = "tensor", None, 0.0
        return cache

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def device(self) -> torch.device:
        """The device holding ``images``."""
        return self.images.device

    @property
    def nbytes(self) -> int:
        """Size of ``images`` in bytes (``N * 3 * H * W``)."""
        return self.images.numel() * self.images.element_size()

    @staticmethod
    def estimate_nbytes(count: int, height: int, width: int) -> int:
        """Bytes a cache of ``count`` images at ``height x width`` takes, before building it."""
        return (
            check_positive_int(count, "count")
            * 3
            * check_positive_int(height, "height")
            * check_positive_int(width, "width")
        )

    def to(self, device: torch.device | str, *, pin_memory: bool = False) -> ImageCache:
        """This cache with ``images`` on ``device`` (``self`` when nothing changes).

        ``pin_memory`` (host only): copy ``images`` into page-locked memory so that batches go to
        a GPU asynchronously; ignored without CUDA, where nothing can use pinned memory.
        """
        target = torch.device(device)
        images = self.images
        if target.type == "cpu":
            if pin_memory and torch.cuda.is_available() and not images.is_pinned():
                images = images.to("cpu").pin_memory()
            else:
                images = images.to("cpu")
        else:
            images = images.to(target)
        if images is self.images:
            return self
        moved = type(self).__new__(type(self))
        moved.__dict__.update(self.__dict__)
        moved.images = images
        return moved

    def summary(self) -> str:
        """One line: count, size, device, and how the cache was built."""
        rate = len(self) / max(self.seconds, 1e-9)
        how = {
            "decoded": f"decoded in {self.seconds:.1f} s ({rate:.0f} img/s)",
            "disk": f"loaded from {str(self.file)!r}",
            "tensor": "from a tensor",
        }[self.source]
        pinned = ", pinned" if self.images.device.type == "cpu" and self.images.is_pinned() else ""
        return (
            f"image cache: {len(self)} images at {self.height}x{self.width}, "
            f"{_human(self.nbytes)} uint8 on {self.images.device}{pinned}, {how}"
        )

    def __repr__(self) -> str:
        return (
            f"ImageCache({len(self)} images, {self.height}x{self.width}, "
            f"{_human(self.nbytes)} on {self.images.device})"
        )
