"""Ranks of the correct matches of a block of queries with torch, on the distances' device
(internal; the GPU path of :func:`~lagnet.evaluation.evaluate_rank`).

Each row is sorted stably (ties by gallery index, as the protocol says), so the distances never
leave their device; only the ranks of the matches (and, for the CUHK03 protocol, of the items
that can precede a match) are copied to the host, where the per-query metrics are summed exactly
like the NumPy path does, so both give the same numbers bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from ._fast_rank import BlockRanks, Gallery

__all__ = ["DeviceGallery", "rank_block_torch"]


class DeviceGallery:
    """The gallery's ids, cameras and identity index as tensors on ``device``."""

    def __init__(self, gallery: Gallery, device: torch.device) -> None:
        self.device = device
        self.pids = torch.from_numpy(gallery.pids).to(device)
        self.camids = torch.from_numpy(gallery.camids).to(device)
        self.group = torch.from_numpy(gallery.group).to(device)


def rank_block_torch(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    gallery: DeviceGallery,
    *,
    need_candidates: bool = False,
) -> BlockRanks:
    """:func:`~lagnet.evaluation._fast_rank.rank_block` for a ``(C, G)`` tensor (no NaN) and
    ``(C,)`` int64 query ids/cameras on its device."""
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()
    if dist.is_floating_point():
        dist = dist + 0.0  # -0.0 -> +0.0, so that they tie in any sort implementation
    values, order = torch.sort(dist, dim=1, stable=True)
    is_match = gallery.pids[order] == q_pids[:, None]
    kept = ~(is_match & (gallery.camids[order] == q_camids[:, None]))
    good = is_match & kept
    rank = torch.cumsum(kept, dim=1)  # 1-based rank of each kept item in the ranked list
    num_matches = good.sum(dim=1)
    match_rank = rank[good]  # row after row, increasing
    empty = torch.zeros(0, dtype=torch.int64)
    cand_row, cand_rank, cand_is_match, cand_group = empty, empty, empty.bool(), empty
    if need_candidates:
        # items up to the last match's distance (those at it too, as the NumPy path does)
        lowest = torch.full_like(values[:, :1], float("-inf") if values.is_floating_point() else 0)
        if not values.is_floating_point():
            lowest.fill_(torch.iinfo(values.dtype).min)
        threshold = torch.where(good, values, lowest).amax(dim=1, keepdim=True)
        cand = kept & (values <= threshold) & (num_matches > 0)[:, None]
        cand_row = cand.nonzero()[:, 0].cpu()
        cand_rank = rank[cand].cpu()
        cand_is_match = is_match[cand].cpu()
        cand_group = gallery.group[order[cand]].cpu()
    return BlockRanks(
        num_matches=num_matches.cpu().numpy().astype(np.int64),
        match_rank=match_rank.cpu().numpy().astype(np.int64),
        cand_row=cand_row.numpy().astype(np.int64),
        cand_rank=cand_rank.numpy().astype(np.int64),
        cand_is_match=cand_is_match.numpy(),
        cand_group=cand_group.numpy().astype(np.int64),
    )
