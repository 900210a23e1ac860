"""Ranking metrics for re-identification: CMC, mAP and mINP.

The protocol is the de-facto standard Market-1501 one:

* for every query, gallery items with the same person id **and** the same camera id as the
  query are removed from its ranked list (pid 0 distractors and every other id stay in as
  ordinary non-matches; junk images, pid -1, are expected to be dropped by the data layer);
* the ranked list is the remaining gallery sorted by distance, ties broken by gallery index
  (lower index first), exactly what ``numpy.argsort(..., kind="stable")`` gives;
* ``cmc[k]`` is the fraction of valid queries whose first correct match is at rank ``<= k + 1``;
* AP is the non-interpolated average precision (mean, over the correct matches, of the precision
  at each of them) and INP is ``number of matches / rank of the last match`` (ranks are 1-based);
* queries without any correct match left in their list are skipped.

Only the ranks of the correct matches are needed, not a full argsort of every row. For each row
the largest match distance ``t`` is found; only items with distance ``<= t`` can precede a match.
When those are a small part of the row (the usual case for a useful embedding) they are gathered
and sorted by (distance, gallery index), and the ranks are read off that short list. Rows where
a sizeable part of the items can precede the last match (float distances) are not sorted at all:
their items are put in equal-width buckets spanning the match distances by a monotone function
of the distance, a histogram counts the items in the buckets below each match, and only the few
items that share a bucket with a match are sorted (by distance, then gallery index), which keeps
ties exact. Everything is vectorised over blocks of queries with NumPy, so no compiled extension
is needed and memory stays bounded by the block size whatever the gallery size.

Per-query AP sums the precisions left to right in rank order, so it is bit-for-bit reproducible
against a plain sequential implementation; the classic evaluator's ``numpy.sum`` (pairwise
summation) can differ from it in the last bit (about 1e-16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["RankResult", "evaluate_rank", "mean_average_precision"]

ArrayOrTensor: TypeAlias = "npt.NDArray[Any] | torch.Tensor"
IdsLike: TypeAlias = "npt.NDArray[Any] | torch.Tensor | Sequence[int]"
CmcMode: TypeAlias = Literal["market", "cuhk03"]

IntArray: TypeAlias = "npt.NDArray[np.int64]"
FloatArray: TypeAlias = "npt.NDArray[np.float64]"
BoolArray: TypeAlias = "npt.NDArray[np.bool_]"

# Work on blocks of at most this many distance entries at a time (about 16 MiB of float32);
# the temporaries of one block are a few times that.
_BLOCK_ELEMENTS = 1 << 22
# Buckets per row (at most) and items per chunk of the deep-match path, see
# _ranks_by_sorted_rows.
_MAX_BUCKETS = 8192
_CHUNK_ELEMENTS = 1 << 18
# Rows where more than 1 / _DEEP_DIVISOR of the items can precede a match take that path (the
# fraction is estimated on about _DEEP_SAMPLES evenly spaced gallery items).
_DEEP_DIVISOR = 16
_DEEP_SAMPLES = 512


@dataclass(frozen=True, eq=False, repr=False)
class RankResult:
    """Result of :func:`evaluate_rank` / :func:`~lagnet.evaluation.evaluate_features`.

    Attributes:
        mAP: mean average precision over the valid queries.
        cmc: ``(max_rank,)`` float64; ``cmc[k]`` is the fraction of valid queries whose first
            correct match is at rank ``<= k + 1``.
        mINP: mean inverse negative penalty over the valid queries.
        num_valid_queries: queries with at least one correct match left after removing the
            gallery items that share both the query's id and camera.
        ap: ``(Q,)`` float64 per-query average precision, NaN for skipped queries.
        inp: ``(Q,)`` float64 per-query INP, NaN for skipped queries.
        cmc_padded: True when ``max_rank`` exceeds the longest possible ranked list (the gallery
            size, or the number of gallery identities in ``"cuhk03"`` mode); the entries past it
            repeat the last value, which is 1.0.
        cmc_mode: ``"market"`` or ``"cuhk03"``.
    """

    mAP: float
    cmc: FloatArray
    mINP: float
    num_valid_queries: int
    ap: FloatArray
    inp: FloatArray
    cmc_padded: bool
    cmc_mode: CmcMode = "market"

    @property
    def rank1(self) -> float:
        """``cmc[0]``: the fraction of valid queries whose best-ranked item is a match."""
        return float(self.cmc[0])

    def __repr__(self) -> str:
        return (
            f"RankResult(mAP={self.mAP:.4f}, rank1={self.rank1:.4f}, mINP={self.mINP:.4f}, "
            f"num_valid_queries={self.num_valid_queries}, max_rank={self.cmc.shape[0]}, "
            f"cmc_padded={self.cmc_padded}, cmc_mode={self.cmc_mode!r})"
        )


# --------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------


def _as_ids(values: IdsLike, name: str, length: int | None = None) -> IntArray:
    """Return ``values`` as a 1-D int64 NumPy array, with clear errors for bad input."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {values.dtype}")
        arr: npt.NDArray[Any] = values.detach().cpu().numpy()
    else:
        arr = np.asarray(values)
        if arr.size == 0 and arr.dtype.kind == "f":  # e.g. an empty Python list
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has length {arr.shape[0]}, expected {length}")
    return arr.astype(np.int64, copy=False)


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_distmat(distmat: object) -> tuple[int, int]:
    """Check type, rank, dtype and size of a distance matrix and return its shape."""
    if isinstance(distmat, torch.Tensor):
        if distmat.dtype == torch.bool or distmat.is_complex():
            raise TypeError(f"distmat must be real-valued, got dtype {distmat.dtype}")
        shape = tuple(distmat.shape)
    elif isinstance(distmat, np.ndarray):
        if distmat.dtype.kind not in "iuf":
            raise TypeError(f"distmat must be real-valued, got dtype {distmat.dtype}")
        shape = tuple(distmat.shape)
    else:
        raise TypeError(f"distmat must be a numpy array or torch tensor, got {type(distmat)}")
    if len(shape) != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"empty query set: distmat has shape {shape}")
    if shape[1] == 0:
        raise ValueError(f"empty gallery: distmat has shape {shape}")
    return int(shape[0]), int(shape[1])


