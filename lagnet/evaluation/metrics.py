"""Ranking metrics for re-identification: CMC, mAP and mINP.

:func:`evaluate_rank` follows the protocols stated (and implemented plainly) in
:mod:`lagnet.evaluation.protocol`; it ranks blocks of queries at a time with a vectorised
NumPy evaluator, or on the GPU with torch when given a CUDA tensor, and gives the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from . import _shared
from ._accumulate import make_accumulator
from ._shared import ArrayOrTensor, BoolArray, CmcMode, IdsLike, check_distmat
from .result import RankResult

__all__ = ["RankResult", "evaluate_rank", "mean_average_precision"]


def evaluate_rank(
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
    """Standard re-ID evaluation (CMC, mAP, mINP) of a query-gallery distance matrix.

    Args:
        distmat: ``(Q, G)`` distances, smaller is more similar; a NumPy array or a torch tensor
            (CPU or CUDA; it is read block by block, and a CUDA tensor is ranked on its device
            with exactly the CPU's numbers). Real dtypes only, no NaN.
        q_pids, q_camids: ``(Q,)`` integer person / camera ids of the queries.
        g_pids, g_camids: ``(G,)`` integer person / camera ids of the gallery.
        max_rank: length of the returned CMC curve (``>= 1``). It may exceed the gallery size:
            the curve is then padded with its last value and ``cmc_padded`` is set.
        cmc_mode: ``"market"`` (all gallery images ranked, the Market-1501 / DukeMTMC / MSMT17
            protocol) or ``"cuhk03"``: the classic single-gallery-shot CMC, where for each
            query and each of ``num_repeats`` repeats one image per gallery identity is drawn
            uniformly among the query's valid gallery images and the first-match rank is taken
            in that reduced list; the CMC is averaged over repeats and queries. mAP and mINP
            are computed the standard way (whole gallery) in both modes.
        num_repeats: repeats of the CUHK03 sampling (ignored in ``"market"`` mode).
        seed: seed of the CUHK03 sampling when no ``generator`` is given, so the default call
            is reproducible.
        generator: a CPU ``torch.Generator`` to draw the CUHK03 sampling from (overrides
            ``seed``). The results depend only on the inputs and the generator state, not on
            block sizes.

    Returns:
        a :class:`RankResult`; queries with no correct match left after removing the gallery
        items of the same id and camera are skipped (NaN in ``ap`` / ``inp``).

    Raises:
        TypeError: wrong input types or dtypes.
        ValueError: bad shapes or lengths, NaN distances, ``max_rank < 1``, an empty query set
            or gallery, an unknown ``cmc_mode``, or when no query has a valid match.
    """
    num_query, num_gallery = check_distmat(distmat)
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
    rows_per_step = max(1, (4 * _shared.BLOCK_ELEMENTS) // num_gallery)
    for start in range(0, num_query, rows_per_step):
        stop = min(num_query, start + rows_per_step)
        if isinstance(distmat, torch.Tensor) and distmat.device.type != "cpu":
            acc.add(start, distmat[start:stop])  # ranked on its device
        else:
            acc.add(start, _shared.rows_as_numpy(distmat, start, stop))
    return acc.result()


def mean_average_precision(
    matches: ArrayOrTensor,
    *,
    keep: ArrayOrTensor | None = None,
) -> float:
    """Mean average precision of rankings you computed yourself.

    Args:
        matches: ``(Q, N)`` boolean (or 0/1 integer) matrix in ranked order: ``matches[i, r]``
            says whether the item query ``i`` ranked at position ``r`` (0-based) is a correct
            match.
        keep: optional ``(Q, N)`` boolean mask in the same order; items with ``False`` are
            removed from the list before computing precision (e.g. same id and same camera as
            the query, or junk). By default every item counts.

    Returns:
        the mean over queries of the non-interpolated AP (mean of the precision at each correct
        match), skipping queries without a correct match. It equals
        ``evaluate_rank(...).mAP`` for the same ranking, bit for bit.

    Raises:
        ValueError: if the shapes disagree, ``matches`` is not 2-D, values are not 0/1, or no
            query has a correct match.
    """
    hits = _as_bool_matrix(matches, "matches")
    if keep is not None:
        kept = _as_bool_matrix(keep, "keep")
        if kept.shape != hits.shape:
            raise ValueError(
                f"keep has shape {tuple(kept.shape)}, expected the shape of matches "
                f"{tuple(hits.shape)}"
            )
    num_query, length = hits.shape
    if length == 0:
        raise ValueError(f"no query has a correct match: matches has shape {hits.shape}")
    aps = np.full(num_query, np.nan)
    rows_per_step = max(1, _shared.BLOCK_ELEMENTS // max(1, length))
    for a in range(0, num_query, rows_per_step):
        h = hits[a : a + rows_per_step]
        if keep is None:
            position = np.broadcast_to(np.arange(1, length + 1), h.shape)
        else:
            k = kept[a : a + rows_per_step]
            h = h & k
            position = np.cumsum(k, axis=1)  # 1-based rank among the kept items
        count = np.cumsum(h, axis=1)
        num_hits = count[:, -1]
        precision = np.where(h, count / np.maximum(position, 1), 0.0)
        has = num_hits > 0
        aps[a : a + h.shape[0]][has] = np.cumsum(precision[has], axis=1)[:, -1] / num_hits[has]
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("no query has a correct match in matches (after applying keep)")
    return float(np.mean(aps[valid]))


def _as_bool_matrix(values: ArrayOrTensor, name: str) -> BoolArray:
    if isinstance(values, torch.Tensor):
        arr: npt.NDArray[Any] = values.detach().cpu().numpy()
    elif isinstance(values, np.ndarray):
        arr = values
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(values)}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_query, list_length), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"empty query set: {name} has shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be boolean or 0/1 integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(
            f"{name} must only contain 0 and 1, got values in [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.bool_)
