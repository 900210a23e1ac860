"""The neighbour search and the final distances of k-reciprocal re-ranking with torch, on the
distances' device (internal; shared by the re-ranking from features and the dense re-ranking of
CUDA matrices).

The method works on the "original" distance ``original[i, j] = A[j, i]**2 / max_l A[l, i]**2``
of the combined matrix ``A = [[q_q, q_g], [q_g^T, g_g]]``. A *source* gives the squared
distances that make it up, a block of rows at a time, so the ``(N, N)`` matrix never exists:
:class:`FeatureDistances` computes them from features, :class:`MatrixDistances` reads them from
the three dense matrices. :class:`TorchReRanker` finds every item's nearest neighbours from
those rows, runs the sparse steps (:mod:`._kreciprocal` on the host, or
:mod:`._kreciprocal_device` on a CUDA device), and produces the
re-ranked ``(Q, G)`` distances a block of queries at a time.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from . import _kreciprocal_device as device_steps
from . import _shared
from ._kreciprocal import SparseJaccard, expanded_sets, gaussian_weights, query_expansion
from ._kreciprocal_device import DeviceSparseJaccard
from .distance import DEFAULT_BLOCK_ROWS, DistanceBlocks, Metric

__all__ = ["FeatureDistances", "MatrixDistances", "TorchReRanker", "smallest_stable"]

# Pairs per step when computing the distances of the reciprocal-set members.
_PAIR_CHUNK = 1 << 13
# Original distances kept per item from the neighbour search: this many times k1.
_KEPT_PER_K1 = 3
# On CUDA the sparse steps work on blocks this many times larger (fewer, fuller launches).
_DEVICE_BLOCK_FACTOR = 8


def smallest_stable(values: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` column indices of the ``k`` smallest entries of each row of ``values``
    ``(B, N)``, in increasing order with ties broken by column index (a stable sort's first
    ``k`` columns), without sorting whole rows."""
    top = torch.topk(values, k, dim=1, largest=False, sorted=False)
    kth = top.values.amax(dim=1, keepdim=True)
    columns = torch.sort(top.indices, dim=1).values  # the k columns, in column order
    tied = (values <= kth).sum(dim=1) > k  # another entry ties with the k-th: choose by index
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        sub, sub_kth = values[rows], kth[rows]
        at = sub == sub_kth
        need = k - (sub < sub_kth).sum(dim=1, keepdim=True)
        chosen = (sub < sub_kth) | (at & (torch.cumsum(at, dim=1, dtype=torch.int32) <= need))
        columns[rows] = chosen.nonzero()[:, 1].view(rows.shape[0], k)
    order = torch.sort(values.gather(1, columns), dim=1, stable=True).indices
    return columns.gather(1, order)


