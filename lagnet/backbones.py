"""ResNet trunks split into a shared stem and per-branch copies (optionally stride-1 layer4).

The stem is ``conv1, bn1, relu, maxpool, layer1, layer2, layer3[0]``; each branch is
``Sequential(layer3[1:], layer4)``, deep-copied, with layer4's first block turned to stride 1
for the part and attention branches (its weights are unchanged: stride is not a weight).

ImageNet weights come from a local state-dict file or from torchvision's weights enums
(``"imagenet"``, ``"IMAGENET1K_V2"``, ``ResNet50_Weights.DEFAULT``, ...): downloaded once into
the torch hub cache by :func:`download_weights`, their hash checked on download and on every use.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from lagnet.checkpoint import load_state_dict_file

__all__ = [
    "BACKBONES",
    "IMAGENET",
    "BackboneWeights",
    "ResNetSplit",
    "build_resnet",
    "download_weights",
    "resolve_backbone_weights",
    "split_resnet",
]

BackboneWeights: TypeAlias = str | os.PathLike[str] | torchvision.models.WeightsEnum | None
"""A local state-dict file, ``"imagenet"``, a torchvision weights enum or its name, or ``None``."""

BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

IMAGENET = "imagenet"
"""The name of torchvision's ``IMAGENET1K_V1`` weights of every ResNet: the weights that
``pretrained=True`` loaded in the released code, the paper's initialisation."""

_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torchvision's convention: name-<sha256 prefix>.pth
_ENUM_NAME = re.compile(r"(?:(\w+_Weights)\.)?([A-Z][A-Z0-9_]*)")
_CHUNK = 1 << 20

_HOW_TO_GET_WEIGHTS = (
    "Pass backbone_weights='imagenet' (--backbone-weights imagenet) to download torchvision's "
    "ImageNet weights once into the torch hub cache, or, on a machine with internet, save them "
    "with `torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), "
    "'resnet50.pth')` (or copy the file from ~/.cache/torch/hub/checkpoints) and pass "
    "backbone_weights='path/to/resnet50.pth'."
)


