"""Re-ID evaluation on tensors/arrays: CMC/mAP/mINP, distances, re-ranking, feature extraction.

Independent of the data loaders: everything takes distance matrices, embeddings and id arrays.
"""

from __future__ import annotations

from .distance import evaluate_features, pairwise_distance
from .extract import Features, extract_features
from .metrics import RankResult, evaluate_rank, mean_average_precision
from .rerank import re_ranking

__all__ = [
    "Features",
    "RankResult",
    "evaluate_features",
    "evaluate_rank",
    "extract_features",
    "mean_average_precision",
    "pairwise_distance",
    "re_ranking",
]