class SquaredDistances(Protocol):
    """Where the squared distances of the combined matrix ``A`` come from."""

    num_query: int
    num_gallery: int
    device: torch.device

    def column_rows(self, start: int, stop: int) -> torch.Tensor:
        """``(B, N)`` float32: row ``r`` is ``A[:, start + r]**2``."""

    def pairs(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``(P,)`` float32 ``A[j, i]**2`` for index tensors ``i``, ``j``."""

    def query_gallery(self, start: int, stop: int) -> torch.Tensor:
        """``(C, G)`` float32 ``q_g[start:stop]**2``."""

    def all_zero(self, item: int) -> str:
        """The error message for an item whose distances are all zero."""


class FeatureDistances:
    """Squared distances computed from ``(Q, D)`` and ``(G, D)`` features with ``metric``."""

    def __init__(self, qf: torch.Tensor, gf: torch.Tensor, metric: Metric, dtype: torch.dtype):
        self.num_query, self.num_gallery = qf.shape[0], gf.shape[0]
        self.device = qf.device
        self.qf = qf
        self.gallery_blocks = DistanceBlocks(gf, metric, dtype)
        self.x = torch.cat([qf.to(dtype), gf.to(dtype)])
        self.blocks = DistanceBlocks(self.x, metric, dtype)

    def column_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.blocks(self.x[start:stop]).square_().float()

    def pairs(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        y = self.blocks.y  # normalised for the cosine metric
        dot = (y[i] * y[j]).sum(dim=1)
        if self.blocks.metric == "cosine":
            return dot.neg_().add_(1.0).square_().float()
        dist = dot.mul_(-2.0).add_(self.blocks.y_sq[i]).add_(self.blocks.y_sq[j]).clamp_(min=0.0)
        if self.blocks.metric == "euclidean":
            dist.sqrt_()
        return dist.square_().float()

    def query_gallery(self, start: int, stop: int) -> torch.Tensor:
        out = torch.empty((stop - start, self.num_gallery), dtype=torch.float32, device=self.device)
        for b in range(start, stop, DEFAULT_BLOCK_ROWS):  # the blocks of pairwise_distance
            e = min(stop, b + DEFAULT_BLOCK_ROWS)
            out[b - start : e - start] = self.gallery_blocks(self.qf[b:e]).square_().float()
        return out

    def all_zero(self, item: int) -> str:
        return (
            f"item {item} of [query; gallery] is at distance 0 from every item; "
            "re-ranking divides each item's distances by their maximum"
        )


class MatrixDistances:
    """Squared distances read from the dense ``q_g`` ``(Q, G)``, ``q_q`` ``(Q, Q)`` and
    ``g_g`` ``(G, G)`` matrices (squared in their precision, then float32)."""

    def __init__(self, q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor) -> None:
        self.num_query, self.num_gallery = q_g.shape
        self.device = q_g.device
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g

    def column_rows(self, start: int, stop: int) -> torch.Tensor:
        nq = self.num_query
        if start < nq < stop:  # a block across the query / gallery boundary
            return torch.cat([self.column_rows(start, nq), self.column_rows(nq, stop)])
        if stop <= nq:
            left, right = self.q_q[:, start:stop].T, self.q_g[start:stop]
        else:
            a, b = start - nq, stop - nq
            left, right = self.q_g[:, a:b].T, self.g_g[:, a:b].T
        rows = torch.empty((stop - start, nq + self.num_gallery), device=self.device)
        rows[:, :nq] = left.square().float()
        rows[:, nq:] = right.square().float()
        return rows

    def pairs(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        nq = self.num_query
        out = torch.empty(i.shape, dtype=torch.float32, device=self.device)
        iq, jq = i < nq, j < nq
        for mask, mat, r, c in (
            (iq & jq, self.q_q, j, i),
            (iq & ~jq, self.q_g, i, j - nq),
            (~iq & jq, self.q_g, j, i - nq),
            (~iq & ~jq, self.g_g, j - nq, i - nq),
        ):
            out[mask] = mat[r[mask], c[mask]].square().float()
        return out

    def query_gallery(self, start: int, stop: int) -> torch.Tensor:
        return self.q_g[start:stop].square().float()

    def all_zero(self, item: int) -> str:
        return (
            f"column {item} of the combined distance matrix [[q_q, q_g], [q_g.T, g_g]] is all "
            "zero; re-ranking divides each column by its maximum"
        )


class TorchReRanker:
    """The k-reciprocal state of a query/gallery set, built once from a distance ``source``.

    ``sparse_on_device``: run the sparse steps with torch on the source's device
    (:mod:`._kreciprocal_device`) instead of with NumPy on the host; default: on CUDA only.
    """

    def __init__(
        self,
        source: SquaredDistances,
        *,
        k1: int,
        k2: int,
        lambda_value: float,
        sparse_on_device: bool | None = None,
    ):
        self.source = source
        self.lambda_value = lambda_value
        nq, ng = source.num_query, source.num_gallery
        n = nq + ng
        k = max(k1 + 1, k2)
        device = source.device
        # 1. exact k nearest neighbours of every item under the original distance; the
        # original distances of a few more are kept: most members of the expanded sets are
        # among them, and the others are computed pair by pair in step 2
        kept = min(n, max(k, _KEPT_PER_K1 * k1))
        nearest = torch.empty((n, kept), dtype=torch.int64, device=device)
        nearest_original = torch.empty((n, kept), dtype=torch.float32, device=device)
        self.col_max = torch.empty(n, dtype=torch.float32, device=device)
        step = max(1, (4 * _shared.BLOCK_ELEMENTS) // n)
        for s in range(0, n, step):
            sq = source.column_rows(s, min(n, s + step))
            col_max = sq.amax(dim=1)
            if not bool((col_max > 0).all()):
                raise ValueError(source.all_zero(s + int((col_max <= 0).nonzero()[0, 0])))
            self.col_max[s : s + step] = col_max
            columns = smallest_stable(sq.div_(col_max[:, None]), kept)
            nearest[s : s + step] = columns
            nearest_original[s : s + step] = sq.gather(1, columns)
        if sparse_on_device is None:
            sparse_on_device = device.type == "cuda"
        # 2. expanded reciprocal sets, their weights and the query expansion, sparse: with
        # torch on the device, or with NumPy on the host
        self.jaccard: SparseJaccard | DeviceSparseJaccard
        if sparse_on_device:
            block = _shared.BLOCK_ELEMENTS * (_DEVICE_BLOCK_FACTOR if device.type == "cuda" else 1)
            nearest_k = nearest[:, :k].contiguous()
            rows_t, cols_t = device_steps.expanded_sets(nearest_k, k1, block)
            original_t = self._pair_original(rows_t, cols_t, nearest, nearest_original)
            del nearest, nearest_original
            vals_t = device_steps.gaussian_weights(rows_t, original_t, n)
            if k2 != 1:
                rows_t, cols_t, vals_t = device_steps.query_expansion(
                    rows_t, cols_t, vals_t, nearest_k, k2, block
                )
            self.jaccard = DeviceSparseJaccard(rows_t, cols_t, vals_t, nq, ng, block)
        else:
            known_cols, known_values = nearest.cpu(), nearest_original.cpu()
            nearest_np = np.ascontiguousarray(known_cols[:, :k].numpy())
            del nearest, nearest_original
            rows, cols = expanded_sets(nearest_np, k1)
            original = self._pair_original(
                torch.from_numpy(rows), torch.from_numpy(cols), known_cols, known_values
            ).numpy()
            del known_cols, known_values
            vals = gaussian_weights(rows, original, n)
            if k2 != 1:
                rows, cols, vals = query_expansion(rows, cols, vals, nearest_np, k2)
            self.jaccard = SparseJaccard(rows, cols, vals, nq, ng)

    def _pair_original(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        known_cols: torch.Tensor,
        known_values: torch.Tensor,
    ) -> torch.Tensor:
        """``original[rows, cols]`` (float32, on the device of ``rows``): looked up in
        ``known_*`` (``(N, K)`` columns and values of each row, on that device too), or
        computed by the source on its device."""
        n = known_cols.shape[0]
        arange = torch.arange(n, dtype=torch.int64, device=known_cols.device)
        known_keys = (arange[:, None] * n + known_cols).reshape(-1)
        sorted_keys, by_key = torch.sort(known_keys)
        keys = rows * n + cols
        at = torch.searchsorted(sorted_keys, keys).clamp_(max=sorted_keys.numel() - 1)
        found = sorted_keys[at] == keys
        out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
        out[found] = known_values.reshape(-1)[by_key[at[found]]]
        missing = (~found).nonzero().squeeze(1)
        device = self.source.device
        chunk_size = _PAIR_CHUNK * (_DEVICE_BLOCK_FACTOR if device.type == "cuda" else 1)
        for a in range(0, missing.numel(), chunk_size):
            chunk = missing[a : a + chunk_size]
            i, j = rows[chunk].to(device), cols[chunk].to(device)
            out[chunk] = (self.source.pairs(i, j) / self.col_max[i]).to(out.device)
        return out

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """``(stop - start, G)`` float32 re-ranked distances of queries ``start:stop``."""
        out = self.source.query_gallery(start, stop)
        out.div_(self.col_max[start:stop, None])
        out.mul_(self.lambda_value)
        for s, e in self.jaccard.blocks(start, stop):
            block = self.jaccard.rows(s, e)
            jaccard = block if isinstance(block, torch.Tensor) else torch.from_numpy(block)
            jaccard = jaccard.to(out.device)
            out[s - start : e - start].add_(jaccard.mul_(1.0 - self.lambda_value))
        return out