def resolve_backbone_weights(
    name: str, weights: BackboneWeights
) -> torchvision.models.WeightsEnum | Path | None:
    """What ``weights`` means for the backbone ``name``; never touches the network.

    ``"imagenet"`` (any case) is torchvision's ``IMAGENET1K_V1``; a member name of the
    backbone's weights enum (``"IMAGENET1K_V2"``, ``"DEFAULT"``, or qualified as
    ``"ResNet50_Weights.IMAGENET1K_V2"``) is that member; any other string or path is a local
    file (write ``./DEFAULT`` for a file so named). Only a name that looks like a member
    (capitals, digits, ``_``) but is none is checked on disk, to refuse it by name.

    Raises:
        ValueError: unknown backbone, or an enum (or qualified name) of another backbone.
        TypeError: ``weights`` of another type.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    if weights is None:
        return None
    enum_class: Any = torchvision.models.get_model_weights(name)
    if isinstance(weights, torchvision.models.WeightsEnum):
        if not isinstance(weights, enum_class):
            raise ValueError(
                f"backbone_weights {weights!r} are not weights of {name} "
                f"(expected a member of {enum_class.__name__})"
            )
        return weights
    if isinstance(weights, str):
        if weights.lower() == IMAGENET:
            return enum_class["IMAGENET1K_V1"]
        match = _ENUM_NAME.fullmatch(weights)
        if match is not None:
            qualifier, member = match.groups()
            if qualifier is not None and qualifier != enum_class.__name__:
                raise ValueError(
                    f"backbone_weights {weights!r} are not weights of {name} "
                    f"(its weights are {enum_class.__name__}.*)"
                )
            if member in enum_class.__members__:
                return enum_class[member]
            if qualifier is not None or not Path(weights).exists():
                raise ValueError(
                    f"backbone_weights {weights!r} is neither a file nor a member of "
                    f"{enum_class.__name__}; expected 'imagenet', one of "
                    f"{', '.join(enum_class.__members__)}, or a file path"
                )
    if isinstance(weights, (str, os.PathLike)):
        return Path(weights)
    raise TypeError(
        "backbone_weights must be None, 'imagenet', a torchvision weights enum or its name, or "
        f"a file path, got {type(weights).__name__}"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(weights: torchvision.models.WeightsEnum, *, progress: bool = True) -> Path:
    """The file of a torchvision weights enum in the torch hub cache, downloaded if absent.

    The cache is ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``), as for
    torchvision itself. The file's SHA-256 must start with the hash in its name (torchvision's
    ``name-<hash>.pth`` convention), on download and on every later use. Unlike
    ``torch.hub.load_state_dict_from_url``, which deletes a download whose hash does not match
    and never checks a file already in the cache, a file that does not match is refused and
    kept where it is: a bad download as ``<name>.corrupt`` beside the cache entry, a bad
    cache entry in place (delete it to download again).

    Raises:
        OSError: the download failed (offline, bad URL); the message names the URL, the cache
            path where the file is expected, and the local-file alternative.
        ValueError: the file's hash does not match its name.
    """
    url = str(weights.url)
    filename = os.path.basename(urlparse(url).path)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    cached = folder / filename
    match = _HASH_IN_NAME.search(filename)
    expected = match.group(1) if match else None
    local = "pass backbone_weights=PATH (--backbone-weights PATH) with a local copy of the file"
    if cached.is_file():
        if expected is not None:
            actual = _sha256(cached)
            if not actual.startswith(expected):
                raise ValueError(
                    f"refusing {weights!r} in the torch hub cache: {str(cached)!r} has SHA-256 "
                    f"{actual}, but its name expects {expected}... (a corrupt or replaced file); "
                    "it is left where it is: delete it to download it again from "
                    f"{url}, or {local}"
                )
        return cached
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"cannot create the torch hub cache folder {str(folder)!r} for {weights!r} "
            f"({err.strerror or err}); set TORCH_HOME to a writable folder, or {local}"
        ) from err
    partial = folder / f".{filename}.{uuid.uuid4().hex}.download"
    if progress:
        print(f"downloading {url} to {str(cached)!r}", file=sys.stderr, flush=True)
    try:
        torch.hub.download_url_to_file(url, str(partial), None, progress=progress)
    except (OSError, ValueError) as err:
        partial.unlink(missing_ok=True)
        reason = " ".join(str(getattr(err, "reason", None) or err).split())
        raise OSError(
            f"cannot download {weights!r} from {url} ({reason}); it is expected in the torch "
            f"hub cache at {str(cached)!r} (TORCH_HOME): put the file there, or {local}"
        ) from err
    if expected is not None:
        actual = _sha256(partial)
        if not actual.startswith(expected):
            corrupt = folder / f"{filename}.corrupt"
            os.replace(partial, corrupt)
            raise ValueError(
                f"refusing the download of {weights!r} from {url}: its SHA-256 is {actual}, "
                f"but the file name expects {expected}...; the download is kept at "
                f"{str(corrupt)!r} and nothing was put in the cache. Try again, or {local}"
            )
    os.replace(partial, cached)
    return cached


def build_resnet(
    name: str, weights: BackboneWeights = None, *, progress: bool = True
) -> torchvision.models.ResNet:
    """A torchvision ResNet by name, with ImageNet weights if asked.

    Args:
        name: one of :data:`BACKBONES`.
        weights: ``None`` (random init), a path to a local torchvision state dict,
            ``"imagenet"``, or a torchvision weights enum or its name (see
            :func:`resolve_backbone_weights`); enum weights come through
            :func:`download_weights` (downloaded once, hash-checked).
        progress: show a progress bar while downloading.
    """
    resolved = resolve_backbone_weights(name, weights)
    model: torchvision.models.ResNet = getattr(torchvision.models, name)(weights=None)
    if resolved is None:
        return model
    if isinstance(resolved, Path):
        if not resolved.is_file():
            raise FileNotFoundError(
                f"backbone_weights file not found: {str(weights)!r}. {_HOW_TO_GET_WEIGHTS}"
            )
        state = load_state_dict_file(resolved, what="backbone_weights")
    else:
        state = load_state_dict_file(
            download_weights(resolved, progress=progress), what=f"backbone_weights {resolved!r}"
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
