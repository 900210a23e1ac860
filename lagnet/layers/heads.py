"""Embedding, reduction and multi-granularity heads (MGN family), for any channel count."""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from lagnet._validation import (
    check_channels,
    check_choice,
    check_feature_map,
    check_float,
    check_input_dtype,
    check_nonnegative_int,
    check_positive_int,
)
from lagnet.layers.pooling import POOL_MODES, PoolMode, global_pool, stripe_pool

__all__ = [
    "STRIPE_SOURCES",
    "EmbeddingHead",
    "HeadOutput",
    "MultiGranularityHead",
    "MultiGranularityOutput",
    "ReductionHead",
    "StripeSource",
]


def _as_vector(x: Tensor, channels: int, name: str, training: bool) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 4 and x.shape[2:] == (1, 1):
        x = x.flatten(1)
    if x.ndim != 2:
        raise ValueError(f"{name} expects (B, C) or (B, C, 1, 1), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point tensor, got dtype {x.dtype}")
    check_channels(x, channels, name)
    if training and x.shape[0] < 2:
        raise ValueError(
            f"{name} in training mode needs a batch of at least 2 (batch norm cannot take "
            f"statistics of {x.shape[0]} sample), got shape {tuple(x.shape)}; "
            "call .eval() to embed single samples"
        )
    return x


def _legacy_head_arguments(
    args: tuple[int, ...], num_classes: int | None, embed_dim: int
) -> tuple[int, int]:
    """``(num_classes, embed_dim)`` from EmbeddingHead's positional arguments (see its doc)."""
    if len(args) > 2:
        raise TypeError(
            "EmbeddingHead takes (in_channels, num_classes, *, embed_dim=..., "
            f"negative_slope=...), got {1 + len(args)} positional arguments"
        )
    if args and num_classes is not None:
        raise TypeError(
            f"EmbeddingHead got num_classes={num_classes} by keyword and positional "
            f"arguments {args}; pass num_classes and embed_dim by keyword"
        )
    if len(args) == 2:
        warnings.warn(
            f"EmbeddingHead(in_channels, {args[0]}, {args[1]}) uses the old order "
            "(in_features, embed_dim, num_classes); write "
            f"EmbeddingHead(in_channels, num_classes={args[1]}, embed_dim={args[0]})",
            DeprecationWarning,
            stacklevel=3,
        )
        return args[1], args[0]
    if len(args) == 1:
        warnings.warn(
            f"EmbeddingHead(in_channels, {args[0]}): the second positional argument is now "
            "num_classes (it used to be embed_dim); pass it by keyword, "
            f"EmbeddingHead(in_channels, num_classes={args[0]}), to silence this warning",
            DeprecationWarning,
            stacklevel=3,
        )
        return args[0], embed_dim
    if num_classes is None:
        raise TypeError("EmbeddingHead needs num_classes (the number of identities)")
    return num_classes, embed_dim


class HeadOutput(NamedTuple):
    """Output of :class:`EmbeddingHead`: ``feature (B, D)`` and ``logits (B, N)``."""

    feature: Tensor
    logits: Tensor


