"""The sparse steps of k-reciprocal re-ranking with torch, on the distances' device (internal).

The same steps as :mod:`._kreciprocal` (expanded reciprocal sets, Gaussian weights, local query
expansion, Jaccard distances), written with torch tensors so that CUDA inputs are re-ranked
without leaving the GPU. Sums are taken in float64 and rounded to float32 as NumPy's weighted
``bincount`` does; on a GPU their order differs (atomic adds), and ``exp`` may round its last
bit differently, so the results agree with the host's to about 1e-7, not bit for bit.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["DeviceSparseJaccard", "expanded_sets", "gaussian_weights", "query_expansion"]


def _reciprocal_mask(neighbours: Tensor, block: int) -> Tensor:
    """``mask[i, a]``: ``i`` is among the neighbours of its neighbour ``neighbours[i, a]``."""
    n, k = neighbours.shape
    mask = torch.empty((n, k), dtype=torch.bool, device=neighbours.device)
    step = max(1, block // (k * k))
    for s in range(0, n, step):
        rows = neighbours[s : s + step]
        own = torch.arange(s, s + rows.shape[0], device=rows.device)[:, None, None]
        mask[s : s + step] = (neighbours[rows] == own).any(dim=2)
    return mask


def expanded_sets(nearest: Tensor, k1: int, block: int) -> tuple[Tensor, Tensor]:
    """Rows and columns (sorted, unique per row) of the k-reciprocal expansion sets of the
    items whose neighbours, nearest first, are the rows of ``nearest`` ``(N, >= k1 + 1)``."""
    n = nearest.shape[0]
    forward = nearest[:, : k1 + 1]
    recip = _reciprocal_mask(forward, block)
    half = round(k1 / 2.0)  # half to even, as NumPy's around
    forward_h = nearest[:, : half + 1]
    recip_h = _reciprocal_mask(forward_h, block)
    k, kh = k1 + 1, half + 1
    rows_out: list[Tensor] = []
    cols_out: list[Tensor] = []
    step = max(1, block // (k * kh * k))
    for s in range(0, n, step):
        f, fr = forward[s : s + step], recip[s : s + step]  # (B, k)
        cand_sets = forward_h[f]  # (B, k, kh): half-size reciprocal candidates of each member
        cand_ok = recip_h[f]
        in_r = ((cand_sets[..., None] == f[:, None, None, :]) & fr[:, None, None, :]).any(dim=3)
        overlap = (in_r & cand_ok).sum(dim=2)
        size = cand_ok.sum(dim=2)
        passed = fr & (3 * overlap > 2 * size)  # overlap > 2/3 size, in integers
        members = torch.cat(
            [
                torch.where(fr, f, n),
                torch.where(passed[..., None] & cand_ok, cand_sets, n).reshape(f.shape[0], -1),
            ],
            dim=1,
        )
        members = torch.sort(members, dim=1).values
        keep = members < n
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]
        r, c = keep.nonzero(as_tuple=True)
        rows_out.append(r + s)
        cols_out.append(members[r, c])
    return torch.cat(rows_out), torch.cat(cols_out)


def _csr_indptr(rows: Tensor, n: int) -> Tensor:
    indptr = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n), dim=0, out=indptr[1:])
    return indptr


def _ragged_positions(starts: Tensor, lengths: Tensor) -> Tensor:
    """Concatenation of ``arange(starts[t], starts[t] + lengths[t])`` over ``t``."""
    total = int(lengths.sum())
    offsets = torch.cumsum(lengths, dim=0) - lengths
    shift = torch.repeat_interleave(starts - offsets, lengths, output_size=total)
    return torch.arange(total, dtype=torch.int64, device=starts.device) + shift


def query_expansion(
    rows: Tensor, cols: Tensor, vals: Tensor, nearest: Tensor, k2: int, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse ``V_qe[i] = mean(V[nearest[i, :k2]], axis=0)`` (rows sorted, then columns)."""
    n = nearest.shape[0]
    device = rows.device
    indptr = _csr_indptr(rows, n)
    nnz = indptr.diff()
    wide = vals.double()
    out_r: list[Tensor] = []
    out_c: list[Tensor] = []
    out_v: list[Tensor] = []
    step = max(1, block // n)
    for s in range(0, n, step):
        nb = nearest[s : s + step, :k2]
        lengths = nnz[nb].reshape(-1)
        pos = _ragged_positions(indptr[nb].reshape(-1), lengths)
        owner = torch.arange(nb.shape[0], device=device).repeat_interleave(k2)
        owner = owner.repeat_interleave(lengths, output_size=pos.shape[0])
        dense = torch.zeros(nb.shape[0] * n, dtype=torch.float64, device=device)
        dense.index_add_(0, owner * n + cols[pos], wide[pos])
        nz = dense.nonzero().squeeze(1)
        out_r.append(nz // n + s)
        out_c.append(nz % n)
        out_v.append((dense[nz] / k2).float())
    return torch.cat(out_r), torch.cat(out_c), torch.cat(out_v)


def gaussian_weights(rows: Tensor, original: Tensor, n: int) -> Tensor:
    """``V``'s values: ``exp(-original)`` of each set member, normalised to sum 1 per row."""
    weights = torch.exp(-original)
    row_sum = torch.zeros(n, dtype=torch.float64, device=rows.device)
    row_sum.index_add_(0, rows, weights.double())
    return weights / row_sum.float()[rows]


class DeviceSparseJaccard:
    """Jaccard distances ``1 - s / (2 - s)`` between the queries and the gallery, with
    ``s[i, j] = sum_l min(V[i, l], V[j, l])``, from the sparse ``V`` (rows sorted, then
    columns; rows ``< num_query`` are the queries), on ``V``'s device."""

    def __init__(
        self,
        rows: Tensor,
        cols: Tensor,
        vals: Tensor,
        num_query: int,
        num_gallery: int,
        block: int,
    ) -> None:
        nq, ng = num_query, num_gallery
        n = nq + ng
        self.num_query, self.num_gallery, self.block = nq, ng, block
        # gallery part of V by column: for column l, the gallery rows j with V[j, l] != 0
        gal = rows >= nq
        order = torch.sort(cols[gal], stable=True).indices
        self.col_rows = (rows[gal] - nq)[order]
        self.col_vals = vals[gal][order]
        self.col_indptr = _csr_indptr(cols[gal], n)
        self.col_nnz = self.col_indptr.diff()
        # query part of V by row
        query = rows < nq
        self.q_rows, self.q_cols, self.q_vals = rows[query], cols[query], vals[query]
        self.q_indptr = _csr_indptr(self.q_rows, nq).tolist()
        pairs = torch.zeros(nq, dtype=torch.float64, device=rows.device)
        pairs.index_add_(0, self.q_rows, self.col_nnz[self.q_cols].double())
        self.cum_pairs = [0.0, *torch.cumsum(pairs, dim=0).tolist()]

    def blocks(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Split queries ``start:stop`` into ranges of bounded work (rows and overlap pairs)."""
        max_rows = max(1, self.block // self.num_gallery)
        s = start
        while s < stop:
            by_pairs = bisect.bisect_right(self.cum_pairs, self.cum_pairs[s] + self.block)
            e = min(stop, s + max_rows, max(s + 1, by_pairs - 1))
            yield s, e
            s = e

    def rows(self, s: int, e: int) -> Tensor:
        """``(e - s, G)`` float32 Jaccard distances of queries ``s:e``."""
        ng = self.num_gallery
        a, b = self.q_indptr[s], self.q_indptr[e]
        q_cols = self.q_cols[a:b]
        lengths = self.col_nnz[q_cols]
        pos = _ragged_positions(self.col_indptr[q_cols], lengths)
        owner = torch.repeat_interleave(self.q_rows[a:b] - s, lengths, output_size=pos.shape[0])
        vals = torch.repeat_interleave(self.q_vals[a:b], lengths, output_size=pos.shape[0])
        weight = torch.minimum(vals, self.col_vals[pos]).double()
        overlap = torch.zeros((e - s) * ng, dtype=torch.float64, device=self.q_vals.device)
        overlap.index_add_(0, owner * ng + self.col_rows[pos], weight)
        overlap = overlap.view(e - s, ng)
        return (1.0 - overlap / (2.0 - overlap)).float()
