"""LAG-Net: global, part and local-attention branches on a shared ResNet stem."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lagnet._validation import check_feature_map, check_input_dtype, check_positive_int
from lagnet.backbones import BACKBONES, BackboneWeights, split_resnet
from lagnet.layers.attention import LocalAttentionSystem
from lagnet.layers.dropblock import BatchAttentionDropBlock
from lagnet.layers.heads import EmbeddingHead, MultiGranularityHead, ReductionHead
from lagnet.layers.pooling import global_pool

__all__ = ["HEAD_NAMES", "VARIANTS", "LAGNet", "LAGNetOutput", "build_lagnet"]

Variant = Literal["paper", "reference"]
VARIANTS: tuple[str, ...] = get_args(Variant)

HEAD_NAMES: tuple[str, ...] = ("la", "drop", "global", "part", "part0", "part1", "part2")
"""Order of the seven embedding heads, as in the released code's embedding."""

MIN_INPUT_SIZE = 32


def check_input_size(input_size: object, name: str = "input_size") -> tuple[int, int]:
    """``input_size`` as ``(height, width)``, refused (TypeError/ValueError naming ``name``) when
    it is not two ints or is smaller than :data:`MIN_INPUT_SIZE` in either dimension."""
    if (
        not isinstance(input_size, Sequence)
        or isinstance(input_size, str)
        or len(input_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in input_size)
    ):
        raise TypeError(f"{name} must be a (height, width) pair of ints, got {input_size!r}")
    height, width = int(input_size[0]), int(input_size[1])
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise ValueError(
            f"{name} must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {height}x{width}: "
            f"LAG-Net's global branch downsamples by {MIN_INPUT_SIZE}"
        )
    return height, width


@dataclass
class LAGNetOutput:
    """Training-mode output of :class:`LAGNet`.

    Attributes:
        embedding: ``(B, 7*D)`` the seven head features in :data:`HEAD_NAMES` order.
        logits: ``{name: (B, N)}`` for the seven heads.
        triplet_features: ``global_reduced, part_reduced, la_reduced, drop_reduced`` ``(B, R)``
            and a fifth feature: ``part_bn`` ``(B, D)`` (reference) or ``stripes_reduced``
            ``(B, 3*R)`` (paper).
        attention_features: ``(B, K*C)`` normalised LAS features (attention-center loss).
        attention_maps: ``(B, K, h, w)`` the selected attention maps.
    """

    embedding: Tensor
    logits: dict[str, Tensor]
    triplet_features: dict[str, Tensor]
    attention_features: Tensor
    attention_maps: Tensor


