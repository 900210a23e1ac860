"""ResNet trunks split into a shared stem and per-branch copies (optionally stride-1 layer4).

The stem is ``conv1, bn1, relu, maxpool, layer1, layer2, layer3[0]``; each branch is
``Sequential(layer3[1:], layer4)``, deep-copied, with layer4's first block turned to stride 1
for the part and attention branches (its weights are unchanged: stride is not a weight).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TypeAlias

import torch
import torchvision
from torch import nn

from lagnet.checkpoint import load_state_dict_file

__all__ = ["BACKBONES", "BackboneWeights", "ResNetSplit", "build_resnet", "split_resnet"]

BackboneWeights: TypeAlias = str | os.PathLike[str] | torchvision.models.WeightsEnum | None
"""A local state-dict file, a torchvision weights enum already in the hub cache, or ``None``."""

BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

_HOW_TO_GET_WEIGHTS = (
    "lagnet never downloads weights. On a machine with internet, save the torchvision "
    "ImageNet weights, e.g. `torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V1')"
    ".state_dict(), 'resnet50.pth')` (or copy the file from ~/.cache/torch/hub/checkpoints), "
    "then pass backbone_weights='path/to/resnet50.pth'."
)


def build_resnet(name: str, weights: BackboneWeights = None) -> torchvision.models.ResNet:
    """A torchvision ResNet by name, with ImageNet weights from a local file if given.

    Args:
        name: one of :data:`BACKBONES`.
        weights: ``None`` (random init), a path to a local torchvision state dict, or a
            torchvision weights enum whose file is already in the torch hub cache.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    model: torchvision.models.ResNet = getattr(torchvision.models, name)(weights=None)
    if weights is None:
        return model
    if isinstance(weights, (str, os.PathLike)):
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"backbone_weights file not found: {str(weights)!r}. {_HOW_TO_GET_WEIGHTS}"
            )
        state = load_state_dict_file(weights, what="backbone_weights")
    elif isinstance(weights, torchvision.models.WeightsEnum):
        filename = os.path.basename(weights.url)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.is_file():
            raise FileNotFoundError(
                f"{weights} is not in the torch hub cache ({str(cached)!r}). {_HOW_TO_GET_WEIGHTS}"
            )
        state = load_state_dict_file(cached, what="backbone_weights")
    else:
        raise TypeError(
            "backbone_weights must be None, a file path or a torchvision WeightsEnum, "
            f"got {type(weights).__name__}"
        )
    _load_trunk(model, name, state)
    return model


def _load_trunk(model: torchvision.models.ResNet, name: str, state: dict[str, object]) -> None:
    """Load ``state`` (the classifier ``fc.*`` ignored), naming any key or shape mismatch."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if missing or unexpected or shapes or not_tensors:

        def some(items: list[str]) -> str:
            return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

        problems = [
            f"{label}: {some(items)}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (file vs model)", shapes),
                ("values that are not tensors", not_tensors),
            )
            if items
        ]
        raise ValueError(
            f"backbone_weights do not fit {name} (were they saved from another ResNet?); "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False)


def _stride_one(layer: nn.Module) -> nn.Module:
    layer = copy.deepcopy(layer)
    first = next(iter(layer.children()))
    for m in first.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)
    return layer


class ResNetSplit(nn.Module):
    """A ResNet's shared stem and the template of its branches.

    Attributes:
        stem: ``(B, 3, H, W) -> (B, C3, H/16, W/16)``.
        out_channels: channels of layer4 (2048 for ResNet-50, 512 for ResNet-18/34).
    """

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        layer3 = list(resnet.layer3.children())
        self.stem = nn.Sequential(
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
            resnet.layer1,
            resnet.layer2,
            layer3[0],
        )
        self._layer3_rest = nn.Sequential(*layer3[1:])
        self._layer4 = resnet.layer4
        self.out_channels: int = resnet.fc.in_features

    def branch(self, *, stride_one: bool) -> nn.Sequential:
        """A fresh copy of ``Sequential(layer3[1:], layer4)``; layer4 at stride 1 if asked."""
        layer4 = _stride_one(self._layer4) if stride_one else copy.deepcopy(self._layer4)
        return nn.Sequential(copy.deepcopy(self._layer3_rest), layer4)


def split_resnet(name: str = "resnet50", weights: BackboneWeights = None) -> ResNetSplit:
    """:func:`build_resnet`, then split into stem and branch template."""
    return ResNetSplit(build_resnet(name, weights))
