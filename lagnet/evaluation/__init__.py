"""Re-ID evaluation on tensors/arrays: CMC/mAP/mINP, distances, re-ranking, feature extraction.

Independent of the data loaders: everything takes distance matrices, embeddings and id arrays.
The protocols themselves are written out plainly in :mod:`lagnet.evaluation.protocol`.
"""

from __future__ import annotations

from .distance import pairwise_distance
from .extract import Features, extract_features
from .features import evaluate_features
from .metrics import evaluate_rank, mean_average_precision
from .rerank import re_ranking
from .rerank_features import iter_re_ranking_features, re_ranking_features
from .result import RankResult

__all__ = [
    "Features",
    "RankResult",
    "evaluate_features",
    "evaluate_rank",
    "extract_features",
    "iter_re_ranking_features",
    "mean_average_precision",
    "pairwise_distance",
    "re_ranking",
    "re_ranking_features",
]
