"""Embedding, reduction and multi-granularity heads (MGN family), for any channel count."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from lagnet._validation import check_channels, check_feature_map, check_positive_int
from lagnet.layers.pooling import POOL_MODES, PoolMode, global_pool, stripe_pool

__all__ = [
    "EmbeddingHead",
    "HeadOutput",
    "MultiGranularityHead",
    "MultiGranularityOutput",
    "ReductionHead",
]


def _as_vector(x: Tensor, channels: int, name: str) -> Tensor:
    if x.ndim == 4 and x.shape[2:] == (1, 1):
        x = x.flatten(1)
    if x.ndim != 2:
        raise ValueError(f"{name} expects (B, C) or (B, C, 1, 1), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point tensor, got dtype {x.dtype}")
    check_channels(x, channels, name)
    return x


class HeadOutput(NamedTuple):
    """Output of :class:`EmbeddingHead`: ``feature (B, D)`` and ``logits (B, N)``."""

    feature: Tensor
    logits: Tensor


class EmbeddingHead(nn.Module):
    """``BN1d -> LeakyReLU(0.1) -> Linear -> BN1d`` = the feature, then ``Linear`` = the logits.

    Shapes: ``(B, C)`` or ``(B, C, 1, 1)`` -> ``HeadOutput(feature (B, D), logits (B, N))``.
    """

    def __init__(
        self,
        in_features: int,
        embed_dim: int = 512,
        num_classes: int = 751,
        *,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features")
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.num_classes = check_positive_int(num_classes, "num_classes")
        linear = nn.Linear(in_features, embed_dim, bias=False)
        nn.init.kaiming_normal_(linear.weight, mode="fan_out")
        self.neck = nn.Sequential(nn.BatchNorm1d(in_features), nn.LeakyReLU(negative_slope), linear)
        self.bottleneck = nn.BatchNorm1d(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: Tensor) -> HeadOutput:
        x = _as_vector(x, self.in_features, "EmbeddingHead")
        feature = self.bottleneck(self.neck(x))
        return HeadOutput(feature, self.classifier(feature))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, embed_dim={self.embed_dim}, "
            f"num_classes={self.num_classes}"
        )


class ReductionHead(nn.Sequential):
    """``Conv1x1 -> BN2d -> ReLU`` on a pooled descriptor: ``(B, C[, 1, 1]) -> (B, R)``."""

    def __init__(self, in_channels: int, out_channels: int = 256) -> None:
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_in")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = _as_vector(x, self.in_channels, "ReductionHead")
        out = x[:, :, None, None]
        for module in self:
            out = module(out)
        return out.flatten(1)


class MultiGranularityOutput(NamedTuple):
    """Output of :class:`MultiGranularityHead` (``S`` stripes, possibly 0).

    Attributes:
        feature: ``(B, D)`` embedding of the global descriptor.
        logits: ``(B, N)`` logits of the global descriptor.
        reduced: ``(B, R)`` reduction of the global descriptor.
        stripe_features: ``(B, S, D)``.
        stripe_logits: ``(B, S, N)``.
        stripe_reduced: ``(B, S, R)``.
    """

    feature: Tensor
    logits: Tensor
    reduced: Tensor
    stripe_features: Tensor
    stripe_logits: Tensor
    stripe_reduced: Tensor


class MultiGranularityHead(nn.Module):
    """A branch's global descriptor, ``S`` horizontal stripes, and their heads.

    Args:
        in_channels: ``C`` of the branch feature map.
        num_classes: ``N`` identities for the classifiers.
        num_stripes: ``S`` horizontal stripes (``0`` for a global-only head).
        embed_dim: ``D`` of each embedding head.
        reduce_dim: ``R`` of each reduction head.
        pool: pooling of the global descriptor and the stripes (``"max+avg"``).
        stripes_from: ``"map"`` pools real stripes of the feature map (the paper);
            ``"pooled"`` pools the already pooled ``1x1`` descriptor, so every stripe equals
            the global one (the released code's quirk, REFERENCE.md section 4).

    Shapes: ``(B, C, H, W) -> MultiGranularityOutput``; any ``H, W``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        num_stripes: int = 3,
        embed_dim: int = 512,
        reduce_dim: int = 256,
        pool: PoolMode = "max+avg",
        stripes_from: str = "map",
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        if isinstance(num_stripes, bool) or not isinstance(num_stripes, int) or num_stripes < 0:
            raise ValueError(f"num_stripes must be an int >= 0, got {num_stripes!r}")
        if stripes_from not in ("map", "pooled"):
            raise ValueError(f"stripes_from must be 'map' or 'pooled', got {stripes_from!r}")
        if pool not in POOL_MODES:
            raise ValueError(f"unknown pooling mode {pool!r}; expected one of {POOL_MODES}")
        self.num_stripes = num_stripes
        self.pool: PoolMode = pool
        self.stripes_from = stripes_from
        self.embed_dim = embed_dim
        self.reduce_dim = reduce_dim
        self.head = EmbeddingHead(in_channels, embed_dim, num_classes)
        self.reduction = ReductionHead(in_channels, reduce_dim)
        self.stripe_heads = nn.ModuleList(
            EmbeddingHead(in_channels, embed_dim, num_classes) for _ in range(num_stripes)
        )
        self.stripe_reductions = nn.ModuleList(
            ReductionHead(in_channels, reduce_dim) for _ in range(num_stripes)
        )

    def forward(self, x: Tensor) -> MultiGranularityOutput:
        check_feature_map(x)
        check_channels(x, self.in_channels)
        g = global_pool(x, self.pool)
        head = self.head(g)
        reduced = self.reduction(g)
        b = x.shape[0]
        if self.num_stripes == 0:
            empty = x.new_zeros(b, 0, self.embed_dim)
            return MultiGranularityOutput(
                head.feature,
                head.logits,
                reduced,
                empty,
                head.logits.new_zeros(b, 0, head.logits.shape[1]),
                reduced.new_zeros(b, 0, self.reduce_dim),
            )
        source = g[:, :, None, None] if self.stripes_from == "pooled" else x
        stripes = stripe_pool(source, self.num_stripes, self.pool)
        feats, logits, reds = [], [], []
        for i, (sh, sr) in enumerate(zip(self.stripe_heads, self.stripe_reductions, strict=True)):
            out = sh(stripes[:, :, i])
            feats.append(out.feature)
            logits.append(out.logits)
            reds.append(sr(stripes[:, :, i]))
        return MultiGranularityOutput(
            head.feature,
            head.logits,
            reduced,
            torch.stack(feats, dim=1),
            torch.stack(logits, dim=1),
            torch.stack(reds, dim=1),
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_stripes={self.num_stripes}, "
            f"pool={self.pool!r}, stripes_from={self.stripes_from!r}"
        )
