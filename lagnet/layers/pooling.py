"""Global and stripe pooling: max, avg and their sums, for any input size."""

from __future__ import annotations

from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from lagnet._validation import check_feature_map, check_positive_int

PoolMode = Literal["max+avg", "max", "avg", "max+max"]
"""Pooling modes. ``"max+max"`` reproduces the released code's drop-branch pooling."""

POOL_MODES: tuple[str, ...] = get_args(PoolMode)


def _check_mode(mode: str) -> None:
    if mode not in POOL_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOL_MODES}")


def global_pool(x: Tensor, mode: PoolMode = "max+avg") -> Tensor:
    """Pool a feature map over its spatial dims: ``(B, C, H, W) -> (B, C)``.

    ``"max+avg"`` is ``amax + mean`` (the LAG-Net / MGN descriptor); ``"max+max"`` is
    ``2 * amax`` (the released code's drop branch).
    """
    check_feature_map(x)
    _check_mode(mode)
    if mode == "max":
        return x.amax(dim=(2, 3))
    if mode == "avg":
        return x.mean(dim=(2, 3))
    if mode == "max+max":
        m = x.amax(dim=(2, 3))
        return m + m
    return x.amax(dim=(2, 3)) + x.mean(dim=(2, 3))


def stripe_pool(x: Tensor, num_stripes: int, mode: PoolMode = "max+avg") -> Tensor:
    """Pool ``num_stripes`` horizontal stripes: ``(B, C, H, W) -> (B, C, S)``.

    Uses adaptive pooling with output ``(S, 1)``, so any height works (stripes overlap when
    ``H < S``, as in :func:`torch.nn.functional.adaptive_max_pool2d`).
    """
    check_feature_map(x)
    check_positive_int(num_stripes, "num_stripes")
    _check_mode(mode)
    size = (num_stripes, 1)
    if mode == "max":
        out = F.adaptive_max_pool2d(x, size)
    elif mode == "avg":
        out = F.adaptive_avg_pool2d(x, size)
    elif mode == "max+max":
        m = F.adaptive_max_pool2d(x, size)
        out = m + m
    else:
        out = F.adaptive_max_pool2d(x, size) + F.adaptive_avg_pool2d(x, size)
    return out.squeeze(-1)


class GlobalPool(nn.Module):
    """Module form of :func:`global_pool`: ``(B, C, H, W) -> (B, C)``."""

    def __init__(self, mode: PoolMode = "max+avg") -> None:
        super().__init__()
        _check_mode(mode)
        self.mode: PoolMode = mode

    def forward(self, x: Tensor) -> Tensor:
        return global_pool(x, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
