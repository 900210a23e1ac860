"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), sparse and vectorised."""

from __future__ import annotations

import itertools
import numbers
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from .metrics import _BLOCK_ELEMENTS, _check_positive_int

__all__ = ["re_ranking"]

DistT = TypeVar("DistT", npt.NDArray[Any], torch.Tensor)

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def _to_numpy(x: object, name: str) -> npt.NDArray[Any]:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
        t = x.detach()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        arr: npt.NDArray[Any] = t.cpu().numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real-valued, got dtype {arr.dtype}")
    if arr.dtype.kind in "iu" or arr.dtype == np.float16:
        arr = arr.astype(np.float64 if arr.dtype.kind in "iu" else np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    return arr


def _check_finite(arr: npt.NDArray[Any], name: str) -> None:
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        raise ValueError(f"{name} contains NaN or infinite distances")


def check_rerank_params(
    k1: object, k2: object, lambda_value: object, num_query: int, num_gallery: int
) -> tuple[int, int, float]:
    """Validate re-ranking parameters for ``num_query`` queries and ``num_gallery`` gallery
    items; returns ``(k1, k2, lambda_value)``."""
    k1_ = _check_positive_int(k1, "k1")
    k2_ = _check_positive_int(k2, "k2")
    total = num_query + num_gallery
    if k1_ > num_gallery or k1_ > total - 1:
        raise ValueError(
            f"k1={k1_} is larger than the gallery ({num_gallery} items; query + gallery - 1 = "
            f"{total - 1}): the k1 nearest neighbours do not exist"
        )
    if k2_ > total:
        raise ValueError(f"k2={k2_} is larger than query + gallery = {total}")
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, numbers.Real):
        raise TypeError(f"lambda_value must be a real number, got {type(lambda_value).__name__}")
    lam = float(lambda_value)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lam}")
    return k1_, k2_, lam


def _sq32(a: npt.NDArray[Any]) -> F32Array:
    """Squared distances as float32, squaring in the input precision first."""
    out: F32Array = np.square(a).astype(np.float32, copy=False)
    return out


def _kth_smallest_bound(rows: F32Array, k: int) -> F32Array:
    """Per row, a value with at least ``k`` entries of the row ``<=`` it, and usually few more.

    The entries are split into ``S >= k`` disjoint strided groups; the k-th smallest of the
    group minima is such a bound (those k minima are k distinct entries). One vectorised pass,
    much cheaper than a partition of every row."""
    n = rows.shape[1]
    groups = min(n, 32 * k)
    length = n // groups
    if length < 4:
        out: F32Array = np.partition(rows, k - 1, axis=1)[:, k - 1]
        return out
    minima = rows[:, : groups * length].reshape(rows.shape[0], length, groups).min(axis=1)
    out = np.partition(minima, k - 1, axis=1)[:, k - 1]
    return out