def _rows_as_numpy(distmat: ArrayOrTensor, start: int, stop: int) -> npt.NDArray[Any]:
    """Rows ``start:stop`` of ``distmat`` as a C-contiguous CPU NumPy array (float16/bfloat16
    are widened to float32, which keeps order and ties)."""
    if isinstance(distmat, torch.Tensor):
        block = distmat[start:stop].detach()
        if block.dtype in (torch.float16, torch.bfloat16):
            block = block.float()
        out: npt.NDArray[Any] = block.cpu().contiguous().numpy()
    else:
        out = distmat[start:stop]
        if out.dtype == np.float16:
            out = out.astype(np.float32)
    return np.ascontiguousarray(out)


def _check_no_nan(block: npt.NDArray[Any], row_offset: int) -> None:
    if block.dtype.kind == "f" and np.isnan(block.min()):
        row, col = np.argwhere(np.isnan(block))[0]
        raise ValueError(
            f"distmat contains NaN (first at query {row_offset + int(row)}, gallery {int(col)})"
        )


# --------------------------------------------------------------------------------------------
# core
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Gallery:
    """Gallery ids/cameras with the items grouped by id (each group in gallery-index order)."""

    pids: IntArray
    camids: IntArray
    order: IntArray  # gallery indices sorted by (pid, index)
    unique_pids: IntArray
    starts: IntArray  # start of each id's group in ``order``
    counts: IntArray  # size of each id's group
    group: IntArray  # (G,) dense id index of each gallery item

    @classmethod
    def build(cls, pids: IntArray, camids: IntArray) -> _Gallery:
        order = np.argsort(pids, kind="stable").astype(np.int64)
        unique_pids, group, counts = np.unique(pids, return_inverse=True, return_counts=True)
        starts = np.cumsum(counts) - counts
        return cls(
            pids=pids,
            camids=camids,
            order=order,
            unique_pids=unique_pids.astype(np.int64),
            starts=starts.astype(np.int64),
            counts=counts.astype(np.int64),
            group=group.reshape(-1).astype(np.int64),
        )

    def groups_of(self, q_pids: IntArray) -> tuple[IntArray, IntArray]:
        """Start (in ``order``) and size of the gallery group of each query id (size 0 when the
        id is absent from the gallery)."""
        pos = np.minimum(np.searchsorted(self.unique_pids, q_pids), self.unique_pids.size - 1)
        found = self.unique_pids[pos] == q_pids
        return np.where(found, self.starts[pos], 0), np.where(found, self.counts[pos], 0)


