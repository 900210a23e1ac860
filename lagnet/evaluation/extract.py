"""Embedding extraction over a data loader (flip augmentation, L2 normalisation)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, get_args

import torch
import torch.nn.functional as F
from torch import nn

from lagnet._progress import progress as progress_bar

__all__ = ["AMP_DTYPES", "AmpMode", "Features", "autocast", "extract_features"]

AmpMode = Literal["bf16", "fp16"]
"""Mixed-precision modes: ``"bf16"`` (:data:`torch.bfloat16`) or ``"fp16"`` (float16)."""

AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(
    device: torch.device, amp: bool | AmpMode | None
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``amp`` on ``device``, or a no-op context for ``None``/``False``.

    ``True`` means float16 on CUDA and bfloat16 elsewhere (the historical meaning of
    ``extract_features(amp=True)``).
    """
    if amp is None or amp is False:
        return contextlib.nullcontext()
    if amp is True:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    elif isinstance(amp, str) and amp in AMP_DTYPES:
        dtype = AMP_DTYPES[amp]
    else:
        raise ValueError(f"amp must be one of {get_args(AmpMode)}, None or a bool, got {amp!r}")
    return torch.autocast(device.type, dtype=dtype)


@dataclass(frozen=True, eq=False)
class Features:
    """Embeddings with their labels, on the CPU.

    Attributes:
        features: ``(N, D)`` float32 embeddings.
        pids: ``(N,)`` int64 person ids.
        camids: ``(N,)`` int64 camera ids.
    """

    features: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _as_labels(values: Any, name: str, batch_size: int, batch_index: int) -> torch.Tensor:
    labels = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"batch {batch_index}: {name} must be integers, got dtype {labels.dtype}")
    labels = labels.reshape(-1) if labels.ndim == 0 else labels
    if labels.ndim != 1 or labels.shape[0] != batch_size:
        raise ValueError(
            f"batch {batch_index}: {name} has shape {tuple(labels.shape)}, expected "
            f"({batch_size},) to match the images"
        )
    return labels.detach().to("cpu", torch.int64)


def _unpack(batch: Any, batch_index: int) -> tuple[torch.Tensor, Any, Any]:
    if isinstance(batch, Mapping):
        missing = [key for key in ("images", "pids", "camids") if key not in batch]
        if missing:
            raise ValueError(
                f"batch {batch_index}: a dict batch needs the keys 'images', 'pids' and "
                f"'camids'; it lacks {missing} (its keys: {sorted(map(str, batch))})"
            )
        images, pids, camids = batch["images"], batch["pids"], batch["camids"]
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        if len(batch) < 3:
            raise ValueError(
                f"batch {batch_index}: expected (images, pids, camids), got {len(batch)} items"
            )
        images, pids, camids = batch[0], batch[1], batch[2]
    else:
        raise TypeError(
            f"batch {batch_index}: expected a (images, pids, camids) tuple or a dict, "
            f"got {type(batch).__name__}"
        )
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"batch {batch_index}: images must be a (B, C, H, W) tensor, got {shape}")
    return images, pids, camids


