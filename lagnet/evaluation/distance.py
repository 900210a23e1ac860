"""Pairwise distances between embeddings, computed in fixed row blocks."""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F

from lagnet._validation import check_choice, check_float_tensor, check_positive_int

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "SCAN_ELEMENTS",
    "DistanceBlocks",
    "Metric",
    "check_features",
    "check_finite_features",
    "pairwise_distance",
    "scan_rows",
    "squared_norms",
]

Metric: TypeAlias = Literal["euclidean", "sqeuclidean", "cosine"]
_METRICS = ("euclidean", "sqeuclidean", "cosine")

# Rows of ``x`` per matrix product. Distances are always computed in these fixed row blocks
# (aligned to row 0), so a given row of the result is bit-for-bit the same however the caller
# splits the work into chunks.
DEFAULT_BLOCK_ROWS = 256

# Elements per step of the passes over a whole feature set (the NaN/inf check, the squared
# norms): their temporaries stay at a few MB however large the gallery is.
SCAN_ELEMENTS = 1 << 20


def check_features(x: object, name: str) -> torch.Tensor:
    return check_float_tensor(x, name, "(num_items, dim)")


def scan_rows(x: torch.Tensor) -> int:
    """Rows of ``x`` ``(N, D)`` per step of a scan over all of it: :data:`SCAN_ELEMENTS`
    elements (at least one row)."""
    return max(1, SCAN_ELEMENTS // max(1, x.shape[1]))


def check_finite_features(x: torch.Tensor, name: str) -> None:
    """Refuse features ``(N, D)`` with NaN or infinite entries, naming the first bad row.

    ``x`` is scanned :func:`scan_rows` rows at a time, so the check needs a few MB beside ``x``
    at any size (one ``(N, D)`` mask is 170 MB for an MSMT17 gallery), and one host sync."""
    finite = torch.empty(x.shape[0], dtype=torch.bool, device=x.device)
    step = scan_rows(x)
    for start in range(0, x.shape[0], step):
        torch.all(torch.isfinite(x[start : start + step]), dim=1, out=finite[start : start + step])
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(x[row]).any()) else "inf"
        raise ValueError(
            f"{name} contains {kind} (first in row {row}): distances between such features are "
            "undefined; check the model's output for overflow"
        )


def check_pair(x: torch.Tensor, y: torch.Tensor, x_name: str, y_name: str) -> torch.dtype:
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"feature dimensions differ: {x_name} has shape {tuple(x.shape)}, "
            f"{y_name} has shape {tuple(y.shape)}"
        )
    if x.device != y.device:
        raise ValueError(f"{x_name} is on {x.device} but {y_name} is on {y.device}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    # half precision is widened: distances are differences of large similar numbers
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_metric(metric: object) -> Metric:
    """``metric`` if it is one of ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"``."""
    name = check_choice(metric, "metric", _METRICS)
    return "cosine" if name == "cosine" else "sqeuclidean" if name == "sqeuclidean" else "euclidean"


def check_query_gallery(
    query_features: object, gallery_features: object, metric: object, chunk_size: object
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype, Metric, int]:
    """The checks every evaluation from features starts with: float ``(Q, D)`` / ``(G, D)``
    tensors of one dimension and device, a known ``metric``, neither set empty. Returns
    ``(qf, gf, dtype, metric, step)``, ``step`` being ``chunk_size`` (default 1024) rounded up
    to a multiple of :data:`DEFAULT_BLOCK_ROWS`."""
    qf = check_features(query_features, "query_features")
    gf = check_features(gallery_features, "gallery_features")
    dtype = check_pair(qf, gf, "query_features", "gallery_features")
    name = check_metric(metric)
    if qf.shape[0] == 0:
        raise ValueError(f"empty query set: query_features has shape {tuple(qf.shape)}")
    if gf.shape[0] == 0:
        raise ValueError(f"empty gallery: gallery_features has shape {tuple(gf.shape)}")
    step = (
        4 * DEFAULT_BLOCK_ROWS
        if chunk_size is None
        else check_positive_int(chunk_size, "chunk_size")
    )
    return qf, gf, dtype, name, -(-step // DEFAULT_BLOCK_ROWS) * DEFAULT_BLOCK_ROWS


def squared_norms(y: torch.Tensor) -> torch.Tensor:
    """``(y * y).sum(dim=1)`` ``(M,)`` of ``y`` ``(M, D)``, computed :func:`scan_rows` rows at a
    time instead of through an ``(M, D)`` temporary (the same sums, bit for bit, for a
    contiguous ``y`` with rows of fewer than 32,768 elements; otherwise torch may order a
    row's additions differently, within rounding)."""
    out = torch.empty(y.shape[0], dtype=y.dtype, device=y.device)
    step = scan_rows(y)
    for start in range(0, y.shape[0], step):
        block = y[start : start + step]
        torch.sum(block * block, dim=1, out=out[start : start + step])
    return out


class DistanceBlocks:
    """Computes row blocks ``(B, M)`` of the distance matrix between ``x`` and a fixed ``y``
    ``(M, D)``."""

    def __init__(self, y: torch.Tensor, metric: Metric, dtype: torch.dtype) -> None:
        self.metric = metric
        self.dtype = dtype
        y = y.detach().to(dtype)
        if metric == "cosine":
            self.y = F.normalize(y, dim=1)
            self.y_sq = torch.empty(0, dtype=dtype, device=y.device)
        else:
            self.y = y
            self.y_sq = squared_norms(y)

    def __call__(self, x_block: torch.Tensor) -> torch.Tensor:
        # a fresh contiguous copy: same shape, layout and alignment for a given block every time
        x_block = x_block.detach().to(self.dtype).clone(memory_format=torch.contiguous_format)
        if self.metric == "cosine":
            sim = F.normalize(x_block, dim=1) @ self.y.T
            return sim.neg_().add_(1.0)
        dist = x_block @ self.y.T
        dist.mul_(-2.0).add_((x_block * x_block).sum(dim=1, keepdim=True)).add_(self.y_sq)
        dist.clamp_(min=0.0)
        if self.metric == "euclidean":
            dist.sqrt_()
        return dist


def pairwise_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    metric: Metric = "euclidean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distances between every row of ``x`` and every row of ``y``.

    Args:
        x: ``(N, D)`` floating-point tensor.
        y: ``(M, D)`` floating-point tensor on the same device.
        metric: ``"sqeuclidean"``: ``max(|x|^2 + |y|^2 - 2 x.y, 0)``; ``"euclidean"``: its
            square root; ``"cosine"``: ``1 - x.y / (|x| |y|)`` (a zero vector has cosine
            distance 1 to everything).
        chunk_size: rows of ``x`` per matrix product (default 256). Results are bitwise
            reproducible for a given ``chunk_size``; different chunk sizes may differ in the
            last bits (BLAS blocking).

    Returns:
        ``(N, M)`` tensor on the inputs' device, in their promoted dtype (float16/bfloat16
        inputs give float32). Computed without autograd.
    """
    x = check_features(x, "x")
    y = check_features(y, "y")
    dtype = check_pair(x, y, "x", "y")
    metric = check_metric(metric)
    block = (
        DEFAULT_BLOCK_ROWS if chunk_size is None else check_positive_int(chunk_size, "chunk_size")
    )
    with torch.no_grad():
        blocks = DistanceBlocks(y, metric, dtype)
        out = torch.empty((x.shape[0], y.shape[0]), dtype=dtype, device=x.device)
        for start in range(0, x.shape[0], block):
            out[start : start + block] = blocks(x[start : start + block])
    return out