class LAGNet(nn.Module):
    """The LAG-Net re-ID network (usually built with :func:`build_lagnet`).

    ``forward(x (B, 3, H, W))`` returns the ``(B, 7*embed_dim)`` embedding in eval mode and a
    :class:`LAGNetOutput` in training mode (use :meth:`embed` / :meth:`forward_train` for a
    statically typed call). Images must have the parameters' dtype, except under
    :func:`torch.autocast` (then float32 or the autocast dtype); anything else is a TypeError
    naming both dtypes, never a silent cast.

    Args:
        num_classes: training identities ``N`` (classifier size).
        backbone: a torchvision ResNet name (resnet18/34/50/101/152).
        variant: ``"paper"`` (the released code's departures from the paper fixed) or
            ``"reference"`` (the released code exactly, see ``docs/reference-code.md``).
        num_attentions: ``K`` maps kept by the LAS.
        embed_dim: size of each of the seven embedding heads.
        reduce_dim: size of each reduction (triplet) head.
        drop_threshold: BA-DropBlock threshold in ``(0, 1]``.
        backbone_weights: ImageNet weights of the trunk: a path to a local torchvision ResNet
            state dict, ``"imagenet"``, or a torchvision weights enum or its name (downloaded
            once into the torch hub cache, hash-checked; see
            :func:`lagnet.backbones.build_resnet`).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "resnet50",
        variant: Variant = "paper",
        num_attentions: int = 24,
        embed_dim: int = 512,
        reduce_dim: int = 256,
        drop_threshold: float = 0.5,
        backbone_weights: BackboneWeights = None,
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(embed_dim, "embed_dim")
        check_positive_int(reduce_dim, "reduce_dim")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
        split = split_resnet(backbone, backbone_weights)
        c = split.out_channels
        self.num_classes = num_classes
        self.variant: Variant = variant
        self.backbone_name = backbone
        self.out_channels = c
        self.embed_dim = embed_dim
        self.reduce_dim = reduce_dim
        self.stem = split.stem
        self.global_branch = split.branch(stride_one=False)
        self.part_branch = split.branch(stride_one=True)
        self.la_branch = split.branch(stride_one=True)
        self.las = LocalAttentionSystem(c, num_attentions)
        self.drop = BatchAttentionDropBlock(threshold=drop_threshold)
        self.global_head = MultiGranularityHead(
            c, num_classes=num_classes, num_stripes=0, embed_dim=embed_dim, reduce_dim=reduce_dim
        )
        self.part_head = MultiGranularityHead(
            c,
            num_classes=num_classes,
            num_stripes=3,
            embed_dim=embed_dim,
            reduce_dim=reduce_dim,
            stripes_from="pooled" if variant == "reference" else "map",
        )
        # keywords after the first argument: robust to the heads' argument order
        self.la_head = EmbeddingHead(c, num_classes=num_classes, embed_dim=embed_dim)
        self.la_reduction = ReductionHead(c, reduce_dim)
        self.drop_head = EmbeddingHead(c, num_classes=num_classes, embed_dim=embed_dim)
        self.drop_reduction = ReductionHead(c, reduce_dim)
        self.drop_pool: Literal["max+max", "max+avg"] = (
            "max+max" if variant == "reference" else "max+avg"
        )

    @property
    def num_attentions(self) -> int:
        """``K``, the number of selected attention maps."""
        return self.las.num_attentions

    @property
    def attention_dim(self) -> int:
        """``K*C``, the size of the attention features (for the attention-center loss)."""
        return self.las.num_attentions * self.out_channels

    @property
    def feature_dim(self) -> int:
        """Size of the embedding, ``7 * embed_dim``."""
        return len(HEAD_NAMES) * self.embed_dim

    def _check_input(self, x: Tensor) -> None:
        check_feature_map(x, "images")
        conv1 = self.stem[0]
        if isinstance(conv1, nn.Conv2d):
            check_input_dtype(x, conv1.weight.dtype, "images", "LAGNet")
        if x.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB), got shape {tuple(x.shape)}")
        if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
            raise ValueError(
                f"images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (the global branch "
                f"downsamples by 32), got {x.shape[2]}x{x.shape[3]}"
            )

    def _forward(self, x: Tensor) -> LAGNetOutput:
        shared = self.stem(x)
        g_s = self.global_branch(shared)
        p_s = self.part_branch(shared)
        la_s = self.la_branch(shared)
        las = self.las(la_s)
        d_f = self.drop(la_s, las.attention_maps)
        g_d = global_pool(d_f, self.drop_pool)
        glob = self.global_head(g_s)
        part = self.part_head(p_s)
        la = self.la_head(las.global_feature)
        drop = self.drop_head(g_d)
        features = [la.feature, drop.feature, glob.feature, part.feature]
        features.extend(part.stripe_features.unbind(1))
        logits = dict(
            zip(
                HEAD_NAMES,
                [la.logits, drop.logits, glob.logits, part.logits, *part.stripe_logits.unbind(1)],
                strict=True,
            )
        )
        triplet = {
            "global_reduced": glob.reduced,
            "part_reduced": part.reduced,
            "la_reduced": self.la_reduction(las.global_feature),
            "drop_reduced": self.drop_reduction(g_d),
        }
        if self.variant == "reference":
            triplet["part_bn"] = part.feature
        else:
            triplet["stripes_reduced"] = part.stripe_reduced.flatten(1)
        return LAGNetOutput(
            embedding=torch.cat(features, dim=1),
            logits=logits,
            triplet_features=triplet,
            attention_features=las.attention_features,
            attention_maps=las.attention_maps,
        )

    def embed(self, x: Tensor) -> Tensor:
        """The embedding ``(B, 3, H, W) -> (B, 7*embed_dim)`` in the current mode."""
        self._check_input(x)
        return self._forward(x).embedding

    def forward_train(self, x: Tensor) -> LAGNetOutput:
        """All training outputs (works in either mode; batch norm follows the mode)."""
        self._check_input(x)
        if self.training and x.shape[0] < 2:
            raise ValueError(
                f"training-mode forward needs a batch of at least 2 images (batch norm over "
                f"the batch), got batch size {x.shape[0]}; call model.eval() to embed one image"
            )
        return self._forward(x)

    def forward(self, x: Tensor) -> Tensor | LAGNetOutput:
        """Eval mode: the ``(B, 7*D)`` embedding. Training mode: a :class:`LAGNetOutput`."""
        if self.training:
            return self.forward_train(x)
        return self.embed(x)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, backbone={self.backbone_name!r}, "
            f"num_classes={self.num_classes}, num_attentions={self.num_attentions}"
        )


def build_lagnet(
    num_classes: int | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> LAGNet:
    """Build a :class:`LAGNet`, optionally loading lagnet weights strictly.

    Args:
        num_classes: training identities ``N`` (classifier size); may be left out when
            ``weights`` records it (a pretrained folder or a run checkpoint).
        weights: lagnet weights in any form (:func:`lagnet.pretrained.load_weights`): a
            pretrained folder (``model.safetensors`` + ``config.json``), a ``.safetensors``
            file with its ``config.json`` beside it, a run checkpoint of ``lagnet train``
            (``best.pth``), or a torch file holding a state dict (bare or under ``"model"``).
            The model is built from the configuration the weights record; an argument given
            here that contradicts it is a ValueError. Every missing, unexpected or mis-shaped
            key is named.
        **kwargs: the keyword arguments of :class:`LAGNet` (``backbone``, ``variant``,
            ``num_attentions``, ``embed_dim``, ``reduce_dim``, ``drop_threshold``,
            ``backbone_weights``), where their defaults live.
    """
    if weights is None:
        if num_classes is None:
            raise TypeError(
                "build_lagnet needs num_classes, or weights= that record it (a pretrained "
                "folder or a run checkpoint)"
            )
        return LAGNet(num_classes, **kwargs)
    from lagnet.pretrained import load_weights, model_from_weights

    given = kwargs if num_classes is None else {"num_classes": num_classes, **kwargs}
    return model_from_weights(load_weights(weights), **given)


def few_keys(keys: list[str], limit: int = 5) -> str:
    """``keys`` for an error message: all of them up to ``limit``, else the first ``limit``
    and how many there are (a model has hundreds of keys)."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}]" + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def load_checked(model: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """``load_state_dict`` that names the missing, unexpected or mis-shaped keys (the first
    five of each and their count)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, Tensor) and v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {few_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few_keys(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {few_keys(shapes)}")
    if problems:
        name = type(model).__name__
        raise ValueError(f"cannot load {source} into {name}: " + "; ".join(problems))
    model.load_state_dict(state)
