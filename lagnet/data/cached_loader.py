"""Batches from an :class:`~lagnet.data.ImageCache`, augmented on the device that uses them.

:class:`CachedLoader` replaces ``DataLoader(ImageDataset(...))`` when the images fit in memory:
a sampler (e.g. :class:`~lagnet.data.PKSampler`) indexes the cache directly, each batch is
gathered on the cache's device (through pinned memory when it goes from host to a GPU) and
converted and augmented there by a :class:`~lagnet.data.BatchTransform`. :func:`choose_cache`
decides where a cache goes: on the device, in host memory, or nowhere.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

from lagnet._validation import check_choice, check_float, check_nonnegative_int, check_positive_int
from lagnet.data.batch_transform import BatchTransform
from lagnet.data.image_cache import ImageCache

__all__ = ["CACHE_MODES", "CachedLoader", "available_memory", "choose_cache"]

CACHE_MODES: tuple[str, ...] = ("auto", "device", "host", "off")
"""Values of :func:`choose_cache`'s ``mode`` (and of the CLI's ``--cache``)."""

CachePlacement = Literal["device", "host", "off"]


def available_memory() -> int | None:
    """Bytes of host memory available to new allocations, or ``None`` when unknown.

    ``MemAvailable`` from ``/proc/meminfo`` (Linux); else free physical pages from
    ``os.sysconf``.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - exotic platforms
        return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def choose_cache(
    mode: str,
    nbytes: int,
    device: torch.device | str,
    *,
    gpu_share: float = 0.5,
    ram_share: float = 0.5,
    log: Callable[[str], object] | None = None,
) -> CachePlacement:
    """Where an image cache of ``nbytes`` should live for a run on ``device``.

    ``mode``: ``"device"`` (on ``device``; on a CPU device that is host memory), ``"host"``,
    ``"off"`` (no cache: decode with a ``DataLoader``), or ``"auto"``: the device when it is a
    CUDA GPU and ``nbytes <= gpu_share * free GPU memory``, else host when
    ``nbytes <= ram_share * available RAM`` (:func:`available_memory`), else ``"off"``. With
    ``log``, ``"auto"`` reports a fallback to ``"off"`` in one line.

    Returns:
        ``"device"``, ``"host"`` or ``"off"``.
    """
    check_choice(mode, "cache mode", CACHE_MODES)
    check_nonnegative_int(nbytes, "nbytes")
    gpu = check_float(gpu_share, "gpu_share", low=0.0, high=1.0, low_open=True)
    ram = check_float(ram_share, "ram_share", low=0.0, high=1.0, low_open=True)
    target = torch.device(device)
    if mode == "off" or mode == "host":
        return mode  # type: ignore[return-value]
    if mode == "device":
        return "host" if target.type == "cpu" else "device"
    if target.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(target)
        if nbytes <= gpu * free:
            return "device"
    available = available_memory()
    if available is not None and nbytes <= ram * available:
        return "host"
    if log is not None:
        room = "unknown" if available is None else _gib(ram * available)
        log(
            f"image cache off: {_gib(nbytes)} does not fit in {ram:g} of the available RAM "
            f"({room}); decoding with DataLoader workers instead"
        )
    return "off"


