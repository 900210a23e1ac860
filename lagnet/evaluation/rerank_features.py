"""k-reciprocal re-ranking computed from the features, for galleries where the dense
query/gallery distance matrices do not fit in memory (MSMT17: 11,659 x 82,161).

The method and its numbers are those of :func:`~lagnet.evaluation.re_ranking` on the matrices
of :func:`~lagnet.evaluation.pairwise_distance` (same "original" distance: squared distances
divided by the largest squared distance of each item). What changes is where the numbers come
from: the ``N = Q + G`` items' nearest neighbours are found with an exact k-nearest-neighbour
search over blocks of rows of the (never stored) ``(N, N)`` distance matrix, on the features'
device; the sparse steps (reciprocal sets, weights, query expansion, Jaccard overlaps) run on
the host for CPU features and with torch on the GPU for CUDA features; the re-ranked
``(Q, G)`` distances are produced a block of queries at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lagnet._validation import check_positive_int

from ._kreciprocal import check_rerank_params
from ._kreciprocal_torch import FeatureDistances, TorchReRanker, smallest_stable
from .distance import Metric, check_finite_features, check_query_gallery

__all__ = ["iter_re_ranking_features", "re_ranking_features"]


def iter_re_ranking_features(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric = "euclidean",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Re-ranked distances a block of queries at a time: yields ``(start, distances)`` with
    ``distances`` ``(C, G)`` float32 for queries ``start:start + C``, on ``device``.

    Same arguments as :func:`re_ranking_features` (``chunk_size`` is ``C``, rounded up to a
    multiple of 256); the neighbour search runs when iteration starts. Feed the blocks to an
    evaluation or keep what you need of them: memory stays at one block plus the features and
    the sparse neighbour sets.
    """
    qf, gf, dtype, metric, step = check_query_gallery(
        query_features, gallery_features, metric, chunk_size
    )
    k1, k2, lambda_value = check_rerank_params(k1, k2, lambda_value, qf.shape[0], gf.shape[0])
    target = qf.device if device is None else torch.device(device)
    check_finite_features(qf, "query_features")
    check_finite_features(gf, "gallery_features")
    return rerank_blocks(
        qf.detach().to(target), gf.detach().to(target), k1, k2, lambda_value, metric, dtype, step
    )


def rerank_blocks(
    qf: torch.Tensor,
    gf: torch.Tensor,
    k1: int,
    k2: int,
    lambda_value: float,
    metric: Metric,
    dtype: torch.dtype,
    step: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The blocks of :func:`iter_re_ranking_features` from checked features and parameters
    (``step`` queries per block, a multiple of ``DEFAULT_BLOCK_ROWS``)."""
    with torch.no_grad():
        source = FeatureDistances(qf, gf, metric, dtype)
        reranker = TorchReRanker(source, k1=k1, k2=k2, lambda_value=lambda_value)
        for start in range(0, qf.shape[0], step):
            yield start, reranker.rows(start, min(qf.shape[0], start + step))


def re_ranking_features(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric = "euclidean",
    top_k: int | None = 100,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) from query and gallery features.

    The numbers of ``re_ranking(pairwise_distance(q, g), pairwise_distance(q, q),
    pairwise_distance(g, g))`` with the same ``metric``, ``k1``, ``k2`` and ``lambda_value``
    (equal within about 1e-6: the two compute the same distances with different matrix
    products), without ever holding an ``(N, N)`` or ``(Q, G)`` matrix: memory is about the
    features, ``(Q + G) * max(k1 + 1, k2)`` neighbour indices, the sparse reciprocal sets, and
    ``chunk_size x (Q + G)`` distances at a time. Runs on the features' device (or ``device``),
    the sparse steps included (on the host for the CPU).

    Args:
        query_features: ``(Q, D)`` floating-point tensor.
        gallery_features: ``(G, D)`` tensor on the same device.
        k1, k2, lambda_value: see :func:`~lagnet.evaluation.re_ranking`.
        metric: the distance the method starts from (see
            :func:`~lagnet.evaluation.pairwise_distance`).
        top_k: gallery items kept per query (``None``: all ``G``, then the result is
            ``(Q, G)``).
        chunk_size: queries per step (default 1024, rounded up to a multiple of 256).
        device: where to compute (default: the features' device).

    Returns:
        ``(distances, indices)``, both ``(Q, top_k)``: the smallest re-ranked distances of each
        query in increasing order (ties by gallery index), float32, and their gallery indices,
        int64, on the compute device.

    Raises:
        TypeError / ValueError: non-tensor or non-float features, mismatched dimensions or
            devices, NaN or infinite features, bad ``k1`` / ``k2`` / ``lambda_value`` /
            ``top_k``, or an item at distance 0 from everything.
    """
    blocks = iter_re_ranking_features(
        query_features,
        gallery_features,
        k1=k1,
        k2=k2,
        lambda_value=lambda_value,
        metric=metric,
        chunk_size=chunk_size,
        device=device,
    )
    num_gallery = gallery_features.shape[0]
    keep = num_gallery if top_k is None else min(check_positive_int(top_k, "top_k"), num_gallery)
    values: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    for _, dist in blocks:
        if keep == num_gallery:
            v, i = torch.sort(dist, dim=1, stable=True)
        else:
            i = smallest_stable(dist, keep)
            v = dist.gather(1, i)
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)