def is_records(value: object) -> TypeGuard[Sequence[Any]]:
    """True when ``value`` is a non-empty sequence of ``(path, pid, camid)`` records."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or not value:
        return False
    first = value[0]
    return isinstance(first, tuple) and len(first) == 3 and isinstance(first[0], (str, os.PathLike))


def records_loader(
    records: Sequence[Any],
    input_size: tuple[int, int] | None,
    cache: str,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> Iterable[Any]:
    """The test-preset loader of ``records`` (:func:`lagnet.data.build_loader`)."""
    from lagnet.data.loaders import build_loader  # lagnet.data is not needed otherwise

    if input_size is None:
        raise ValueError("input_size=(H, W) is required to read records (path, pid, camid)")
    if not isinstance(input_size, (tuple, list)) or len(input_size) != 2:
        raise TypeError(f"input_size must be a (height, width) pair, got {input_size!r}")
    height, width = input_size
    return build_loader(
        records,
        height,
        width,
        train=False,
        batch_size=batch_size,
        cache=cache,
        device=device,
        progress=progress,
        log=print if progress else None,
    )


def _embed(model: nn.Module, images: torch.Tensor, flip: bool, batch_index: int) -> torch.Tensor:
    """Float32 embeddings of ``images``, plus those of the mirrored images when ``flip``.

    Both halves run as one batch of ``2B`` (one forward instead of two).
    """
    size = images.shape[0]
    batch = torch.cat([images, images.flip(3)]) if flip else images
    out = model(batch)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"batch {batch_index}: the model must return a (B, D) tensor in eval mode, "
            f"got {type(out).__name__}"
        )
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        what = f"{size} images and their mirrors" if flip else f"{size} images"
        raise ValueError(
            f"batch {batch_index}: the model returned shape {tuple(out.shape)}, expected "
            f"({batch.shape[0]}, D) for the {what}"
        )
    out = out.float()
    return out[:size] + out[size:] if flip else out


def extract_features(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    flip: bool = True,
    normalize: bool = True,
    device: torch.device | str | None = None,
    amp: bool | AmpMode | None = False,
    progress: bool = True,
    channels_last: bool = False,
    input_size: tuple[int, int] | None = None,
    cache: str = "auto",
    batch_size: int = 64,
) -> Features:
    """Embed every image of ``loader`` with ``model``.

    The model is put in eval mode and run under :func:`torch.inference_mode`; the previous
    training mode of the model and of each of its submodules is restored afterwards, even on
    error. The embeddings stay on the model's device until the end and are copied to the CPU
    once (no per-batch synchronisation).

    Args:
        model: any module mapping ``(B, 3, H, W)`` images to ``(B, D)`` embeddings.
        loader: iterable of ``(images, pids, camids)`` tuples (extra items are ignored) or
            dicts with keys ``"images"``, ``"pids"``, ``"camids"``; images ``(B, C, H, W)``.
            Or the records of a split (``(path, pid, camid)`` per image, e.g.
            ``dataset.query``), read with the test preset at ``input_size`` by
            :func:`lagnet.data.build_loader` (``cache``, ``batch_size``). A
            :class:`~lagnet.data.CachedLoader`'s batches, already on ``device``, are not copied.
        flip: add the embedding of the horizontally flipped image (width dimension) to that of
            the image; the images and their mirrors run as one batch of ``2B``.
        normalize: L2-normalise each (summed) embedding.
        device: where to run the model; default: the device of its first parameter or buffer
            (CPU for a module without any).
        amp: ``"bf16"`` or ``"fp16"``: run the model under :func:`torch.autocast` with that
            dtype; ``True``: float16 on CUDA, bfloat16 on the CPU; ``False``/``None``: off.
            Embeddings are summed and returned in float32.
        progress: show a tqdm progress bar when tqdm is installed.
        channels_last: feed the images in ``torch.channels_last`` memory format (convert the
            model with ``model.to(memory_format=torch.channels_last)`` yourself).
        input_size: ``(H, W)`` the records are resized to (required with records).
        cache: with records: ``"auto"``, ``"device"``, ``"host"`` or ``"off"`` (see
            :func:`lagnet.data.build_loader`).
        batch_size: with records: images per batch.

    Returns:
        :class:`Features` with ``(N, D)`` float32 embeddings and ``(N,)`` int64 ids/cameras,
        on the CPU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if device is None:
        tensors = iter([*model.parameters(), *model.buffers()])
        first = next(tensors, None)
        run_device = first.device if first is not None else torch.device("cpu")
    else:
        run_device = torch.device(device)
    precision = autocast(run_device, amp)  # validates amp before any work
    if is_records(loader):
        loader = records_loader(loader, input_size, cache, batch_size, run_device, progress)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    feats: list[torch.Tensor] = []
    pids: list[torch.Tensor] = []
    camids: list[torch.Tensor] = []
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    total = len(loader) if isinstance(loader, Sized) else None
    batches = progress_bar(loader, progress, total=total, desc="extract", unit="batch", leave=False)
    try:
        with torch.inference_mode():
            iterator: Iterator[Any] = iter(batches)
            for index, batch in enumerate(iterator):
                images, batch_pids, batch_camids = _unpack(batch, index)
                size = images.shape[0]
                pids.append(_as_labels(batch_pids, "pids", size, index))
                camids.append(_as_labels(batch_camids, "camids", size, index))
                images = images.to(run_device, non_blocking=True).contiguous(memory_format=fmt)
                with precision:
                    emb = _embed(model, images, flip, index)
                if normalize:
                    emb = F.normalize(emb, dim=1)
                feats.append(emb)
    finally:
        for module, training in modes:  # each submodule's own mode, e.g. frozen batch norms
            module.training = training
        close = getattr(batches, "close", None)
        if batches is not loader and callable(close):
            close()
    if not feats:
        raise ValueError("loader yielded no batches")
    # concatenated outside inference mode, so the results are ordinary tensors; one copy back
    features = torch.cat(feats).to("cpu")
    return Features(features=features, pids=torch.cat(pids), camids=torch.cat(camids))
