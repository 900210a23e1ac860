"""Global and stripe pooling: max, avg and their sums, for any input size.

Stripes follow adaptive pooling's windows: stripe ``i`` of ``S`` covers rows
``floor(i*H/S)`` to ``ceil((i+1)*H/S)`` (exclusive), so stripes overlap when ``S`` does not
divide ``H``. The max is computed from those static windows (row maxima, then a reshape when
``S`` divides ``H`` or static slices otherwise), which gives exactly ``adaptive_max_pool2d``'s
values and exports to ONNX for every ``H``; the average is ``adaptive_avg_pool2d`` itself.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lagnet._validation import check_choice, check_feature_map, check_positive_int

__all__ = ["POOL_MODES", "GlobalPool", "PoolMode", "StripePool", "global_pool", "stripe_pool"]

PoolMode = Literal["max+avg", "max", "avg", "max+max"]
"""Pooling modes. ``"max+max"`` reproduces the released code's drop-branch pooling."""

POOL_MODES: tuple[str, ...] = get_args(PoolMode)


def _check_mode(mode: object) -> None:
    check_choice(mode, "pooling mode", POOL_MODES)


def global_pool(x: Tensor, mode: PoolMode = "max+avg") -> Tensor:
    """Pool a feature map over its spatial dims: ``(B, C, H, W) -> (B, C)``.

    ``"max+avg"`` is ``amax + mean`` (the LAG-Net / MGN descriptor); ``"max+max"`` is
    ``2 * amax`` (the released code's drop branch).
    """
    check_feature_map(x)
    _check_mode(mode)
    if mode == "avg":
        return x.mean(dim=(2, 3))
    m = x.amax(dim=(2, 3))
    if mode == "max":
        return m
    if mode == "max+max":
        return m + m
    return m + x.mean(dim=(2, 3))


def stripe_windows(height: int, num_stripes: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` of each stripe, as adaptive pooling chooses them."""
    return [
        ((i * height) // num_stripes, -((-(i + 1) * height) // num_stripes))
        for i in range(num_stripes)
    ]


def _stripe_max(x: Tensor, s: int) -> Tensor:
    # Row maxima first, then the max over each stripe's rows. (Reducing a channels-last slice
    # over both spatial dims at once gets NaN gradients from inductor in torch 2.14.)
    rows = x.amax(dim=3)  # (B, C, H)
    b, c, h = rows.shape
    if h % s == 0:
        return rows.reshape(b, c, s, h // s).amax(dim=3)
    return torch.stack([rows[:, :, lo:hi].amax(dim=2) for lo, hi in stripe_windows(h, s)], dim=2)


def stripe_pool(x: Tensor, num_stripes: int, mode: PoolMode = "max+avg") -> Tensor:
    """Pool ``num_stripes`` horizontal stripes: ``(B, C, H, W) -> (B, C, S)``.

    Any height works; the windows are adaptive pooling's (overlapping when ``S`` does not
    divide ``H``), and the values equal ``adaptive_max_pool2d`` / ``adaptive_avg_pool2d`` with
    output ``(S, 1)``.
    """
    check_feature_map(x)
    check_positive_int(num_stripes, "num_stripes")
    _check_mode(mode)
    if mode == "avg":
        return F.adaptive_avg_pool2d(x, (num_stripes, 1)).flatten(2)
    m = _stripe_max(x, num_stripes)
    if mode == "max":
        return m
    if mode == "max+max":
        return m + m
    return m + F.adaptive_avg_pool2d(x, (num_stripes, 1)).flatten(2)


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


class StripePool(nn.Module):
    """Module form of :func:`stripe_pool`: ``(B, C, H, W) -> (B, C, S)``."""

    def __init__(self, num_stripes: int, mode: PoolMode = "max+avg") -> None:
        super().__init__()
        self.num_stripes = check_positive_int(num_stripes, "num_stripes")
        _check_mode(mode)
        self.mode: PoolMode = mode

    def forward(self, x: Tensor) -> Tensor:
        return stripe_pool(x, self.num_stripes, self.mode)

    def extra_repr(self) -> str:
        return f"num_stripes={self.num_stripes}, mode={self.mode!r}"