@dataclass(frozen=True)
class _BlockRanks:
    """Ranks of the correct matches of a block of ``C`` queries.

    ``match_rank`` holds, row after row, the 1-based ranks of each query's matches in increasing
    order; ``num_matches[i]`` of them belong to row ``i``. The ``cand_*`` arrays describe every
    gallery item that can precede a match (the short sorted lists the ranks were read from); they
    are only needed for the CUHK03 protocol.
    """

    num_matches: IntArray  # (C,)
    match_rank: IntArray  # (sum(num_matches),)
    cand_row: IntArray
    cand_rank: IntArray
    cand_is_match: BoolArray
    cand_group: IntArray


def _monotone_int64(values: npt.NDArray[Any]) -> IntArray | None:
    """int64 keys ordered (and equal) like ``values``; None when the dtype does not allow it."""
    if values.dtype.kind == "f":
        values = values + values.dtype.type(0)  # -0.0 -> +0.0: they compare equal
        if values.dtype == np.float32:
            bits32 = values.view(np.int32)
            mono32 = np.where(bits32 < 0, bits32 ^ np.int32(0x7FFFFFFF), bits32)
            return mono32.astype(np.int64)
        if values.dtype == np.float64:
            bits64 = values.view(np.int64)
            return np.where(bits64 < 0, bits64 ^ np.int64(0x7FFFFFFFFFFFFFFF), bits64)
        return None
    if values.dtype.kind == "i" or (values.dtype.kind == "u" and values.dtype.itemsize < 8):
        return values.astype(np.int64)
    return None


def _stable_order_by_row_and_value(rows: IntArray, values: npt.NDArray[Any]) -> IntArray:
    """Stable argsort by (row, value), as ``np.lexsort((values, rows))`` but faster."""
    key = _monotone_int64(values)
    if key is None:
        return np.lexsort((values, rows)).astype(np.int64)
    small = key.size == 0 or (int(key.min()) >= -(2**31) and int(key.max()) < 2**31)
    if small and (rows.size == 0 or int(rows.max()) < 2**31):
        # (row, value) packed into one int64: a single stable sort
        packed = (rows << 32) | (key + 2**31)
        return np.argsort(packed, kind="stable")
    by_value = np.argsort(key, kind="stable")
    return by_value[np.argsort(rows[by_value], kind="stable")]