class _Combined:
    """The ``(N, N)`` matrix ``A = [[q_q, q_g], [q_g^T, g_g]]`` (N = Q + G), never materialised.

    The published algorithm works on ``original = (A**2 / max(A**2, axis=0)).T``; row ``i`` of
    ``original`` is column ``i`` of ``A`` squared and divided by that column's maximum."""

    def __init__(self, q_g: npt.NDArray[Any], q_q: npt.NDArray[Any], g_g: npt.NDArray[Any]) -> None:
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_query, self.num_gallery = q_g.shape
        self.total = self.num_query + self.num_gallery
        self.col_max = self._column_max()
        zero = np.flatnonzero(self.col_max <= 0)
        if zero.size:
            raise ValueError(
                f"column {int(zero[0])} of the combined distance matrix [[q_q, q_g], "
                "[q_g.T, g_g]] is all zero; re-ranking divides each column by its maximum"
            )

    def _column_max(self) -> F32Array:
        nq = self.num_query
        col_max = np.zeros(self.total, dtype=np.float32)

        def fold_columns(mat: npt.NDArray[Any], out: F32Array) -> None:
            step = max(1, _BLOCK_ELEMENTS // max(1, mat.shape[1]))
            for s in range(0, mat.shape[0], step):
                np.maximum(out, _sq32(mat[s : s + step]).max(axis=0), out=out)

        fold_columns(self.q_q, col_max[:nq])
        fold_columns(self.q_g, col_max[nq:])
        fold_columns(self.g_g, col_max[nq:])
        step = max(1, _BLOCK_ELEMENTS // max(1, self.num_gallery))
        for s in range(0, nq, step):
            e = min(nq, s + step)
            np.maximum(col_max[s:e], _sq32(self.q_g[s:e]).max(axis=1), out=col_max[s:e])
        return col_max

    def original_rows(self, start: int, stop: int) -> F32Array:
        """Rows ``start:stop`` of ``original`` (all on the same side of the query boundary)."""
        nq = self.num_query
        if stop <= nq:
            parts = (self.q_q[:, start:stop].T, self.q_g[start:stop])
        else:
            a, b = start - nq, stop - nq
            parts = (self.q_g[:, a:b].T, self.g_g[:, a:b].T)
        rows = np.empty((stop - start, self.total), dtype=np.float32)  # C order
        rows[:, :nq] = _sq32(parts[0])
        rows[:, nq:] = _sq32(parts[1])
        rows /= self.col_max[start:stop, None]
        return rows

    def original_at(self, i: IntArray, j: IntArray) -> F32Array:
        """``original[i, j]`` for index arrays ``i``, ``j``: ``A[j, i]**2 / col_max[i]``."""
        nq = self.num_query
        values = np.empty(i.shape, dtype=np.float32)
        iq, jq = i < nq, j < nq
        for mask, mat, r, c in (
            (iq & jq, self.q_q, j, i),
            (iq & ~jq, self.q_g, i, j - nq),
            (~iq & jq, self.q_g, j, i - nq),
            (~iq & ~jq, self.g_g, j - nq, i - nq),
        ):
            values[mask] = _sq32(mat[r[mask], c[mask]])
        out: F32Array = (values / self.col_max[i]).astype(np.float32, copy=False)
        return out

    def nearest(self, k: int) -> IntArray:
        """``(N, k)``: the first ``k`` columns of ``argsort(original, kind="stable")``."""
        n = self.total
        nearest = np.empty((n, k), dtype=np.int64)
        step = max(1, _BLOCK_ELEMENTS // n)
        bounds = [*sorted({*range(0, n, step), self.num_query}), n]
        for start, stop in itertools.pairwise(bounds):
            rows = self.original_rows(start, stop)
            bound = _kth_smallest_bound(rows, k)
            flat = np.flatnonzero(rows <= bound[:, None])  # >= k per row
            r = flat // n
            c = flat - r * n
            order = np.lexsort((rows.reshape(-1)[flat], r))  # stable: ties by column index
            r, c = r[order], c[order]
            per_row = np.bincount(r, minlength=stop - start)
            pos = np.arange(r.size) - (np.cumsum(per_row) - per_row)[r]
            sel = pos < k
            nearest[start + r[sel], pos[sel]] = c[sel]
        return nearest


def _reciprocal_mask(neighbours: IntArray) -> npt.NDArray[np.bool_]:
    """``mask[i, a]``: ``i`` is among the neighbours of its neighbour ``neighbours[i, a]``."""
    n, k = neighbours.shape
    mask = np.empty((n, k), dtype=np.bool_)
    step = max(1, _BLOCK_ELEMENTS // (k * k))
    for s in range(0, n, step):
        block = neighbours[s : s + step]
        own = np.arange(s, s + block.shape[0])[:, None, None]
        mask[s : s + step] = (neighbours[block] == own).any(axis=2)
    return mask


def _expanded_sets(nearest: IntArray, k1: int) -> tuple[IntArray, IntArray]:
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
    step = max(1, _BLOCK_ELEMENTS // (k * kh * k))
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


def _query_expansion(
    rows: IntArray, cols: IntArray, vals: F32Array, nearest: IntArray, k2: int
) -> tuple[IntArray, IntArray, F32Array]:
    """Sparse ``V_qe[i] = mean(V[nearest[i, :k2]], axis=0)``."""
    n = nearest.shape[0]
    indptr = _csr_indptr(rows, n)
    nnz = np.diff(indptr)
    out_r: list[IntArray] = []
    out_c: list[IntArray] = []
    out_v: list[F32Array] = []
    step = max(1, _BLOCK_ELEMENTS // n)
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


def _jaccard_final(
    rows: IntArray,
    cols: IntArray,
    vals: F32Array,
    combined: _Combined,
    lambda_value: float,
) -> F32Array:
    """``(Q, G)`` final distance from the sparse ``V`` (rows sorted, then columns)."""
    nq, ng, n = combined.num_query, combined.num_gallery, combined.total
    # gallery part of V by column: for column l, the gallery rows j with V[j, l] != 0
    gal = rows >= nq
    order = np.argsort(cols[gal], kind="stable")
    col_rows = (rows[gal] - nq)[order]
    col_vals = vals[gal][order]
    col_indptr = _csr_indptr(cols[gal], n)
    col_nnz = np.diff(col_indptr)
    # query part of V by row
    query = rows < nq
    q_rows, q_cols, q_vals = rows[query], cols[query], vals[query]
    q_indptr = _csr_indptr(q_rows, nq)
    pairs_per_row = np.bincount(q_rows, weights=col_nnz[q_cols], minlength=nq)
    cum_pairs = np.concatenate([[0.0], np.cumsum(pairs_per_row)])

    out = np.empty((nq, ng), dtype=np.float32)
    max_rows = max(1, _BLOCK_ELEMENTS // ng)
    s = 0
    while s < nq:
        by_pairs = int(np.searchsorted(cum_pairs, cum_pairs[s] + _BLOCK_ELEMENTS, "right"))
        e = min(nq, s + max_rows, max(s + 1, by_pairs - 1))
        a, b = q_indptr[s], q_indptr[e]
        lengths = col_nnz[q_cols[a:b]]
        pos = _ragged_positions(col_indptr[q_cols[a:b]], lengths)
        owner = np.repeat(q_rows[a:b] - s, lengths)
        weight = np.minimum(np.repeat(q_vals[a:b], lengths), col_vals[pos])
        temp_min = np.bincount(
            owner * ng + col_rows[pos], weights=weight, minlength=(e - s) * ng
        ).reshape(e - s, ng)
        jaccard = (1.0 - temp_min / (2.0 - temp_min)).astype(np.float32)
        original = _sq32(combined.q_g[s:e]) / combined.col_max[s:e, None]
        out[s:e] = jaccard * np.float32(1.0 - lambda_value) + original * np.float32(lambda_value)
        s = e
    return out


def re_ranking(
    q_g_dist: DistT,
    q_q_dist: DistT,
    g_g_dist: DistT,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> DistT:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017).

    Same inputs and output as the widely used ``re_ranking.py``: the distances are squared,
    each column of the combined ``(Q+G, Q+G)`` matrix ``[[q_q, q_g], [q_g^T, g_g]]`` is divided
    by its maximum (then transposed), k1-reciprocal neighbour sets are built from the initial
    ranking and expanded with the candidates' ``round(k1/2)``-reciprocal sets that overlap them
    by more than 2/3, Gaussian weights ``exp(-d)`` normalised per row give ``V``, which is
    averaged over the ``k2`` nearest neighbours (local query expansion), and the Jaccard
    distance ``1 - s / (2 - s)`` with ``s = sum_l min(V[i, l], V[j, l])`` is blended as
    ``jaccard * (1 - lambda_value) + original * lambda_value``.

    Equal distances in the initial ranking are ordered by index (stable sort); the published
    code uses an unstable sort, so results can only differ when distances tie exactly.

    Memory: besides the inputs and the ``(Q, G)`` float32 output, everything is sparse or
    blocked: ``O((Q + G) * k1^2)`` for the neighbour sets, ``O((Q + G) * k1 * k2)`` nonzeros for
    ``V``, and blocks of about 16 MiB of distances. The published code holds several dense
    ``(Q+G)^2`` arrays (original distance, ``V``, ``V_qe``, the int64 argsort); for Market-1501
    (19,281 images) that is about 7 GB versus about 0.5 GB here on top of the inputs.

    Args:
        q_g_dist: ``(Q, G)`` query-gallery distances (NumPy array or torch tensor).
        q_q_dist: ``(Q, Q)`` query-query distances.
        g_g_dist: ``(G, G)`` gallery-gallery distances.
        k1: neighbourhood size of the k-reciprocal sets (``1 <= k1 <= G``).
        k2: neighbourhood size of the query expansion (``1 <= k2 <= Q + G``; 1 disables it).
        lambda_value: weight of the original distance, in ``[0, 1]``.

    Returns:
        ``(Q, G)`` float32 re-ranked distances: a NumPy array, or a tensor on ``q_g_dist``'s
        device when ``q_g_dist`` is a tensor.
    """
    q_g = _to_numpy(q_g_dist, "q_g_dist")
    q_q = _to_numpy(q_q_dist, "q_q_dist")
    g_g = _to_numpy(g_g_dist, "g_g_dist")
    nq, ng = q_g.shape
    if nq == 0:
        raise ValueError(f"empty query set: q_g_dist has shape {q_g.shape}")
    if ng == 0:
        raise ValueError(f"empty gallery: q_g_dist has shape {q_g.shape}")
    if q_q.shape != (nq, nq):
        raise ValueError(f"q_q_dist has shape {q_q.shape}, expected {(nq, nq)} from q_g_dist")
    if g_g.shape != (ng, ng):
        raise ValueError(f"g_g_dist has shape {g_g.shape}, expected {(ng, ng)} from q_g_dist")
    k1, k2, lambda_value = check_rerank_params(k1, k2, lambda_value, nq, ng)
    for arr, name in ((q_g, "q_g_dist"), (q_q, "q_q_dist"), (g_g, "g_g_dist")):
        _check_finite(arr, name)

    combined = _Combined(q_g, q_q, g_g)
    nearest = combined.nearest(max(k1 + 1, k2))
    rows, cols = _expanded_sets(nearest, k1)
    weights = np.exp(-combined.original_at(rows, cols))
    row_sum = np.bincount(rows, weights=weights, minlength=combined.total).astype(np.float32)
    vals = (weights / row_sum[rows]).astype(np.float32)
    if k2 != 1:
        rows, cols, vals = _query_expansion(rows, cols, vals, nearest, k2)
    del nearest
    final = _jaccard_final(rows, cols, vals, combined, lambda_value)
    if isinstance(q_g_dist, torch.Tensor):
        return torch.from_numpy(final).to(q_g_dist.device)
    return final
