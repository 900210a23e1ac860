"""Image transform presets of the LAG-Net training recipe (docs/reference-code.md, section 7)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from lagnet._validation import check_positive_int

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_transforms"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet per-channel mean (RGB, in [0, 1])."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet per-channel standard deviation (RGB)."""


def build_transforms(
    height: int = 384,
    width: int = 128,
    *,
    train: bool,
    random_erasing: bool = True,
    flip: bool = True,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor (3, height, width).

    Test preset (``train=False``): bicubic resize, ``ToTensor``, ImageNet normalisation.
    Training preset: the same with a random horizontal flip (``flip``) before ``ToTensor`` and
    torchvision's ``RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=0)`` after
    normalisation (``random_erasing``). ``flip`` and ``random_erasing`` are ignored for the test
    preset. Random ops draw from torch's global generator (seed it with ``torch.manual_seed``).
    """
    check_positive_int(height, "height")
    check_positive_int(width, "width")
    ops: list[Callable[..., object]] = [
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
    ]
    if train and flip:
        ops.append(T.RandomHorizontalFlip(p=0.5))
    ops += [T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    if train and random_erasing:
        ops.append(T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=0))
    compose: Callable[[Image.Image], torch.Tensor] = T.Compose(ops)
    return compose