def _ranks_by_sorted_rows(
    dist: npt.NDArray[Any],
    rows: IntArray,
    match_row: IntArray,
    match_col: IntArray,
    removed_row: IntArray,
    removed_col: IntArray,
) -> IntArray:
    """Ranks of the matches of the float rows ``dist[rows]``, for rows where many items can
    precede the last match; no row is sorted (the name is historical).

    ``match_row`` / ``removed_row`` index into ``rows`` (the matches in row order) and the
    ``*_col`` into the gallery. Each row gets up to ``_MAX_BUCKETS`` buckets of equal width
    spanning its match distances, plus one below, one above and one for its removed items, and
    every item goes in one by a non-decreasing function of its distance: an item in a lower
    bucket than a match is before it in the ranked list, one in a higher bucket after it. So the
    rank of match ``j`` is one plus the number of kept items in lower buckets (a histogram and
    a cumulative sum) plus the number of kept items in its own bucket that come before it in
    (distance, gallery index) order, found by sorting the few items that share a bucket with
    some match. Every step is exact, ties included, whatever the values: a skewed distribution
    only makes the shared buckets fuller. Returns the ranks in the order of the matches."""
    num_gallery = dist.shape[1]
    # W buckets per row (a power of two): about 8 items per bucket, from 64 to _MAX_BUCKETS
    width = min(_MAX_BUCKETS, max(64, 1 << max(0, num_gallery // 8 - 1).bit_length()))
    # rows per chunk: a cache-friendly number of items, and row * W + bucket < 2**21 so that
    # float32 holds the global bucket ids exactly with 1/8 resolution
    chunk = max(1, min(_CHUNK_ELEMENTS // num_gallery, (1 << 21) // width))
    chunk = min(chunk, rows.size)
    scratch = np.empty((chunk, num_gallery), dtype=dist.dtype)
    bucket = np.empty((chunk, num_gallery), dtype=np.int64)
    ranks = np.empty(match_row.size, dtype=np.int64)
    bounds = np.arange(0, rows.size + chunk, chunk)
    match_bounds = np.searchsorted(match_row, bounds)
    removed_bounds = np.searchsorted(removed_row, bounds)
    for c, a in enumerate(bounds[:-1].tolist()):
        b = min(rows.size, a + chunk)
        m0, m1 = int(match_bounds[c]), int(match_bounds[c + 1])
        r0, r1 = int(removed_bounds[c]), int(removed_bounds[c + 1])
        contiguous = int(rows[b - 1] - rows[a]) == b - a - 1
        ranks[m0:m1] = _bucket_ranks(
            dist[int(rows[a]) : int(rows[a]) + b - a] if contiguous else dist[rows[a:b]],
            match_row[m0:m1] - a,
            match_col[m0:m1],
            removed_row[r0:r1] - a,
            removed_col[r0:r1],
            width,
            scratch[: b - a],
            bucket[: b - a],
        )
    return ranks


def _bucket_ranks(
    block: npt.NDArray[Any],
    match_row: IntArray,
    match_col: IntArray,
    removed_row: IntArray,
    removed_col: IntArray,
    width: int,
    scratch: npt.NDArray[Any],
    bucket_2d: IntArray,
) -> IntArray:
    """:func:`_ranks_by_sorted_rows` on one chunk of rows (each with a match), with scratch
    arrays of the block's shape (float of its dtype, and int64)."""
    num_rows, num_gallery = block.shape
    dtype = block.dtype
    match_val = block[match_row, match_col]
    lo = np.full(num_rows, np.inf)
    hi = np.full(num_rows, -np.inf)
    np.minimum.at(lo, match_row, match_val)
    np.maximum.at(hi, match_row, match_val)
    # Any finite offset and positive finite scale give a non-decreasing bucket function (and no
    # NaN); these spread the row's match distances over buckets 1 to W - 3.
    lo[~np.isfinite(lo)] = 0.0
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scale = ((width - 4) / (hi - lo)).astype(dtype)
    # all matches at one distance (or a span too small for the dtype): only items at that
    # distance share its bucket
    scale[~(np.isfinite(scale) & (scale > 0))] = 2.0**100
    first = np.arange(num_rows, dtype=np.int64) * width  # global id of each row's bucket 0
    with np.errstate(over="ignore"):  # an infinite result is clipped like any large one
        np.subtract(block, lo.astype(dtype)[:, None], out=scratch)
        scratch *= scale[:, None]
        scratch += (first + 1).astype(dtype)[:, None]
    np.clip(
        scratch,
        first.astype(dtype)[:, None],
        (first + width - 2).astype(dtype)[:, None],
        out=bucket_2d,
        casting="unsafe",  # exact: integral values below 2**21 (truncated, i.e. floored)
    )
    bucket = bucket_2d.reshape(-1)
    bucket[removed_row * num_gallery + removed_col] = removed_row * width + width - 1
    match_flat = match_row * num_gallery + match_col
    match_bucket = bucket[match_flat]
    hist = np.bincount(bucket, minlength=num_rows * width)
    before = np.cumsum(hist) - hist  # kept items in lower buckets, of this row and earlier ones
    # Items sharing a bucket with a match, in (row, gallery index) order, then sorted stably by
    # (bucket, distance): a match's position in its bucket counts the items it has left.
    shared = np.zeros(num_rows * width, dtype=np.bool_)
    shared[match_bucket] = True
    flat = np.flatnonzero(shared[bucket])
    flat_bucket = bucket[flat]
    order = _stable_order_by_row_and_value(flat_bucket, block.reshape(-1)[flat])
    position = np.empty(flat.size, dtype=np.int64)
    position[order] = np.arange(flat.size, dtype=np.int64)
    in_bucket = position[np.searchsorted(flat, match_flat)] - np.searchsorted(
        flat_bucket[order], match_bucket
    )
    ranks: IntArray = 1 + before[match_bucket] - before[match_row * width] + in_bucket
    return ranks


def _rank_block(
    dist: npt.NDArray[Any],
    q_pids: IntArray,
    q_camids: IntArray,
    gallery: _Gallery,
    *,
    need_candidates: bool = False,
) -> _BlockRanks:
    """Find the rank of every correct match of a ``(C, G)`` block of distances.

    Per row, only items with a distance ``<=`` the largest match distance can precede a match.
    When they are a small part of the row (typical of a useful embedding) they are gathered
    and sorted by (row, distance, index). Float rows where they are more than
    ``1 / _DEEP_DIVISOR`` of the row are handled by :func:`_ranks_by_sorted_rows` instead,
    unless ``need_candidates`` (CUHK03 mode) asks for the gathered lists of every row."""
    num_rows, num_gallery = dist.shape
    row_ids = np.arange(num_rows, dtype=np.int64)

    # Gallery items with the query's id, via the id groups: no (C, G) comparison needed.
    starts, sizes = gallery.groups_of(q_pids)
    total = int(sizes.sum())
    offsets = np.cumsum(sizes) - sizes
    rows = np.repeat(row_ids, sizes)
    gidx = gallery.order[np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, sizes)]
    same_cam = gallery.camids[gidx] == q_camids[rows]  # same id and camera: not in the list
    removed_row, removed_col = rows[same_cam], gidx[same_cam]
    rows, gidx = rows[~same_cam], gidx[~same_cam]
    num_matches = np.bincount(rows, minlength=num_rows).astype(np.int64)
    valid = num_matches > 0
    match_val = dist[rows, gidx]

    # Largest match distance per row: nothing beyond it can precede a match.
    if dist.dtype.kind == "f":
        threshold = np.full(num_rows, -np.inf, dtype=dist.dtype)
    else:
        threshold = np.full(num_rows, np.iinfo(dist.dtype).min, dtype=dist.dtype)
    if valid.any():
        seg_starts = (np.cumsum(num_matches) - num_matches)[valid]
        threshold[valid] = np.maximum.reduceat(match_val, seg_starts)
    ranked_row: list[IntArray] = []
    ranked: list[IntArray] = []
    shallow_mask = valid.copy()
    if not need_candidates and dist.dtype in (np.float32, np.float64):
        # Deep rows: estimate how many items are <= the threshold from evenly spaced runs of
        # 16 adjacent items (only the choice of path depends on it, both paths are exact).
        runs = _DEEP_SAMPLES // 16
        period = num_gallery // runs
        if period >= 32 and dist.flags.c_contiguous:  # (the reshape is then a view)
            sample = dist[:, : runs * period].reshape(num_rows, runs, period)[:, :, :16]
            count = np.count_nonzero(sample <= threshold[:, None, None], axis=(1, 2))
            deep = valid & (count * _DEEP_DIVISOR > runs * 16)
        else:
            count = np.count_nonzero(dist <= threshold[:, None], axis=1)
            deep = valid & (count * _DEEP_DIVISOR > num_gallery)
        dense = np.flatnonzero(deep)
        if dense.size:
            local = np.full(num_rows, -1, dtype=np.int64)
            local[dense] = np.arange(dense.size)
            in_m, in_r = local[rows] >= 0, local[removed_row] >= 0
            ranked_row.append(rows[in_m])
            ranked.append(
                _ranks_by_sorted_rows(
                    dist,
                    dense,
                    local[rows[in_m]],
                    gidx[in_m],
                    local[removed_row[in_r]],
                    removed_col[in_r],
                )
            )
            shallow_mask &= ~deep

    shallow = np.flatnonzero(shallow_mask)
    if 2 * shallow.size > num_rows:
        below = dist <= threshold[:, None]
        below[~shallow_mask] = False
        flat = np.flatnonzero(below)
        cand_row = flat // num_gallery
        cand_col = flat - cand_row * num_gallery
    else:  # mostly deep rows: only look at the others
        flat = np.flatnonzero(dist[shallow] <= threshold[shallow, None])
        cand_row = flat // num_gallery
        cand_col = flat - cand_row * num_gallery
        cand_row = shallow[cand_row]
        flat = cand_row * num_gallery + cand_col
    same_pid = gallery.pids[cand_col] == q_pids[cand_row]
    keep = ~(same_pid & (gallery.camids[cand_col] == q_camids[cand_row]))
    flat, cand_row, cand_col, is_match = flat[keep], cand_row[keep], cand_col[keep], same_pid[keep]

    # Sort by (row, distance, gallery index): the candidates come in (row, index) order and
    # the sort is stable, so equal distances keep the lower gallery index first.
    order = _stable_order_by_row_and_value(cand_row, dist.reshape(-1)[flat])
    cand_row, cand_col, is_match = cand_row[order], cand_col[order], is_match[order]
    per_row = np.bincount(cand_row, minlength=num_rows)
    cand_rank = np.arange(cand_row.size, dtype=np.int64) - (np.cumsum(per_row) - per_row)[cand_row]
    cand_rank += 1
    match_rank = cand_rank[is_match]
    if ranked:  # merge both paths, ordered by (row, rank)
        all_row = np.concatenate([cand_row[is_match], *ranked_row])
        all_rank = np.concatenate([match_rank, *ranked])
        match_rank = all_rank[np.lexsort((all_rank, all_row))]
    return _BlockRanks(
        num_matches=num_matches,
        match_rank=match_rank,
        cand_row=cand_row,
        cand_rank=cand_rank,
        cand_is_match=is_match,
        cand_group=gallery.group[cand_col],
    )


def _ap_inp_first(ranks: _BlockRanks) -> tuple[FloatArray, FloatArray, IntArray]:
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


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64 finaliser (wrapping uint64 arithmetic): a counter-based random stream."""
    z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: npt.NDArray[np.uint64] = z ^ (z >> np.uint64(31))
    return out


def _cuhk03_histogram(
    ranks: _BlockRanks,
    gallery: _Gallery,
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
        stream = seeds[key_row, r] + (key_group.astype(np.uint64) + np.uint64(1)) * _GOLDEN_GAMMA
        uniform = (_mix64(stream) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        ahead = uniform * gallery.counts[key_group] < counts[keys]
        rank = 1 + np.bincount(key_row[ahead], minlength=num_rows)
        hist += np.bincount(np.minimum(rank[valid_rows] - 1, max_rank), minlength=max_rank + 1)
    return hist


class _RankAccumulator:
    """Accumulates per-query results over blocks of distance rows (shared by
    :func:`evaluate_rank` and :func:`~lagnet.evaluation.evaluate_features`)."""

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
    ) -> None:
        self.q_pids = q_pids
        self.q_camids = q_camids
        self.gallery = _Gallery.build(g_pids, g_camids)
        self.max_rank = max_rank
        self.cmc_mode: CmcMode = cmc_mode
        num_query = q_pids.size
        self.ap = np.full(num_query, np.nan)
        self.inp = np.full(num_query, np.nan)
        self.first = np.zeros(num_query, dtype=np.int64)
        self.cuhk03_hist = np.zeros(max_rank + 1, dtype=np.int64)
        self.num_repeats = num_repeats
        self.pick = np.zeros((0, 0))
        self.seeds = np.zeros((0, 0), dtype=np.uint64)
        if cmc_mode == "cuhk03":
            if generator is None:
                generator = torch.Generator().manual_seed(seed)
            shape = (num_query, num_repeats)
            self.pick = torch.rand(shape, generator=generator, dtype=torch.float64).numpy()
            self.seeds = (
                torch.randint(-(2**63), 2**63 - 1, shape, generator=generator, dtype=torch.int64)
                .numpy()
                .view(np.uint64)
            )

    def add(self, start: int, dist: npt.NDArray[Any]) -> None:
        """Add the distances ``(C, G)`` of queries ``start:start + C``."""
        rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, dist.shape[1]))
        for a in range(0, dist.shape[0], rows_per_block):
            block = dist[a : a + rows_per_block]
            lo, hi = start + a, start + a + block.shape[0]
            _check_no_nan(block, lo)
            ranks = _rank_block(
                block,
                self.q_pids[lo:hi],
                self.q_camids[lo:hi],
                self.gallery,
                need_candidates=self.cmc_mode == "cuhk03",
            )
            self.ap[lo:hi], self.inp[lo:hi], self.first[lo:hi] = _ap_inp_first(ranks)
            if self.cmc_mode == "cuhk03":
                self.cuhk03_hist += _cuhk03_histogram(
                    ranks, self.gallery, self.pick[lo:hi], self.seeds[lo:hi], self.max_rank
                )

    def result(self) -> RankResult:
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


def _check_cmc_options(cmc_mode: object, num_repeats: object) -> tuple[CmcMode, int]:
    if cmc_mode not in ("market", "cuhk03"):
        raise ValueError(f"cmc_mode must be 'market' or 'cuhk03', got {cmc_mode!r}")
    repeats = _check_positive_int(num_repeats, "num_repeats")
    return ("cuhk03" if cmc_mode == "cuhk03" else "market"), repeats


def _make_accumulator(
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
) -> _RankAccumulator:
    """Validate ids and options for ``num_query`` queries and ``num_gallery`` gallery items."""
    qp = _as_ids(q_pids, "q_pids", num_query)
    gp = _as_ids(g_pids, "g_pids", num_gallery)
    qc = _as_ids(q_camids, "q_camids", num_query)
    gc = _as_ids(g_camids, "g_camids", num_gallery)
    rank = _check_positive_int(max_rank, "max_rank")
    mode, repeats = _check_cmc_options(cmc_mode, num_repeats)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return _RankAccumulator(
        qp,
        qc,
        gp,
        gc,
        max_rank=rank,
        cmc_mode=mode,
        num_repeats=repeats,
        seed=seed,
        generator=generator,
    )


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


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
            (CPU or CUDA; it is read block by block). Real dtypes only, no NaN.
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
    num_query, num_gallery = _check_distmat(distmat)
    acc = _make_accumulator(
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
    rows_per_step = max(1, (4 * _BLOCK_ELEMENTS) // num_gallery)
    for start in range(0, num_query, rows_per_step):
        stop = min(num_query, start + rows_per_step)
        acc.add(start, _rows_as_numpy(distmat, start, stop))
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
    rows_per_step = max(1, _BLOCK_ELEMENTS // max(1, length))
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
