"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), sparse and vectorised."""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from . import _shared
from ._kreciprocal import (
    F32Array,
    SparseJaccard,
    check_rerank_params,
    expanded_sets,
    gaussian_weights,
    query_expansion,
    sq32,
)
from ._kreciprocal_torch import MatrixDistances, TorchReRanker

__all__ = ["re_ranking", "re_ranking_on_device"]

DistT = TypeVar("DistT", npt.NDArray[Any], torch.Tensor)

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


def _as_device_tensor(x: object, name: str) -> torch.Tensor:
    """``x`` as a 2-D float tensor on its device (half precision widened to float32, integers
    to float64, as the NumPy path does)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
    t = x.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.is_floating_point():
        t = t.double()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    return t


def _check_values(arr: npt.NDArray[Any] | torch.Tensor, name: str) -> None:
    """Refuse NaN, infinite and negative distances (similarities passed by mistake)."""
    if arr.size == 0 if isinstance(arr, np.ndarray) else arr.numel() == 0:
        return
    low, high = float(arr.min()), float(arr.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite distances")
    if low < -NEGATIVE_TOLERANCE * max(1.0, abs(high)):
        raise ValueError(
            f"{name} contains negative distances (min {low:.6g}): re_ranking expects "
            "distances (smaller is more similar), not similarities; pass 1 - similarity or "
            "a distance from pairwise_distance"
        )


# Distances below -NEGATIVE_TOLERANCE * max(1, largest distance) are refused: beyond rounding
# error, they are similarities passed by mistake.
NEGATIVE_TOLERANCE = 1e-5


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
            step = max(1, _shared.BLOCK_ELEMENTS // max(1, mat.shape[1]))
            for s in range(0, mat.shape[0], step):
                np.maximum(out, sq32(mat[s : s + step]).max(axis=0), out=out)

        fold_columns(self.q_q, col_max[:nq])
        fold_columns(self.q_g, col_max[nq:])
        fold_columns(self.g_g, col_max[nq:])
        step = max(1, _shared.BLOCK_ELEMENTS // max(1, self.num_gallery))
        for s in range(0, nq, step):
            e = min(nq, s + step)
            np.maximum(col_max[s:e], sq32(self.q_g[s:e]).max(axis=1), out=col_max[s:e])
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
        rows[:, :nq] = sq32(parts[0])
        rows[:, nq:] = sq32(parts[1])
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
            values[mask] = sq32(mat[r[mask], c[mask]])
        out: F32Array = (values / self.col_max[i]).astype(np.float32, copy=False)
        return out

    def nearest(self, k: int) -> IntArray:
        """``(N, k)``: the first ``k`` columns of ``argsort(original, kind="stable")``."""
        n = self.total
        nearest = np.empty((n, k), dtype=np.int64)
        step = max(1, _shared.BLOCK_ELEMENTS // n)
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


def _check_inputs(
    q_g: npt.NDArray[Any] | torch.Tensor,
    q_q: npt.NDArray[Any] | torch.Tensor,
    g_g: npt.NDArray[Any] | torch.Tensor,
    k1: object,
    k2: object,
    lambda_value: object,
) -> tuple[int, int, float]:
    """Check the shapes and values of the three matrices and the parameters."""
    nq, ng = q_g.shape
    if nq == 0:
        raise ValueError(f"empty query set: q_g_dist has shape {tuple(q_g.shape)}")
    if ng == 0:
        raise ValueError(f"empty gallery: q_g_dist has shape {tuple(q_g.shape)}")
    if tuple(q_q.shape) != (nq, nq):
        raise ValueError(
            f"q_q_dist has shape {tuple(q_q.shape)}, expected {(nq, nq)} from q_g_dist"
        )
    if tuple(g_g.shape) != (ng, ng):
        raise ValueError(
            f"g_g_dist has shape {tuple(g_g.shape)}, expected {(ng, ng)} from q_g_dist"
        )
    params = check_rerank_params(k1, k2, lambda_value, nq, ng)
    for arr, name in ((q_g, "q_g_dist"), (q_q, "q_q_dist"), (g_g, "g_g_dist")):
        _check_values(arr, name)
    return params


def re_ranking_on_device(
    q_g: torch.Tensor,
    q_q: torch.Tensor,
    g_g: torch.Tensor,
    *,
    k1: int,
    k2: int,
    lambda_value: float,
    sparse_on_device: bool | None = None,
) -> torch.Tensor:
    """:func:`re_ranking` of validated float tensors with torch, on their device: the
    neighbour search and the final distances stay there; the sparse steps run there too on
    CUDA, on the host otherwise (``sparse_on_device`` chooses)."""
    with torch.no_grad():
        source = MatrixDistances(q_g, q_q, g_g)
        reranker = TorchReRanker(
            source, k1=k1, k2=k2, lambda_value=lambda_value, sparse_on_device=sparse_on_device
        )
        nq = q_g.shape[0]
        step = max(1, _shared.BLOCK_ELEMENTS // max(1, q_g.shape[1]))
        return torch.cat([reranker.rows(s, min(nq, s + step)) for s in range(0, nq, step)])


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
        device when ``q_g_dist`` is a tensor. CUDA tensors are re-ranked on their device, the
        sparse steps included.
    """
    if isinstance(q_g_dist, torch.Tensor) and q_g_dist.device.type != "cpu":
        tensors = (
            _as_device_tensor(q_g_dist, "q_g_dist"),
            _as_device_tensor(q_q_dist, "q_q_dist"),
            _as_device_tensor(g_g_dist, "g_g_dist"),
        )
        k1, k2, lambda_value = _check_inputs(*tensors, k1, k2, lambda_value)
        result = re_ranking_on_device(*tensors, k1=k1, k2=k2, lambda_value=lambda_value)
        return result
    q_g = _to_numpy(q_g_dist, "q_g_dist")
    q_q = _to_numpy(q_q_dist, "q_q_dist")
    g_g = _to_numpy(g_g_dist, "g_g_dist")
    k1, k2, lambda_value = _check_inputs(q_g, q_q, g_g, k1, k2, lambda_value)
    nq, ng = q_g.shape
    combined = _Combined(q_g, q_q, g_g)
    nearest = combined.nearest(max(k1 + 1, k2))
    rows, cols = expanded_sets(nearest, k1)
    vals = gaussian_weights(rows, combined.original_at(rows, cols), combined.total)
    if k2 != 1:
        rows, cols, vals = query_expansion(rows, cols, vals, nearest, k2)
    del nearest
    jaccard = SparseJaccard(rows, cols, vals, nq, ng)
    final = np.empty((nq, ng), dtype=np.float32)
    for s, e in jaccard.blocks(0, nq):
        original = sq32(combined.q_g[s:e]) / combined.col_max[s:e, None]
        final[s:e] = jaccard.rows(s, e) * np.float32(1.0 - lambda_value)
        final[s:e] += original * np.float32(lambda_value)
    if isinstance(q_g_dist, torch.Tensor):
        return torch.from_numpy(final).to(q_g_dist.device)
    return final
