"""Evaluation straight from query and gallery embeddings, memory-bounded at any gallery size."""

from __future__ import annotations

import torch

from ._accumulate import make_accumulator
from ._kreciprocal import check_rerank_params
from ._shared import CmcMode, IdsLike
from .distance import (
    DEFAULT_BLOCK_ROWS,
    DistanceBlocks,
    Metric,
    check_finite_features,
    check_query_gallery,
)
from .rerank_features import rerank_blocks
from .result import RankResult

__all__ = ["evaluate_features"]


def evaluate_features(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    q_pids: IdsLike,
    g_pids: IdsLike,
    q_camids: IdsLike,
    g_camids: IdsLike,
    *,
    metric: Metric = "euclidean",
    max_rank: int = 50,
    rerank: bool = False,
    chunk_size: int | None = None,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    cmc_mode: CmcMode = "market",
    num_repeats: int = 10,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> RankResult:
    """Evaluate query/gallery embeddings without building the whole distance matrix.

    Distances are computed for ``chunk_size`` queries at a time and ranked immediately, so
    memory stays at about ``chunk_size x G`` distances on top of the features (a few hundred MB
    for MSMT17's 11,659 x 82,161 with the default). The per-row distances are computed in fixed
    256-row blocks, so the metrics are exactly the same for every ``chunk_size`` and equal to
    ``evaluate_rank(pairwise_distance(q, g, metric=metric), ...)``. CUDA features are
    evaluated on their device, with the CPU's numbers.

    Args:
        query_features: ``(Q, D)`` floating-point tensor (CPU or CUDA), finite.
        gallery_features: ``(G, D)`` tensor on the same device.
        q_pids, q_camids: ``(Q,)`` integer ids / cameras; ``g_pids``, ``g_camids``: ``(G,)``.
        metric: see :func:`~lagnet.evaluation.pairwise_distance`.
        max_rank, cmc_mode, num_repeats, seed, generator: see
            :func:`~lagnet.evaluation.evaluate_rank`.
        rerank: apply k-reciprocal re-ranking (``k1``, ``k2``, ``lambda_value``) first,
            computed from the features by :func:`~lagnet.evaluation.iter_re_ranking_features`
            (the numbers of :func:`~lagnet.evaluation.re_ranking` on the dense matrices,
            within about 1e-6) without any ``(N, N)`` matrix, so it works at MSMT17 size.
        chunk_size: queries per step (default 1024), rounded up to a multiple of 256.

    Returns:
        a :class:`~lagnet.evaluation.RankResult`.

    Raises:
        TypeError / ValueError: bad features (NaN or inf entries named as such), ids or options.
    """
    qf, gf, dtype, metric, step = check_query_gallery(
        query_features, gallery_features, metric, chunk_size
    )
    num_query, num_gallery = qf.shape[0], gf.shape[0]
    acc = make_accumulator(
        num_query,
        num_gallery,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank=max_rank,
        cmc_mode=cmc_mode,
        num_repeats=num_repeats,
        seed=seed,
        generator=generator,
    )
    check_finite_features(qf, "query_features")
    check_finite_features(gf, "gallery_features")
    if rerank:
        k1, k2, lambda_value = check_rerank_params(k1, k2, lambda_value, num_query, num_gallery)
        blocks = rerank_blocks(qf.detach(), gf.detach(), k1, k2, lambda_value, metric, dtype, step)
        for start, dist in blocks:
            acc.add(start, dist)
        return acc.result()

    with torch.no_grad():
        distances = DistanceBlocks(gf, metric, dtype)
        for start in range(0, num_query, step):
            stop = min(num_query, start + step)
            chunk = torch.empty((stop - start, num_gallery), dtype=dtype, device=qf.device)
            for b in range(start, stop, DEFAULT_BLOCK_ROWS):
                chunk[b - start : b - start + DEFAULT_BLOCK_ROWS] = distances(
                    qf[b : b + DEFAULT_BLOCK_ROWS]
                )
            acc.add(start, chunk)
            del chunk
    return acc.result()
