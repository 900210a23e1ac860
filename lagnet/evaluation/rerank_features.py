"""k-reciprocal re-ranking computed from the features, for galleries where the dense
query/gallery distance matrices do not fit in memory (MSMT17: 11,659 x 82,161).

The method and its numbers are those of :func:`~lagnet.evaluation.re_ranking` on the matrices
of :func:`~lagnet.evaluation.pairwise_distance` (same "original" distance: squared distances
divided by the largest squared distance of each item). What changes is where the numbers come
from: the ``N = Q + G`` items' nearest neighbours are found with an exact k-nearest-neighbour
search over blocks of rows of the (never stored) ``(N, N)`` distance matrix, on the features'
device; the sparse steps (reciprocal sets, weights, query expansion, Jaccard overlaps) run on
the host; the re-ranked ``(Q, G)`` distances are produced a block of queries at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import torch

from lagnet._validation import check_positive_int

from . import _shared
from ._kreciprocal import (
    SparseJaccard,
    check_rerank_params,
    expanded_sets,
    gaussian_weights,
    query_expansion,
)
from .distance import (
    DEFAULT_BLOCK_ROWS,
    DistanceBlocks,
    Metric,
    check_features,
    check_finite_features,
    check_metric,
    check_pair,
)

__all__ = ["iter_re_ranking_features", "re_ranking_features"]

# Pairs per step when computing the distances of the reciprocal-set members.
_PAIR_CHUNK = 1 << 13
# Original distances kept per item from the neighbour search: this many times k1.
_KEPT_PER_K1 = 3


def _smallest_stable(values: torch.Tensor, k: int) -> torch.Tensor:
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


class _FeatureReRanker:
    """The k-reciprocal state of a query/gallery set, built once from the features."""

    def __init__(
        self,
        qf: torch.Tensor,
        gf: torch.Tensor,
        *,
        k1: int,
        k2: int,
        lambda_value: float,
        metric: Metric,
        dtype: torch.dtype,
    ) -> None:
        self.num_query, self.num_gallery = qf.shape[0], gf.shape[0]
        self.lambda_value = lambda_value
        self.dtype = dtype
        self.qf = qf
        self.gallery_blocks = DistanceBlocks(gf, metric, dtype)
        x = torch.cat([qf.to(dtype), gf.to(dtype)])
        n = x.shape[0]
        k = max(k1 + 1, k2)
        # 1. exact k nearest neighbours of every item under the original distance; the
        # original distances of a few more are kept: most members of the expanded sets are
        # among them, and the others are computed pair by pair in step 2
        kept = min(n, max(k, _KEPT_PER_K1 * k1))
        blocks = DistanceBlocks(x, metric, dtype)
        nearest = torch.empty((n, kept), dtype=torch.int64, device=x.device)
        nearest_original = torch.empty((n, kept), dtype=torch.float32, device=x.device)
        self.col_max = torch.empty(n, dtype=torch.float32, device=x.device)
        step = max(1, (4 * _shared.BLOCK_ELEMENTS) // n)
        for s in range(0, n, step):
            sq = blocks(x[s : s + step]).square_().float()
            row_max = sq.amax(dim=1)
            if not bool((row_max > 0).all()):
                zero = s + int((row_max <= 0).nonzero()[0, 0])
                raise ValueError(
                    f"item {zero} of [query; gallery] is at distance 0 from every item; "
                    "re-ranking divides each item's distances by their maximum"
                )
            self.col_max[s : s + step] = row_max
            columns = _smallest_stable(sq.div_(row_max[:, None]), kept)
            nearest[s : s + step] = columns
            nearest_original[s : s + step] = sq.gather(1, columns)
        nearest_np = nearest.cpu().numpy()
        known = (nearest_np, nearest_original.cpu().numpy())
        nearest_np = np.ascontiguousarray(nearest_np[:, :k])
        del nearest, nearest_original
        # 2. expanded reciprocal sets and their weights, sparse, on the host
        rows, cols = expanded_sets(nearest_np, k1)
        original = self._pair_original(x, blocks, rows, cols, *known)
        vals = gaussian_weights(rows, original, n)
        if k2 != 1:
            rows, cols, vals = query_expansion(rows, cols, vals, nearest_np, k2)
        self.jaccard = SparseJaccard(rows, cols, vals, self.num_query, self.num_gallery)

    def _pair_original(
        self,
        x: torch.Tensor,
        blocks: DistanceBlocks,
        rows: npt.NDArray[np.int64],
        cols: npt.NDArray[np.int64],
        known_cols: npt.NDArray[np.int64],
        known_values: npt.NDArray[np.float32],
    ) -> npt.NDArray[np.float32]:
        """Original distances ``d(x_i, x_j)**2 / col_max[i]`` (float32) of index pairs: looked
        up in ``known_*`` (``(N, K)`` columns and values of each row), or computed."""
        n = known_cols.shape[0]
        known_keys = (np.arange(n, dtype=np.int64)[:, None] * n + known_cols).reshape(-1)
        by_key = np.argsort(known_keys)
        sorted_keys = known_keys[by_key]
        keys = rows * n + cols
        at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
        found = sorted_keys[at] == keys
        out = np.empty(rows.size, dtype=np.float32)
        out[found] = known_values.reshape(-1)[by_key[at[found]]]
        missing = np.flatnonzero(~found)
        rows, cols = rows[missing], cols[missing]
        y = blocks.y  # normalised for the cosine metric
        for a in range(0, rows.size, _PAIR_CHUNK):
            i = torch.from_numpy(rows[a : a + _PAIR_CHUNK]).to(x.device)
            j = torch.from_numpy(cols[a : a + _PAIR_CHUNK]).to(x.device)
            dot = (y[i] * y[j]).sum(dim=1)
            if blocks.metric == "cosine":
                dist = dot.neg_().add_(1.0)
            else:
                dist = dot.mul_(-2.0).add_(blocks.y_sq[i]).add_(blocks.y_sq[j]).clamp_(min=0.0)
                if blocks.metric == "euclidean":
                    dist.sqrt_()
            value = dist.square_().float() / self.col_max[i]
            out[missing[a : a + i.shape[0]]] = value.cpu().numpy()
        return out

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """``(stop - start, G)`` float32 re-ranked distances of queries ``start:stop``
        (``start`` a multiple of 256, so the distances are those of ``pairwise_distance``)."""
        device = self.col_max.device
        out = torch.empty((stop - start, self.num_gallery), dtype=torch.float32, device=device)
        for b in range(start, stop, DEFAULT_BLOCK_ROWS):
            e = min(stop, b + DEFAULT_BLOCK_ROWS)
            out[b - start : e - start] = self.gallery_blocks(self.qf[b:e]).square_().float()
        out.div_(self.col_max[start:stop, None])
        out.mul_(self.lambda_value)
        for s, e in self.jaccard.blocks(start, stop):
            jaccard = torch.from_numpy(self.jaccard.rows(s, e)).to(device)
            out[s - start : e - start].add_(jaccard.mul_(1.0 - self.lambda_value))
        return out


def iter_re_ranking_features(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric = "euclidean",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Re-ranked distances a block of queries at a time: yields ``(start, distances)`` with
    ``distances`` ``(C, G)`` float32 for queries ``start:start + C``, on ``device``.

    Same arguments as :func:`re_ranking_features` (``chunk_size`` is ``C``, rounded up to a
    multiple of 256); the neighbour search runs when iteration starts. Feed the blocks to an
    evaluation or keep what you need of them: memory stays at one block plus the features and
    the sparse neighbour sets.
    """
    qf = check_features(query_features, "query_features")
    gf = check_features(gallery_features, "gallery_features")
    dtype = check_pair(qf, gf, "query_features", "gallery_features")
    metric = check_metric(metric)
    num_query, num_gallery = qf.shape[0], gf.shape[0]
    if num_query == 0:
        raise ValueError(f"empty query set: query_features has shape {tuple(qf.shape)}")
    if num_gallery == 0:
        raise ValueError(f"empty gallery: gallery_features has shape {tuple(gf.shape)}")
    k1, k2, lambda_value = check_rerank_params(k1, k2, lambda_value, num_query, num_gallery)
    step = (
        4 * DEFAULT_BLOCK_ROWS
        if chunk_size is None
        else check_positive_int(chunk_size, "chunk_size")
    )
    step = -(-step // DEFAULT_BLOCK_ROWS) * DEFAULT_BLOCK_ROWS
    target = qf.device if device is None else torch.device(device)
    check_finite_features(qf, "query_features")
    check_finite_features(gf, "gallery_features")
    return _iterate(
        qf.detach().to(target), gf.detach().to(target), k1, k2, lambda_value, metric, dtype, step
    )


def _iterate(
    qf: torch.Tensor,
    gf: torch.Tensor,
    k1: int,
    k2: int,
    lambda_value: float,
    metric: Metric,
    dtype: torch.dtype,
    step: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    with torch.no_grad():
        reranker = _FeatureReRanker(
            qf, gf, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric, dtype=dtype
        )
        for start in range(0, qf.shape[0], step):
            yield start, reranker.rows(start, min(qf.shape[0], start + step))


def re_ranking_features(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric = "euclidean",
    top_k: int | None = 100,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) from query and gallery features.

    The numbers of ``re_ranking(pairwise_distance(q, g), pairwise_distance(q, q),
    pairwise_distance(g, g))`` with the same ``metric``, ``k1``, ``k2`` and ``lambda_value``
    (equal within about 1e-6: the two compute the same distances with different matrix
    products), without ever holding an ``(N, N)`` or ``(Q, G)`` matrix: memory is about the
    features, ``(Q + G) * max(k1 + 1, k2)`` neighbour indices, the sparse reciprocal sets, and
    ``chunk_size x (Q + G)`` distances at a time. Runs on the features' device (or ``device``);
    the sparse steps run on the host.

    Args:
        query_features: ``(Q, D)`` floating-point tensor.
        gallery_features: ``(G, D)`` tensor on the same device.
        k1, k2, lambda_value: see :func:`~lagnet.evaluation.re_ranking`.
        metric: the distance the method starts from (see
            :func:`~lagnet.evaluation.pairwise_distance`).
        top_k: gallery items kept per query (``None``: all ``G``, then the result is
            ``(Q, G)``).
        chunk_size: queries per step (default 1024, rounded up to a multiple of 256).
        device: where to compute (default: the features' device).

    Returns:
        ``(distances, indices)``, both ``(Q, top_k)``: the smallest re-ranked distances of each
        query in increasing order (ties by gallery index), float32, and their gallery indices,
        int64, on the compute device.

    Raises:
        TypeError / ValueError: non-tensor or non-float features, mismatched dimensions or
            devices, NaN or infinite features, bad ``k1`` / ``k2`` / ``lambda_value`` /
            ``top_k``, or an item at distance 0 from everything.
    """
    blocks = iter_re_ranking_features(
        query_features,
        gallery_features,
        k1=k1,
        k2=k2,
        lambda_value=lambda_value,
        metric=metric,
        chunk_size=chunk_size,
        device=device,
    )
    num_gallery = gallery_features.shape[0]
    keep = num_gallery if top_k is None else min(check_positive_int(top_k, "top_k"), num_gallery)
    values: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    for _, dist in blocks:
        if keep == num_gallery:
            v, i = torch.sort(dist, dim=1, stable=True)
        else:
            i = _smallest_stable(dist, keep)
            v = dist.gather(1, i)
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)
