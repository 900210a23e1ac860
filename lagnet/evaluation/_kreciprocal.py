"""The sparse steps of k-reciprocal re-ranking, shared by :func:`~lagnet.evaluation.re_ranking`
(from distance matrices) and :func:`~lagnet.evaluation.re_ranking_features` (from features).

Internal. Both callers first find, for each of the ``N = Q + G`` items, its nearest neighbours
under the "original" distance of the method (squared distance divided by the largest squared
distance of the item's column of the combined matrix). From those neighbours alone this module
builds the expanded k-reciprocal sets, the Gaussian weights ``V``, the local query expansion
and the Jaccard distance of every query to every gallery item, a block of queries at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from lagnet._validation import check_float, check_positive_int

from . import _shared

__all__ = [
    "F32Array",
    "SparseJaccard",
    "check_rerank_params",
    "expanded_sets",
    "gaussian_weights",
    "query_expansion",
    "sq32",
]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def check_rerank_params(
    k1: object, k2: object, lambda_value: object, num_query: int, num_gallery: int
) -> tuple[int, int, float]:
    """Validate re-ranking parameters for ``num_query`` queries and ``num_gallery`` gallery
    items; returns ``(k1, k2, lambda_value)``."""
    k1_ = check_positive_int(k1, "k1")
    k2_ = check_positive_int(k2, "k2")
    total = num_query + num_gallery
    if k1_ > num_gallery or k1_ > total - 1:
        raise ValueError(
            f"k1={k1_} is larger than the gallery ({num_gallery} items; query + gallery - 1 = "
            f"{total - 1}): the k1 nearest neighbours do not exist"
        )
    if k2_ > total:
        raise ValueError(f"k2={k2_} is larger than query + gallery = {total}")
    lam = check_float(lambda_value, "lambda_value", low=0.0, high=1.0)
    return k1_, k2_, lam


def sq32(a: npt.NDArray[Any]) -> F32Array:
    """Squared distances as float32, squaring in the input precision first."""
    out: F32Array = np.square(a).astype(np.float32, copy=False)
    return out


def _reciprocal_mask(neighbours: IntArray) -> npt.NDArray[np.bool_]:
    """``mask[i, a]``: ``i`` is among the neighbours of its neighbour ``neighbours[i, a]``."""
    n, k = neighbours.shape
    mask = np.empty((n, k), dtype=np.bool_)
    step = max(1, _shared.BLOCK_ELEMENTS // (k * k))
    for s in range(0, n, step):
        block = neighbours[s : s + step]
        own = np.arange(s, s + block.shape[0])[:, None, None]
        mask[s : s + step] = (neighbours[block] == own).any(axis=2)
    return mask


def expanded_sets(nearest: IntArray, k1: int) -> tuple[IntArray, IntArray]:
    """Rows and columns (sorted, unique per row) of the k-reciprocal expansion sets."""
    n = nearest.shape[0]
    forward = nearest[:, : k1 + 1]
    recip = _reciprocal_mask(forward)
    half = int(np.around(k1 / 2.0))
    forward_h = nearest[:, : half + 1]
    recip_h = _reciprocal_mask(forward_h)
    k, kh = k1 + 1, half + 1
    rows_out: list[IntArray] = []
    cols_out: list[IntArray] = []
    step = max(1, _shared.BLOCK_ELEMENTS // (k * kh * k))
    for s in range(0, n, step):
        f, fr = forward[s : s + step], recip[s : s + step]  # (B, k)
        cand_sets = forward_h[f]  # (B, k, kh): half-size reciprocal candidates of each member
        cand_ok = recip_h[f]
        in_r = ((cand_sets[..., None] == f[:, None, None, :]) & fr[:, None, None, :]).any(axis=3)
        overlap = (in_r & cand_ok).sum(axis=2)
        size = cand_ok.sum(axis=2)
        passed = fr & (overlap > (2.0 / 3.0) * size)
        members = np.concatenate(
            [
                np.where(fr, f, n),
                np.where(passed[..., None] & cand_ok, cand_sets, n).reshape(f.shape[0], -1),
            ],
            axis=1,
        )
        members.sort(axis=1)
        keep = members < n
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]
        r, c = np.nonzero(keep)
        rows_out.append(r + s)
        cols_out.append(members[r, c])
    return np.concatenate(rows_out), np.concatenate(cols_out)


def _csr_indptr(rows: IntArray, n: int) -> IntArray:
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr


def _ragged_positions(starts: IntArray, lengths: IntArray) -> IntArray:
    """Concatenation of ``arange(starts[t], starts[t] + lengths[t])`` over ``t``."""
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    out: IntArray = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)
    return out


def query_expansion(
    rows: IntArray, cols: IntArray, vals: F32Array, nearest: IntArray, k2: int
) -> tuple[IntArray, IntArray, F32Array]:
    """Sparse ``V_qe[i] = mean(V[nearest[i, :k2]], axis=0)``."""
    n = nearest.shape[0]
    indptr = _csr_indptr(rows, n)
    nnz = np.diff(indptr)
    out_r: list[IntArray] = []
    out_c: list[IntArray] = []
    out_v: list[F32Array] = []
    step = max(1, _shared.BLOCK_ELEMENTS // n)
    for s in range(0, n, step):
        nb = nearest[s : s + step, :k2]
        lengths = nnz[nb].reshape(-1)
        pos = _ragged_positions(indptr[nb].reshape(-1), lengths)
        owner = np.repeat(np.repeat(np.arange(nb.shape[0]), k2), lengths)
        dense = np.bincount(owner * n + cols[pos], weights=vals[pos], minlength=nb.shape[0] * n)
        nz = np.flatnonzero(dense)
        out_r.append(nz // n + s)
        out_c.append(nz % n)
        out_v.append((dense[nz] / k2).astype(np.float32))
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_v)


def gaussian_weights(rows: IntArray, original: F32Array, n: int) -> F32Array:
    """``V``'s values: ``exp(-original)`` of each set member, normalised to sum 1 per row
    (``rows`` are the members' rows, ``original`` their original distances)."""
    weights = np.exp(-original)
    row_sum = np.bincount(rows, weights=weights, minlength=n).astype(np.float32)
    out: F32Array = (weights / row_sum[rows]).astype(np.float32)
    return out


class SparseJaccard:
    """Jaccard distances ``1 - s / (2 - s)`` between the queries and the gallery, with
    ``s[i, j] = sum_l min(V[i, l], V[j, l])``, from the sparse ``V`` (rows sorted, then columns;
    rows ``< num_query`` are the queries)."""

    def __init__(
        self, rows: IntArray, cols: IntArray, vals: F32Array, num_query: int, num_gallery: int
    ) -> None:
        nq, ng = num_query, num_gallery
        n = nq + ng
        self.num_query, self.num_gallery = nq, ng
        # gallery part of V by column: for column l, the gallery rows j with V[j, l] != 0
        gal = rows >= nq
        order = np.argsort(cols[gal], kind="stable")
        self.col_rows = (rows[gal] - nq)[order]
        self.col_vals = vals[gal][order]
        self.col_indptr = _csr_indptr(cols[gal], n)
        col_nnz = np.diff(self.col_indptr)
        self.col_nnz = col_nnz
        # query part of V by row
        query = rows < nq
        self.q_rows, self.q_cols, self.q_vals = rows[query], cols[query], vals[query]
        self.q_indptr = _csr_indptr(self.q_rows, nq)
        pairs_per_row = np.bincount(self.q_rows, weights=col_nnz[self.q_cols], minlength=nq)
        self.cum_pairs = np.concatenate([[0.0], np.cumsum(pairs_per_row)])

    def blocks(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Split queries ``start:stop`` into ranges of bounded work (rows and overlap pairs)."""
        max_rows = max(1, _shared.BLOCK_ELEMENTS // self.num_gallery)
        s = start
        while s < stop:
            budget = self.cum_pairs[s] + _shared.BLOCK_ELEMENTS
            by_pairs = int(np.searchsorted(self.cum_pairs, budget, "right"))
            e = min(stop, s + max_rows, max(s + 1, by_pairs - 1))
            yield s, e
            s = e

    def rows(self, s: int, e: int) -> F32Array:
        """``(e - s, G)`` float32 Jaccard distances of queries ``s:e``."""
        ng = self.num_gallery
        a, b = self.q_indptr[s], self.q_indptr[e]
        lengths = self.col_nnz[self.q_cols[a:b]]
        pos = _ragged_positions(self.col_indptr[self.q_cols[a:b]], lengths)
        owner = np.repeat(self.q_rows[a:b] - s, lengths)
        weight = np.minimum(np.repeat(self.q_vals[a:b], lengths), self.col_vals[pos])
        temp_min = np.bincount(
            owner * ng + self.col_rows[pos], weights=weight, minlength=(e - s) * ng
        ).reshape(e - s, ng)
        out: F32Array = (1.0 - temp_min / (2.0 - temp_min)).astype(np.float32)
        return out