class EmbeddingHead(nn.Module):
    """``BN1d -> LeakyReLU(0.1) -> Linear -> BN1d`` = the feature, then ``Linear`` = the logits.

    Signature: ``EmbeddingHead(in_channels, num_classes, *, embed_dim=512, negative_slope=0.1)``.
    Until the next release the positional forms warn (``DeprecationWarning``), because the
    second positional argument used to be ``embed_dim``: ``EmbeddingHead(C, N)`` is read as
    ``num_classes=N`` and ``EmbeddingHead(C, D, N)`` keeps its old meaning. Pass ``num_classes``
    and ``embed_dim`` by keyword.

    Shapes: ``(B, C)`` or ``(B, C, 1, 1)`` -> ``HeadOutput(feature (B, D), logits (B, N))``.
    Training needs ``B >= 2`` (batch norm statistics); the input must have the parameters'
    dtype (under autocast: float32 or the autocast dtype).
    """

    def __init__(
        self,
        in_channels: int,
        *args: int,
        num_classes: int | None = None,
        embed_dim: int = 512,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        num_classes, embed_dim = _legacy_head_arguments(args, num_classes, embed_dim)
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        slope = check_float(negative_slope, "negative_slope", low=0.0)
        linear = nn.Linear(in_channels, embed_dim, bias=False)
        nn.init.kaiming_normal_(linear.weight, mode="fan_out")
        self.neck = nn.Sequential(nn.BatchNorm1d(in_channels), nn.LeakyReLU(slope), linear)
        self.bottleneck = nn.BatchNorm1d(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: Tensor) -> HeadOutput:
        x = _as_vector(x, self.in_channels, "EmbeddingHead", self.training)
        check_input_dtype(x, self.classifier.weight.dtype, "x", "EmbeddingHead")
        feature = self.bottleneck(self.neck(x))
        return HeadOutput(feature, self.classifier(feature))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"embed_dim={self.embed_dim}"
        )


class ReductionHead(nn.Sequential):
    """``Conv1x1 -> BN2d -> ReLU`` on a pooled descriptor: ``(B, C[, 1, 1]) -> (B, R)``.

    ``R`` is ``out_channels``. Training needs ``B >= 2`` (batch norm statistics).
    """

    def __init__(self, in_channels: int, out_channels: int = 256) -> None:
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_in")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = _as_vector(x, self.in_channels, "ReductionHead", self.training)
        conv = self[0]
        assert isinstance(conv, nn.Conv2d)
        check_input_dtype(x, conv.weight.dtype, "x", "ReductionHead")
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


StripeSource = Literal["map", "pooled"]
"""Where :class:`MultiGranularityHead` takes its stripes from."""

STRIPE_SOURCES: tuple[str, ...] = get_args(StripeSource)


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
            ``"pooled"`` pools the already pooled ``1x1`` descriptor ``g``, so every stripe is
            ``2 * g`` with ``"max+avg"`` (the released code's quirk, see
            docs/reference-code.md section 4).

    Shapes: ``(B, C, H, W) -> MultiGranularityOutput``; any ``H, W``. The stripes are pooled
    in one :func:`~lagnet.layers.stripe_pool` call; each stripe then has its own heads.
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
        stripes_from: StripeSource = "map",
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        self.num_stripes = check_nonnegative_int(num_stripes, "num_stripes")
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.reduce_dim = check_positive_int(reduce_dim, "reduce_dim")
        check_choice(pool, "pool", POOL_MODES)
        check_choice(stripes_from, "stripes_from", STRIPE_SOURCES)
        self.pool: PoolMode = pool
        self.stripes_from: StripeSource = stripes_from

        def embedding() -> EmbeddingHead:
            return EmbeddingHead(in_channels, num_classes=num_classes, embed_dim=embed_dim)

        self.head = embedding()
        self.reduction = ReductionHead(in_channels, reduce_dim)
        self.stripe_heads = nn.ModuleList(embedding() for _ in range(num_stripes))
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
            return MultiGranularityOutput(
                head.feature,
                head.logits,
                reduced,
                head.feature.new_zeros(b, 0, self.embed_dim),
                head.logits.new_zeros(b, 0, head.logits.shape[1]),
                reduced.new_zeros(b, 0, self.reduce_dim),
            )
        source = g[:, :, None, None] if self.stripes_from == "pooled" else x
        stripes = stripe_pool(source, self.num_stripes, self.pool).unbind(2)
        outs = [h(s) for h, s in zip(self.stripe_heads, stripes, strict=True)]
        reds = [r(s) for r, s in zip(self.stripe_reductions, stripes, strict=True)]
        return MultiGranularityOutput(
            head.feature,
            head.logits,
            reduced,
            torch.stack([o.feature for o in outs], dim=1),
            torch.stack([o.logits for o in outs], dim=1),
            torch.stack(reds, dim=1),
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_stripes={self.num_stripes}, "
            f"pool={self.pool!r}, stripes_from={self.stripes_from!r}"
        )
