"""Reusable LAG-Net building blocks, each usable in any CNN (module + functional form).

| module                      | function                       |
| --------------------------- | ------------------------------ |
| ``LocalAttentionSystem``    | ``local_attention_system``     |
| ``BatchAttentionDropBlock`` | ``batch_attention_drop_block`` |
| ``GlobalPool``              | ``global_pool``                |
| ``StripePool``              | ``stripe_pool``                |
"""

from __future__ import annotations

from lagnet.layers.attention import (
    LocalAttentionOutput,
    LocalAttentionSystem,
    attention_part_pool,
    local_attention_pool,
    local_attention_system,
    select_attention_maps,
    signed_sqrt_l2,
)
from lagnet.layers.dropblock import (
    BatchAttentionDropBlock,
    attention_drop_mask,
    batch_attention_drop_block,
)
from lagnet.layers.heads import (
    EmbeddingHead,
    HeadOutput,
    MultiGranularityHead,
    MultiGranularityOutput,
    ReductionHead,
)
from lagnet.layers.pooling import GlobalPool, StripePool, global_pool, stripe_pool

__all__ = [
    "BatchAttentionDropBlock",
    "EmbeddingHead",
    "GlobalPool",
    "HeadOutput",
    "LocalAttentionOutput",
    "LocalAttentionSystem",
    "MultiGranularityHead",
    "MultiGranularityOutput",
    "ReductionHead",
    "StripePool",
    "attention_drop_mask",
    "attention_part_pool",
    "batch_attention_drop_block",
    "global_pool",
    "local_attention_pool",
    "local_attention_system",
    "select_attention_maps",
    "signed_sqrt_l2",
    "stripe_pool",
]
