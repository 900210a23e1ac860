"""lagnet: LAG-Net person re-identification in PyTorch.

The top level holds the network and its three stand-alone layers; everything else lives in its
subpackage: :mod:`lagnet.layers` (all layers and their functional forms), :mod:`lagnet.losses`,
:mod:`lagnet.data`, :mod:`lagnet.evaluation`, :mod:`lagnet.engine`, :mod:`lagnet.checkpoint`,
:mod:`lagnet.export`, :mod:`lagnet.viz`. Trained models are shared as pretrained folders
(:func:`save_pretrained`, :func:`from_pretrained`, :mod:`lagnet.pretrained`).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from lagnet.layers import BatchAttentionDropBlock, LocalAttentionSystem, MultiGranularityHead
from lagnet.losses import LAGNetLoss
from lagnet.model import LAGNet, LAGNetOutput, build_lagnet
from lagnet.pretrained import from_pretrained, save_pretrained  # safetensors: imported on use
from lagnet.reference import from_reference

__version__ = "0.1.0.dev0"

__all__ = [
    "BatchAttentionDropBlock",
    "LAGNet",
    "LAGNetLoss",
    "LAGNetOutput",
    "LocalAttentionSystem",
    "MultiGranularityHead",
    "__version__",
    "build_lagnet",
    "from_pretrained",
    "from_reference",
    "save_pretrained",
]

# Names that lived at the top level in 0.1.0.dev0: they keep working for one release, with a
# DeprecationWarning that names their new import.
_MOVED: dict[str, str] = {
    **dict.fromkeys(("BACKBONES",), "lagnet.backbones"),
    **dict.fromkeys(("HEAD_NAMES", "VARIANTS"), "lagnet.model"),
    **dict.fromkeys(("load_checkpoint", "save_checkpoint"), "lagnet.checkpoint"),
    **dict.fromkeys(
        (
            "CUHK03NP",
            "MSMT17",
            "DistributedPKSampler",
            "DukeMTMCreID",
            "ImageDataset",
            "Market1501",
            "PKSampler",
            "ReIDFolder",
            "build_dataset",
            "build_transforms",
            "generate_synthetic_market",
        ),
        "lagnet.data",
    ),
    **dict.fromkeys(
        (
            "Features",
            "RankResult",
            "evaluate_features",
            "evaluate_rank",
            "extract_features",
            "mean_average_precision",
            "pairwise_distance",
            "re_ranking",
        ),
        "lagnet.evaluation",
    ),
    **dict.fromkeys(
        (
            "EmbeddingHead",
            "GlobalPool",
            "LocalAttentionOutput",
            "ReductionHead",
            "attention_drop_mask",
            "attention_part_pool",
            "batch_attention_drop_block",
            "global_pool",
            "select_attention_maps",
            "signed_sqrt_l2",
            "stripe_pool",
        ),
        "lagnet.layers",
    ),
    **dict.fromkeys(
        ("AttentionCenterLoss", "BatchHardTripletLoss", "parse_loss_spec"),
        "lagnet.losses",
    ),
}

# Names that were also renamed: old top-level name -> (new home, new name).
_RENAMED: dict[str, tuple[str, str]] = {
    "CrossEntropyLoss": ("lagnet.losses", "LabelSmoothingCrossEntropy"),
    "local_attention_pool": ("lagnet.layers", "local_attention_system"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module, new_name = _MOVED[name], name
    elif name in _RENAMED:
        module, new_name = _RENAMED[name]
    else:
        raise AttributeError(f"module 'lagnet' has no attribute {name!r}")
    warnings.warn(
        f"lagnet.{name} moved: use `from {module} import {new_name}` "
        "(the top-level name will be removed in the next release)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), new_name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
