"""Named training recipes shared by ``lagnet train`` and ``examples/train.py``.

A preset fills every training setting the command line leaves out: ``demo`` (the CPU demo on
the synthetic dataset, minutes), ``tiny`` (seconds, used by the tests) and ``reference`` (the
paper's Market-1501 recipe, docs/reference-code.md section 7, from torchvision's ImageNet
weights: ``backbone_weights="imagenet"``, downloaded once into the torch hub cache).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "SYNTHETIC_SIZES"]

SYNTHETIC_SIZES: dict[str, dict[str, int]] = {
    "default": {},
    "tiny": {
        "num_train_ids": 8,
        "num_test_ids": 8,
        "images_per_id_per_cam": 2,
        "num_cameras": 2,
        "num_distractors": 4,
        "num_junk": 2,
    },
}
"""Keyword arguments of :func:`lagnet.data.generate_synthetic_market` per synthetic size."""

PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(backbone="resnet18", backbone_weights=None, height=64, width=32, epochs=20,
                 P=8, K=4, lr=1e-3, weight_decay=5e-4, milestones=[15], warmup=2, eval_every=10,
                 num_attentions=16, synthetic="default", dataset="synthetic"),
    "tiny": dict(backbone="resnet18", backbone_weights=None, height=64, width=32, epochs=2,
                 P=2, K=2, lr=1e-3, weight_decay=5e-4, milestones=[], warmup=0, eval_every=1,
                 num_attentions=4, synthetic="tiny", dataset="synthetic"),
    "reference": dict(backbone="resnet50", backbone_weights="imagenet", height=384, width=128,
                      epochs=600, P=8, K=4, lr=2e-4, weight_decay=5e-4,
                      milestones=[320, 380, 420], warmup=0, eval_every=50, num_attentions=24,
                      synthetic="default", dataset="market1501"),
}  # fmt: skip
"""Training settings per preset name; any command-line flag overrides its entry."""
