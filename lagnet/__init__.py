"""lagnet: LAG-Net person re-identification in PyTorch.

Stand-alone layers (:class:`LocalAttentionSystem`, :class:`BatchAttentionDropBlock`,
:class:`MultiGranularityHead`), the full network (:func:`build_lagnet`), its losses, and
:func:`from_reference` for checkpoints of the authors' released code.
"""

from __future__ import annotations

from lagnet.backbones import BACKBONES
from lagnet.checkpoint import load_checkpoint, save_checkpoint
from lagnet.data import (
    CUHK03NP,
    MSMT17,
    DistributedPKSampler,
    DukeMTMCreID,
    ImageDataset,
    Market1501,
    PKSampler,
    ReIDFolder,
    build_dataset,
    build_transforms,
    generate_synthetic_market,
)
from lagnet.evaluation import (
    Features,
    RankResult,
    evaluate_features,
    evaluate_rank,
    extract_features,
    mean_average_precision,
    pairwise_distance,
    re_ranking,
)
from lagnet.layers import (
    BatchAttentionDropBlock,
    EmbeddingHead,
    GlobalPool,
    LocalAttentionOutput,
    LocalAttentionSystem,
    MultiGranularityHead,
    ReductionHead,
    attention_drop_mask,
    attention_part_pool,
    batch_attention_drop_block,
    global_pool,
    local_attention_pool,
    select_attention_maps,
    signed_sqrt_l2,
    stripe_pool,
)
from lagnet.losses import (
    AttentionCenterLoss,
    BatchHardTripletLoss,
    CrossEntropyLoss,
    LAGNetLoss,
    parse_loss_spec,
)
from lagnet.model import HEAD_NAMES, VARIANTS, LAGNet, LAGNetOutput, build_lagnet
from lagnet.reference import from_reference

__version__ = "0.1.0.dev0"

__all__ = [
    "BACKBONES",
    "CUHK03NP",
    "HEAD_NAMES",
    "MSMT17",
    "VARIANTS",
    "AttentionCenterLoss",
    "BatchAttentionDropBlock",
    "BatchHardTripletLoss",
    "CrossEntropyLoss",
    "DistributedPKSampler",
    "DukeMTMCreID",
    "EmbeddingHead",
    "Features",
    "GlobalPool",
    "ImageDataset",
    "LAGNet",
    "LAGNetLoss",
    "LAGNetOutput",
    "LocalAttentionOutput",
    "LocalAttentionSystem",
    "Market1501",
    "MultiGranularityHead",
    "PKSampler",
    "RankResult",
    "ReIDFolder",
    "ReductionHead",
    "__version__",
    "attention_drop_mask",
    "attention_part_pool",
    "batch_attention_drop_block",
    "build_dataset",
    "build_lagnet",
    "build_transforms",
    "evaluate_features",
    "evaluate_rank",
    "extract_features",
    "from_reference",
    "generate_synthetic_market",
    "global_pool",
    "load_checkpoint",
    "local_attention_pool",
    "mean_average_precision",
    "pairwise_distance",
    "parse_loss_spec",
    "re_ranking",
    "save_checkpoint",
    "select_attention_maps",
    "signed_sqrt_l2",
    "stripe_pool",
]
