"""The loader a split needs: the image cache with batch augmentation, or a ``DataLoader``.

:func:`build_loader` is what ``lagnet train``, ``lagnet evaluate``, ``lagnet embed`` and
:func:`lagnet.engine.evaluate` use. With ``cache="auto"`` (the default) the split is decoded
once into an :class:`~lagnet.data.ImageCache` on the device, or in host memory, when it fits a
share of the free memory (:func:`~lagnet.data.choose_cache`), and batches are augmented where
they are used (:class:`~lagnet.data.CachedLoader`); a split that fits nowhere falls back to a
``DataLoader`` over :class:`~lagnet.data.ImageDataset` with worker processes, with a one-line
notice.

    loader = build_loader(data.train, 384, 128, train=True, batch_size=32,
                          sampler=PKSampler([r.pid for r in data.train], 8, 4), device="cuda")
    for images, pids, camids in loader:  # float32 (32, 3, 384, 128) on the GPU
        ...
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from lagnet._validation import check_choice, check_nonnegative_int, check_positive_int
from lagnet.data.batch_transform import BatchTransform
from lagnet.data.cached_loader import CACHE_MODES, CachedLoader, choose_cache
from lagnet.data.datasets import ImageDataset, ReIDRecord
from lagnet.data.image_cache import ImageCache, usable_cores
from lagnet.data.transforms import build_transforms

__all__ = ["MAX_DEFAULT_WORKERS", "build_loader", "default_workers"]

MAX_DEFAULT_WORKERS = 8
"""The most ``DataLoader`` workers :func:`default_workers` gives one process."""

PREFETCH_FACTOR = 4
"""Batches each ``DataLoader`` worker prepares ahead (``cache="off"`` with workers)."""


def default_workers(device: torch.device | str) -> int:
    """``DataLoader`` worker processes for a split read without the cache, on ``device``.

    On CUDA: the usable cores shared among this host's processes (``LOCAL_WORLD_SIZE`` under
    ``torchrun``), one kept for the process itself, at most :data:`MAX_DEFAULT_WORKERS`. On the
    CPU: 0, since the model's own operations need the cores.
    """
    if torch.device(device).type != "cuda":
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cores() // local - 1))


def build_loader(
    records: Sequence[ReIDRecord | tuple[str, int, int]],
    height: int,
    width: int,
    *,
    train: bool,
    batch_size: int,
    sampler: Iterable[int] | None = None,
    cache: str = "auto",
    device: torch.device | str = "cpu",
    workers: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    drop_last: bool | None = None,
    pin_cache: bool = True,
    log: Callable[[str], object] | None = print,
) -> CachedLoader | DataLoader[Any]:
    """The loader of one split: batches ``(images, pids, camids)``, images float32
    ``(B, 3, height, width)`` normalised (and augmented when ``train``), pids and camids
    ``(B,)`` int64 on the CPU.

    Args:
        records: the split, ``(path, pid, camid)`` per image (e.g. ``dataset.train``).
        height, width: the network's input size.
        train: the training preset (flip, random erasing) or the test preset.
        batch_size: images per batch.
        sampler: dataset indices to visit (e.g. a :class:`~lagnet.data.PKSampler`); ``None``:
            every image in order.
        cache: ``"auto"``, ``"device"``, ``"host"`` or ``"off"`` (see
            :func:`~lagnet.data.choose_cache`): where the decoded split is kept. ``"auto"``
            falls back to ``"off"`` with a one-line notice in ``log`` when it fits nowhere.
        device: where the batches are used. A cached split is augmented there.
        workers: ``DataLoader`` worker processes with the cache off (``None``:
            :func:`default_workers`); the cache itself is decoded on every usable core.
        generator: the random source of the cached training preset (on ``device``; ``None``:
            torch's default generator of ``device``). The ``DataLoader`` path's PIL
            transforms draw from torch's global generator.
        progress: a progress bar while decoding the cache.
        cache_dir: a folder to keep the decoded split in and load it from next time
            (:class:`~lagnet.data.ImageCache`); ``None``: decode every time.
        drop_last: drop a last incomplete batch (``None``: ``train``).
        pin_cache: keep a host cache in pinned memory when ``device`` is a GPU (turn off to
            keep a cache loaded from ``cache_dir`` memory-mapped, shared by the processes of a
            host).
        log: receives the cache's one-line summary and the fallback notice (``None``: silent).

    Returns:
        a :class:`~lagnet.data.CachedLoader`, or a ``DataLoader`` over
        :class:`~lagnet.data.ImageDataset` (``pin_memory`` on CUDA; with workers,
        ``persistent_workers`` and a prefetch depth of :data:`PREFETCH_FACTOR`).

    Raises:
        OSError: one error naming every unreadable image of a cached split (before any batch).
        TypeError, ValueError: bad arguments.
    """
    entries = [ReIDRecord(*r) for r in records]
    if not entries:
        raise ValueError("records is empty: a loader needs at least one image")
    check_positive_int(height, "height")
    check_positive_int(width, "width")
    check_positive_int(batch_size, "batch_size")
    check_choice(cache, "cache", CACHE_MODES)
    for name, flag in (("train", train), ("progress", progress), ("pin_cache", pin_cache)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} ({flag!r})")
    if workers is not None:
        check_nonnegative_int(workers, "workers")
    target = torch.device(device)
    drop = train if drop_last is None else drop_last
    nbytes = ImageCache.estimate_nbytes(len(entries), height, width)
    placement = choose_cache(cache, nbytes, target, log=log)
    if placement == "off":
        count = default_workers(target) if workers is None else workers
        cuda = target.type == "cuda"
        dataset = ImageDataset(entries, build_transforms(height, width, train=train))
        return DataLoader(
            dataset,
            batch_size,
            sampler=sampler,
            num_workers=count,
            drop_last=drop,
            pin_memory=cuda,
            persistent_workers=count > 0,
            prefetch_factor=PREFETCH_FACTOR if count > 0 else None,
        )
    pin = placement == "host" and pin_cache and target.type == "cuda"
    images = ImageCache(
        [r.path for r in entries],
        height,
        width,
        progress=progress,
        cache_dir=cache_dir,
        pin_memory=pin,  # decoded straight into pinned memory: never two host copies
    )
    if placement == "device":
        images = images.to(target)
    if log is not None:
        log(images.summary())  # its size and where it lives, once built
    return CachedLoader(
        images,
        [r.pid for r in entries],
        [r.camid for r in entries],
        batch_size=batch_size,
        transform=BatchTransform(height, width, train=train, generator=generator),
        sampler=sampler,
        drop_last=drop,
        device=target,
    )
