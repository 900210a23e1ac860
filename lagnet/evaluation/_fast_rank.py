"""The fast evaluator: ranks of the correct matches of a block of queries, vectorised with
NumPy (internal; :mod:`lagnet.evaluation.protocol` is its specification).

Only the ranks of the correct matches are needed, not a full argsort of every row. For each row
the largest match distance ``t`` is found; only items with distance ``<= t`` can precede a match.
When those are a small part of the row (the usual case for a useful embedding) they are gathered
and sorted by (distance, gallery index), and the ranks are read off that short list. Rows where
a sizeable part of the items can precede the last match (float distances) are not sorted at all:
their items are put in equal-width buckets spanning the match distances by a monotone function
of the distance, a histogram counts the items in the buckets below each match, and only the few
items that share a bucket with a match are sorted (by distance, then gallery index), which keeps
ties exact. Memory stays bounded by the block size whatever the gallery size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._shared import BoolArray, IntArray

__all__ = ["BlockRanks", "Gallery", "rank_block"]

# Buckets per row (at most) and items per chunk of the deep-match path, see _ranks_by_buckets.
_MAX_BUCKETS = 8192
_CHUNK_ELEMENTS = 1 << 18
# Rows where more than 1 / _DEEP_DIVISOR of the items can precede a match take that path (the
# fraction is estimated on about _DEEP_SAMPLES evenly spaced gallery items).
_DEEP_DIVISOR = 16
_DEEP_SAMPLES = 512


@dataclass(frozen=True)
class Gallery:
    """Gallery ids/cameras with the items grouped by id (each group in gallery-index order)."""

    pids: IntArray
    camids: IntArray
    order: IntArray  # gallery indices sorted by (pid, index)
    unique_pids: IntArray
    starts: IntArray  # start of each id's group in ``order``
    counts: IntArray  # size of each id's group
    group: IntArray  # (G,) dense id index of each gallery item

    @classmethod
    def build(cls, pids: IntArray, camids: IntArray) -> Gallery:
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
class BlockRanks:
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


def _ranks_by_buckets(
    dist: npt.NDArray[Any],
    rows: IntArray,
    match_row: IntArray,
    match_col: IntArray,
    removed_row: IntArray,
    removed_col: IntArray,
) -> IntArray:
    """Ranks of the matches of the float rows ``dist[rows]``, for rows where many items can
    precede the last match, without sorting the rows.

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
    """:func:`_ranks_by_buckets` on one chunk of rows (each with a match), with scratch
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


def rank_block(
    dist: npt.NDArray[Any],
    q_pids: IntArray,
    q_camids: IntArray,
    gallery: Gallery,
    *,
    need_candidates: bool = False,
) -> BlockRanks:
    """Find the rank of every correct match of a ``(C, G)`` block of distances.

    Per row, only items with a distance ``<=`` the largest match distance can precede a match.
    When they are a small part of the row (typical of a useful embedding) they are gathered
    and sorted by (row, distance, index). Float rows where they are more than
    ``1 / _DEEP_DIVISOR`` of the row are handled by :func:`_ranks_by_buckets` instead,
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
                _ranks_by_buckets(
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
    return BlockRanks(
        num_matches=num_matches,
        match_rank=match_rank,
        cand_row=cand_row,
        cand_rank=cand_rank,
        cand_is_match=is_match,
        cand_group=gallery.group[cand_col],
    )