def _check_labels(values: object, name: str, count: int) -> Tensor:
    if isinstance(values, Tensor):
        labels = values
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        labels = torch.as_tensor(list(values))
    else:
        kind = type(values).__name__
        raise TypeError(f"{name} must be a sequence of ints or a tensor, got {kind}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != count:
        raise ValueError(
            f"{name} must have shape ({count},), one per cached image, got {tuple(labels.shape)}"
        )
    return labels.detach().to("cpu", torch.int64).contiguous()


class CachedLoader:
    """Iterate ``(images, pids, camids)`` batches of an :class:`ImageCache`, like a DataLoader.

    ``images``: float32 ``(B, 3, H, W)`` on ``device``, made by ``transform`` from the cached
    uint8 pixels on that device; ``pids``, ``camids``: ``(B,)`` int64 on the CPU (as a
    ``DataLoader`` gives them).

    Args:
        cache: the images; ``cache.images[i]`` belongs to ``pids[i]`` and ``camids[i]``.
        pids, camids: ``(N,)`` integer labels, one per cached image.
        batch_size: images per batch.
        transform: a :class:`BatchTransform` of the cache's size (train or test preset).
        sampler: an iterable of cache indices (e.g. :class:`~lagnet.data.PKSampler`); ``None``:
            ``0 .. N-1`` in order. Its ``len()`` gives :meth:`__len__`.
        drop_last: drop a last batch smaller than ``batch_size``.
        device: where batches are delivered (``None``: the cache's device). A host cache goes
            to a CUDA device through pinned memory, asynchronously.
    """

    def __init__(
        self,
        cache: ImageCache,
        pids: Sequence[int] | Tensor,
        camids: Sequence[int] | Tensor,
        *,
        batch_size: int,
        transform: BatchTransform,
        sampler: Iterable[int] | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(cache, ImageCache):
            raise TypeError(f"cache must be an ImageCache, got {type(cache).__name__}")
        if not isinstance(transform, BatchTransform):
            raise TypeError(f"transform must be a BatchTransform, got {type(transform).__name__}")
        if (transform.height, transform.width) != (cache.height, cache.width):
            raise ValueError(
                f"transform is for {transform.height}x{transform.width} images but the cache "
                f"holds {cache.height}x{cache.width}"
            )
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__}")
        if sampler is not None and not isinstance(sampler, Iterable):
            raise TypeError(f"sampler must be an iterable of indices, got {type(sampler).__name__}")
        self.cache = cache
        self.pids = _check_labels(pids, "pids", len(cache))
        self.camids = _check_labels(camids, "camids", len(cache))
        self.transform = transform
        self.sampler = sampler
        self.drop_last = drop_last
        self.device = cache.device if device is None else torch.device(device)

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to the sampler's ``set_epoch`` (a no-op for samplers without one)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __len__(self) -> int:
        """Number of batches per pass."""
        if self.sampler is None:
            count = len(self.cache)
        else:
            try:
                count = len(self.sampler)  # type: ignore[arg-type]
            except TypeError:
                raise TypeError(
                    f"the sampler ({type(self.sampler).__name__}) has no len(), so the number of "
                    "batches is unknown"
                ) from None
        if self.drop_last:
            return count // self.batch_size
        return math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        indices: Iterable[int] = range(len(self.cache)) if self.sampler is None else self.sampler
        batch: list[int] = []
        for index in indices:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield self._batch(batch)
                batch = []
        if batch and not self.drop_last:
            yield self._batch(batch)

    def _batch(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        n = len(self.cache)
        try:
            index = torch.tensor(indices, dtype=torch.int64)
        except (TypeError, RuntimeError, OverflowError):
            raise TypeError(f"the sampler must yield ints, got {indices[:8]!r}") from None
        low, high = min(indices), max(indices)
        if low < 0 or high >= n:
            bad = low if low < 0 else high
            raise IndexError(f"the sampler yielded index {bad}, outside the cache's 0..{n - 1}")
        images = self._gather(index)
        return self.transform(images), self.pids[index], self.camids[index]

    def _gather(self, index: Tensor) -> Tensor:
        """``cache.images[index]`` on ``self.device``."""
        source = self.cache.images
        if source.device.type == "cpu":
            if self.device.type == "cpu":
                return source.index_select(0, index)
            pinned = self.device.type == "cuda" and torch.cuda.is_available()
            shape = (index.shape[0], *source.shape[1:])
            buffer = torch.empty(shape, dtype=source.dtype, pin_memory=pinned)
            torch.index_select(source, 0, index, out=buffer)
            return buffer.to(self.device, non_blocking=pinned)
        batch = source.index_select(0, index.to(source.device, non_blocking=True))
        return batch if source.device == self.device else batch.to(self.device)
