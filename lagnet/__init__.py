"""lagnet: LAG-Net person re-identification in PyTorch.

Stand-alone layers (:class:`LocalAttentionSystem`, :class:`BatchAttentionDropBlock`,
:class:`MultiGranularityHead`), the full network (:func:`build_lagnet`), its losses, and
:func:`from_reference` for checkpoints of the authors' released code.
"""

from __future__ import annotations

from lagnet.backbones import BACKBONES
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
    "HEAD_NAMES",
    "VARIANTS",
    "AttentionCenterLoss",
    "BatchAttentionDropBlock",
    "BatchHardTripletLoss",
    "CrossEntropyLoss",
    "EmbeddingHead",
    "GlobalPool",
    "LAGNet",
    "LAGNetLoss",
    "LAGNetOutput",
    "LocalAttentionOutput",
    "LocalAttentionSystem",
    "MultiGranularityHead",
    "ReductionHead",
    "__version__",
    "attention_drop_mask",
    "attention_part_pool",
    "batch_attention_drop_block",
    "build_lagnet",
    "from_reference",
    "global_pool",
    "local_attention_pool",
    "parse_loss_spec",
    "select_attention_maps",
    "signed_sqrt_l2",
    "stripe_pool",
]
