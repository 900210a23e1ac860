"""Per-query metrics summed over blocks of distance rows (internal; shared by
:func:`~lagnet.evaluation.evaluate_rank`, :func:`~lagnet.evaluation.evaluate_features` and the
re-ranking from features).

A block of rows is ranked by the NumPy evaluator (:mod:`._fast_rank`), or on its device by
torch (:mod:`._torch_rank`) when the block is a tensor that is not on the CPU; both give the
same match ranks, and everything after the ranks is computed here, on the host.

Per-query AP sums the precisions left to right in rank order, so it is bit-for-bit the value of
:func:`~lagnet.evaluation.protocol.evaluate_rank_reference`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from lagnet._validation import check_positive_int

from . import _shared
from ._fast_rank import BlockRanks, Gallery, rank_block
from ._shared import (
    CmcMode,
    FloatArray,
    IdsLike,
    IntArray,
    as_ids,
    check_cmc_options,
    check_generator,
    cuhk03_draws,
    first_nan_message,
    splitmix64,
)
from ._torch_rank import DeviceGallery, rank_block_torch
from .result import RankResult

__all__ = ["RankAccumulator", "make_accumulator"]

Backend = Literal["auto", "numpy", "torch"]


def _ap_inp_first(ranks: BlockRanks) -> tuple[FloatArray, FloatArray, IntArray]:
    """Per-row AP, INP and first-match rank (NaN / 0 for rows without a match)."""
    num_matches = ranks.num_matches
    num_rows = num_matches.size
    valid = num_matches > 0
    ap = np.full(num_rows, np.nan)
    inp = np.full(num_rows, np.nan)
    first = np.zeros(num_rows, dtype=np.int64)
    if not valid.any():
        return ap, inp, first
    offsets = np.cumsum(num_matches) - num_matches
    match_row = np.repeat(np.arange(num_rows), num_matches)
    k = np.arange(ranks.match_rank.size) - offsets[match_row]  # 0-based index among matches
    # precision at the k-th match is (k + 1) / rank; summed left to right in rank order.
    precision = np.zeros((num_rows, int(num_matches.max())))
    precision[match_row, k] = (k + 1) / ranks.match_rank
    ap[valid] = np.cumsum(precision[valid], axis=1)[:, -1] / num_matches[valid]
    last = ranks.match_rank[offsets[valid] + num_matches[valid] - 1]
    inp[valid] = num_matches[valid] / last
    first[valid] = ranks.match_rank[offsets[valid]]
    return ap, inp, first


def _cuhk03_histogram(
    ranks: BlockRanks,
    gallery: Gallery,
    pick: FloatArray,
    seeds: npt.NDArray[np.uint64],
    max_rank: int,
) -> IntArray:
    """Histogram of single-gallery-shot first-match ranks (clipped at ``max_rank``) over the
    valid rows of a block and ``pick.shape[1]`` repeats.

    In each repeat every gallery identity contributes one image drawn uniformly among its valid
    ones. Given the drawn match ``m`` of the query's own identity, identity ``p`` ranks before it
    exactly when its drawn image is one of the ``b_p`` images of ``p`` ranked before ``m``, which
    happens with probability ``b_p / n_p`` independently for each ``p``; the rank is one plus the
    number of such identities. ``pick`` ``(C, R)`` holds uniforms choosing ``m``; the Bernoulli
    draws come from a counter-based stream keyed by ``seeds`` ``(C, R)`` and the identity, so they
    do not depend on how the queries were split into blocks.
    """
    num_matches = ranks.num_matches
    num_rows = num_matches.size
    valid = num_matches > 0
    hist = np.zeros(max_rank + 1, dtype=np.int64)
    if not valid.any():
        return hist
    num_ids = gallery.counts.size
    offsets = np.cumsum(num_matches) - num_matches
    non_match = ~ranks.cand_is_match
    nm_row = ranks.cand_row[non_match]
    nm_rank = ranks.cand_rank[non_match]
    nm_key = nm_row * num_ids + ranks.cand_group[non_match]
    valid_rows = np.flatnonzero(valid)
    for r in range(pick.shape[1]):
        chosen = np.minimum(
            np.floor(pick[valid_rows, r] * num_matches[valid_rows]).astype(np.int64),
            num_matches[valid_rows] - 1,
        )
        match_rank = np.zeros(num_rows, dtype=np.int64)
        match_rank[valid_rows] = ranks.match_rank[offsets[valid_rows] + chosen]
        before = nm_rank < match_rank[nm_row]
        counts = np.bincount(nm_key[before], minlength=num_rows * num_ids)
        keys = np.flatnonzero(counts)
        key_row = keys // num_ids
        key_group = keys - key_row * num_ids
        uniform = splitmix64(seeds[key_row, r], key_group.astype(np.uint64))
        ahead = uniform * gallery.counts[key_group] < counts[keys]
        rank = 1 + np.bincount(key_row[ahead], minlength=num_rows)
        hist += np.bincount(np.minimum(rank[valid_rows] - 1, max_rank), minlength=max_rank + 1)
    return hist


class RankAccumulator:
    """Accumulates per-query results over blocks of distance rows.

    ``backend``: ``"auto"`` ranks NumPy arrays and CPU tensors with NumPy and other tensors on
    their device with torch; ``"numpy"`` / ``"torch"`` force one path (tests compare them).
    """

    def __init__(
        self,
        q_pids: IntArray,
        q_camids: IntArray,
        g_pids: IntArray,
        g_camids: IntArray,
        *,
        max_rank: int,
        cmc_mode: CmcMode,
        num_repeats: int,
        seed: int,
        generator: torch.Generator | None,
        backend: Backend = "auto",
    ) -> None:
        self.q_pids = q_pids
        self.q_camids = q_camids
        self.gallery = Gallery.build(g_pids, g_camids)
        self.max_rank = max_rank
        self.cmc_mode: CmcMode = cmc_mode
        self.backend = backend
        num_query = q_pids.size
        self.ap = np.full(num_query, np.nan)
        self.inp = np.full(num_query, np.nan)
        self.first = np.zeros(num_query, dtype=np.int64)
        self.cuhk03_hist = np.zeros(max_rank + 1, dtype=np.int64)
        self.num_repeats = num_repeats
        self.pick = np.zeros((0, 0))
        self.seeds = np.zeros((0, 0), dtype=np.uint64)
        if cmc_mode == "cuhk03":
            self.pick, self.seeds = cuhk03_draws(num_query, num_repeats, seed, generator)
        self._device_gallery: DeviceGallery | None = None

    def _use_torch(self, dist: npt.NDArray[Any] | torch.Tensor) -> bool:
        if not isinstance(dist, torch.Tensor):
            return False
        return self.backend == "torch" or (self.backend == "auto" and dist.device.type != "cpu")

    def _ranks_torch(self, block: torch.Tensor, lo: int, hi: int) -> BlockRanks:
        if block.is_floating_point() and bool(torch.isnan(block).any()):
            row, col = torch.isnan(block).nonzero()[0].tolist()
            raise ValueError(first_nan_message(lo + row, col))
        device = block.device
        if self._device_gallery is None or self._device_gallery.device != device:
            self._device_gallery = DeviceGallery(self.gallery, device)
        return rank_block_torch(
            block.detach(),
            torch.from_numpy(self.q_pids[lo:hi]).to(device),
            torch.from_numpy(self.q_camids[lo:hi]).to(device),
            self._device_gallery,
            need_candidates=self.cmc_mode == "cuhk03",
        )

    def _ranks_numpy(self, block: npt.NDArray[Any], lo: int, hi: int) -> BlockRanks:
        if block.dtype.kind == "f" and np.isnan(block.min()):
            row, col = np.argwhere(np.isnan(block))[0]
            raise ValueError(first_nan_message(lo + int(row), int(col)))
        return rank_block(
            block,
            self.q_pids[lo:hi],
            self.q_camids[lo:hi],
            self.gallery,
            need_candidates=self.cmc_mode == "cuhk03",
        )

    def add(self, start: int, dist: npt.NDArray[Any] | torch.Tensor) -> None:
        """Add the distances ``(C, G)`` of queries ``start:start + C`` (an array or a tensor)."""
        use_torch = self._use_torch(dist)
        if isinstance(dist, torch.Tensor) and not use_torch:
            dist = _shared.rows_as_numpy(dist, 0, dist.shape[0])
        rows_per_block = max(1, _shared.BLOCK_ELEMENTS // max(1, dist.shape[1]))
        for a in range(0, dist.shape[0], rows_per_block):
            block = dist[a : a + rows_per_block]
            lo, hi = start + a, start + a + block.shape[0]
            if isinstance(block, torch.Tensor):
                ranks = self._ranks_torch(block, lo, hi)
            else:
                ranks = self._ranks_numpy(np.ascontiguousarray(block), lo, hi)
            self.ap[lo:hi], self.inp[lo:hi], self.first[lo:hi] = _ap_inp_first(ranks)
            if self.cmc_mode == "cuhk03":
                self.cuhk03_hist += _cuhk03_histogram(
                    ranks, self.gallery, self.pick[lo:hi], self.seeds[lo:hi], self.max_rank
                )

    def result(self) -> RankResult:
        """The :class:`~lagnet.evaluation.RankResult` of all rows added so far."""
        valid = ~np.isnan(self.ap)
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise ValueError(
                "no query has a valid match: for every query, all gallery items of its id are "
                "from the query's own camera or the id is absent from the gallery"
            )
        if self.cmc_mode == "cuhk03":
            hist = self.cuhk03_hist
            denominator = num_valid * self.num_repeats
            longest = int(self.gallery.counts.size)
        else:
            hist = np.bincount(
                np.minimum(self.first[valid] - 1, self.max_rank), minlength=self.max_rank + 1
            )
            denominator = num_valid
            longest = int(self.gallery.pids.size)
        cmc = np.cumsum(hist[: self.max_rank]) / denominator
        ap, inp = self.ap, self.inp
        for array in (cmc, ap, inp):
            array.flags.writeable = False
        return RankResult(
            mAP=float(np.mean(ap[valid])),
            cmc=cmc,
            mINP=float(np.mean(inp[valid])),
            num_valid_queries=num_valid,
            ap=ap,
            inp=inp,
            cmc_padded=self.max_rank > longest,
            cmc_mode=self.cmc_mode,
        )


def make_accumulator(
    num_query: int,
    num_gallery: int,
    q_pids: IdsLike,
    g_pids: IdsLike,
    q_camids: IdsLike,
    g_camids: IdsLike,
    *,
    max_rank: object,
    cmc_mode: object,
    num_repeats: object,
    seed: int,
    generator: torch.Generator | None,
    backend: Backend = "auto",
) -> RankAccumulator:
    """Validate ids and options for ``num_query`` queries and ``num_gallery`` gallery items
    and return an empty :class:`RankAccumulator`."""
    qp = as_ids(q_pids, "q_pids", num_query)
    gp = as_ids(g_pids, "g_pids", num_gallery)
    qc = as_ids(q_camids, "q_camids", num_query)
    gc = as_ids(g_camids, "g_camids", num_gallery)
    rank = check_positive_int(max_rank, "max_rank")
    mode, repeats = check_cmc_options(cmc_mode, num_repeats)
    return RankAccumulator(
        qp,
        qc,
        gp,
        gc,
        max_rank=rank,
        cmc_mode=mode,
        num_repeats=repeats,
        seed=seed,
        generator=check_generator(generator),
        backend=backend,
    )
