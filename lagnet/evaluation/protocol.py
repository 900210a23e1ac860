"""The re-ID evaluation protocols, written plainly one query at a time.

This module is the specification of :func:`~lagnet.evaluation.evaluate_rank`: the fast
evaluator must give exactly the numbers of :func:`evaluate_rank_reference` (the tests check it
on many random problems, ties included), and the benchmarks use it as the baseline.

Market-1501 protocol (also DukeMTMC-reID, MSMT17), for every query:

1. sort the gallery by distance, ties broken by gallery index (a stable sort);
2. remove the gallery items with the query's person id **and** camera id (same-camera
   matches are too easy); pid-0 distractors and every other id stay in as non-matches;
3. skip the query if no item of its id is left;
4. with the 1-based ranks ``r_1 < ... < r_n`` of its ``n`` matches in that list:
   ``AP = (1 / n) * sum_k k / r_k`` (summed in rank order), ``INP = n / r_n``, and the
   query counts towards ``cmc[k]`` when ``r_1 <= k + 1``.

CUHK03 single-gallery-shot CMC (mAP and mINP as above): in each of ``num_repeats`` repeats one
image is drawn uniformly per gallery identity and the first-match rank is read in that reduced
list. Equivalently, and so it is computed: one of the query's ``n`` matches is drawn (the
``floor(pick * n)``-th in rank order), and every other identity ``p`` precedes it when its
drawn image is one of the ``b_p`` images of ``p`` ranked before that match, which happens with
probability ``b_p / n_p`` (``n_p`` images of ``p``); the draw is ``u_p * n_p < b_p`` with
``u_p`` from a counter-based stream keyed by the repeat and ``p``'s index among the sorted
gallery ids. The rank is one plus the number of identities that precede the match.
"""

from __future__ import annotations

import numpy as np
import torch

from lagnet._validation import check_positive_int

from ._shared import (
    ArrayOrTensor,
    CmcMode,
    IdsLike,
    as_ids,
    check_cmc_options,
    check_distmat,
    check_generator,
    cuhk03_draws,
    first_nan_message,
    rows_as_numpy,
    splitmix64,
)
from .result import RankResult

__all__ = ["evaluate_rank_reference"]


def evaluate_rank_reference(
    distmat: ArrayOrTensor,
    q_pids: IdsLike,
    g_pids: IdsLike,
    q_camids: IdsLike,
    g_camids: IdsLike,
    *,
    max_rank: int = 50,
    cmc_mode: CmcMode = "market",
    num_repeats: int = 10,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> RankResult:
    """The protocols above, one query at a time: slow, and the reference for
    :func:`~lagnet.evaluation.evaluate_rank`, which takes the same arguments and gives the same
    :class:`~lagnet.evaluation.RankResult` bit for bit."""
    num_query, num_gallery = check_distmat(distmat)
    dist = rows_as_numpy(distmat, 0, num_query)
    qp, qc = as_ids(q_pids, "q_pids", num_query), as_ids(q_camids, "q_camids", num_query)
    gp, gc = as_ids(g_pids, "g_pids", num_gallery), as_ids(g_camids, "g_camids", num_gallery)
    max_rank = check_positive_int(max_rank, "max_rank")
    mode, repeats = check_cmc_options(cmc_mode, num_repeats)
    generator = check_generator(generator)
    if dist.dtype.kind == "f" and np.isnan(dist).any():
        row, col = np.argwhere(np.isnan(dist))[0]
        raise ValueError(first_nan_message(int(row), int(col)))
    if mode == "cuhk03":
        pick, stream = cuhk03_draws(num_query, repeats, seed, generator)
    gallery_ids, id_index, id_sizes = np.unique(gp, return_inverse=True, return_counts=True)

    ap = np.full(num_query, np.nan)
    inp = np.full(num_query, np.nan)
    first_rank_counts = np.zeros(max_rank + 1, dtype=np.int64)  # last bin: beyond max_rank
    for q in range(num_query):
        order = np.argsort(dist[q], kind="stable")
        keep = ~((gp[order] == qp[q]) & (gc[order] == qc[q]))
        ranked = order[keep]
        is_match = gp[ranked] == qp[q]
        match_ranks = np.flatnonzero(is_match) + 1
        if match_ranks.size == 0:
            continue
        total = 0.0
        for k, rank in enumerate(match_ranks.tolist(), start=1):
            total += k / rank
        ap[q] = total / match_ranks.size
        inp[q] = match_ranks.size / match_ranks[-1]
        if mode == "market":
            first_rank_counts[min(int(match_ranks[0]) - 1, max_rank)] += 1
            continue
        for r in range(repeats):
            n = match_ranks.size
            match = int(match_ranks[min(int(np.floor(pick[q, r] * n)), n - 1)])
            before = ranked[: match - 1][~is_match[: match - 1]]  # other ids ranked before it
            b = np.bincount(id_index[before], minlength=gallery_ids.size)
            u = splitmix64(
                np.full(gallery_ids.size, stream[q, r]),
                np.arange(gallery_ids.size, dtype=np.uint64),
            )
            rank = 1 + int(np.count_nonzero(u * id_sizes < b))
            first_rank_counts[min(rank - 1, max_rank)] += 1

    valid = ~np.isnan(ap)
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "no query has a valid match: for every query, all gallery items of its id are "
            "from the query's own camera or the id is absent from the gallery"
        )
    draws = num_valid * (repeats if mode == "cuhk03" else 1)
    longest = gallery_ids.size if mode == "cuhk03" else num_gallery
    cmc = np.cumsum(first_rank_counts[:max_rank]) / draws
    for array in (cmc, ap, inp):
        array.flags.writeable = False
    return RankResult(
        mAP=float(np.mean(ap[valid])),
        cmc=cmc,
        mINP=float(np.mean(inp[valid])),
        num_valid_queries=num_valid,
        ap=ap,
        inp=inp,
        cmc_padded=max_rank > longest,
        cmc_mode=mode,
    )
