"""Batch Attention DropBlock (BA-DropBlock): zero the most attended region during training.

Per sample, one of the ``K`` attention maps is drawn with probability proportional to
``sqrt(energy)`` (optional generator), and the positions where that map reaches
``threshold * its max`` are zeroed. ``region="batch"`` drops one region shared by the whole
batch instead (the Batch DropBlock idea). Masks are computed without gradient.

Unusual maps:

- a map without a peak, where every position reaches ``threshold * max`` (flat, all zero,
  or a single position when ``H = W = 1``), drops nothing: zeroing the whole map would remove
  all information rather than the most attended part;
- NaN maps drop nothing; on the CPU, maps with NaN, infinite or negative values raise a
  ValueError instead (the check would stall a GPU training step, so it is skipped there and
  while a graph is captured);
- NaN or infinite features are not checked (no per-step sync); they pass through.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lagnet._validation import (
    check_choice,
    check_feature_map,
    check_float,
    check_float_tensor,
    check_same_device,
)
from lagnet.layers._kernels import is_capturing

__all__ = [
    "BatchAttentionDropBlock",
    "attention_drop_mask",
    "batch_attention_drop_block",
]

Region = Literal["sample", "batch"]
REGIONS: tuple[str, ...] = get_args(Region)


def _check_threshold(threshold: object) -> float:
    return check_float(threshold, "threshold", low=0.0, high=1.0, low_open=True)


def _check_p(p: object) -> float:
    return check_float(p, "p (the probability of dropping)", low=0.0, high=1.0)


def _check_region(region: object) -> None:
    check_choice(region, "region", REGIONS)


def _default_attention(x: Tensor) -> Tensor:
    # Mean absolute activation over channels, less its spatial minimum: a non-negative map for
    # any CNN feature map. Without the shift, averaging many channels gives an almost flat map
    # whose every position reaches threshold * max.
    a = x.detach().abs().float().mean(dim=1, keepdim=True)
    return a - a.amin(dim=(2, 3), keepdim=True)


def _checked_maps(x: Tensor, attention_maps: Tensor) -> Tensor:
    check_float_tensor(attention_maps, "attention_maps", "(B, K, H, W)")
    check_same_device(x, attention_maps, "x", "attention_maps")
    b = x.shape[0]
    if attention_maps.shape[0] != b or attention_maps.shape[1] == 0:
        raise ValueError(
            f"attention_maps must have shape (B, K, h, w) with B = {b} (the batch size of x) and "
            f"K >= 1, got x {tuple(x.shape)}, attention_maps {tuple(attention_maps.shape)}"
        )
    maps = attention_maps.detach().float()
    # Checking the values reads a flag back from the device; on the CPU that is free, on a GPU
    # it would stall every training step, so there the maps are trusted (NaN maps drop nothing).
    if maps.device.type == "cpu" and not is_capturing():
        ok = (maps >= 0) & (maps < float("inf"))
        if not bool(ok.all()):
            bad = maps[~ok]
            raise ValueError(
                "attention_maps must be finite and non-negative (they weigh the draw and set "
                f"the dropped region); found {bad.numel()} bad values, e.g. {bad[0].item()}"
            )
    return maps


def _draw(weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row with probability ``weights`` (``(B, K) -> (B, 1)``), without a sync.

    ``argmax(weights / E)`` with ``E ~ Exp(1)``: the draw ``torch.multinomial`` makes for one
    sample (same numbers for the same generator), minus its value checks, which read the
    weights back to the host.
    """
    q = torch.empty_like(weights).exponential_(1.0, generator=generator)
    return (weights / q).argmax(dim=1, keepdim=True)


def attention_drop_mask(
    x: Tensor,
    attention_maps: Tensor | None = None,
    *,
    threshold: float = 0.5,
    region: Region = "sample",
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The keep-mask BA-DropBlock applies to ``x``: ``(B, 1, H, W)`` (or ``(1, 1, H, W)``), bool.

    ``True`` keeps a position. With ``attention_maps`` ``(B, K, h, w)`` (non-negative, on
    ``x``'s device; resized bilinearly to ``(H, W)`` when ``(h, w)`` differs), each sample draws
    a map ``k`` with probability ``sqrt(sum_hw A_k + 1e-12)`` (L1-normalised) and drops where
    ``A_k >= threshold * max_hw(A_k)``, unless that is every position (then nothing is
    dropped). Without maps, the channel-mean absolute activation of ``x`` less its spatial
    minimum is the single map. ``region="batch"``: the drawn maps, each divided by its max, are
    averaged over the batch and thresholded the same way, giving one region for all samples.
    ``p`` is the probability that a sample (``"sample"``) or the batch (``"batch"``) is dropped.
    """
    check_feature_map(x)
    threshold = _check_threshold(threshold)
    p = _check_p(p)
    _check_region(region)
    b, _, h, w = x.shape
    with torch.no_grad():
        maps = _default_attention(x) if attention_maps is None else _checked_maps(x, attention_maps)
        k = maps.shape[1]
        if k == 1:
            chosen = maps
        else:
            weights = torch.sqrt(maps.sum(dim=(2, 3)) + 1e-12)
            idx = _draw(weights / weights.sum(dim=1, keepdim=True), generator)
            chosen = maps.gather(1, idx.view(b, 1, 1, 1).expand(b, 1, *maps.shape[2:]))
        if chosen.shape[2:] != (h, w):
            chosen = F.interpolate(chosen, size=(h, w), mode="bilinear", align_corners=False)
        if region == "batch":
            peak = chosen.amax(dim=(2, 3), keepdim=True)
            chosen = (chosen / peak.clamp_min(1e-12)).mean(dim=0, keepdim=True)
        dropped = chosen >= threshold * chosen.amax(dim=(2, 3), keepdim=True)
        # A map without a peak (flat, all zero, a single position) would drop everything.
        dropped &= ~dropped.all(dim=3, keepdim=True).all(dim=2, keepdim=True)
        keep = ~dropped
        if p < 1.0:
            n = 1 if region == "batch" else b
            skip = torch.rand(n, generator=generator, device=x.device) >= p
            keep = keep | skip.view(n, 1, 1, 1)
    return keep


def batch_attention_drop_block(
    x: Tensor,
    attention_maps: Tensor | None = None,
    *,
    threshold: float = 0.5,
    region: Region = "sample",
    p: float = 1.0,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    training: bool = True,
) -> Tensor:
    """Functional BA-DropBlock: ``(B, C, H, W) -> (B, C, H, W)``.

    Returns ``x`` itself when ``training`` is false or ``p == 0``. Otherwise multiplies ``x`` by
    :func:`attention_drop_mask`. With ``rescale=True`` each sample (the batch, for
    ``region="batch"``) is scaled by ``H*W / kept`` (computed in float32 with a 1e-7 epsilon), as
    in DropBlock; the released LAG-Net code does not rescale.
    """
    check_feature_map(x)
    _check_threshold(threshold)
    if not training or _check_p(p) == 0.0:
        return x
    keep = attention_drop_mask(
        x, attention_maps, threshold=threshold, region=region, p=p, generator=generator
    )
    mask = keep.to(torch.float32)
    if rescale:
        kept = mask.sum(dim=(2, 3), keepdim=True)
        mask = mask * (mask.shape[2] * mask.shape[3] / (kept + 1e-7))
    out = x * mask.to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class BatchAttentionDropBlock(nn.Module):
    """Batch Attention DropBlock (LAG-Net), usable in any CNN.

    Args:
        threshold: fraction of the drawn map's max at and above which positions are dropped,
            in ``(0, 1]`` (0.5 in LAG-Net).
        region: ``"sample"`` (one region per sample, LAG-Net) or ``"batch"`` (one region
            shared by the batch, as in Batch DropBlock).
        p: probability of dropping a sample (or the batch); ``0`` disables the layer.
        rescale: scale kept activations by ``H*W / kept`` (off in LAG-Net).
        generator: optional ``torch.Generator`` (on the input's device) for the draws.

    Shapes: ``forward(x (B, C, H, W), attention_maps (B, K, h, w) | None) -> (B, C, H, W)``.
    In eval mode, or with ``p == 0``, ``forward`` returns ``x`` itself. Maps without a peak
    drop nothing (see the module docstring). Any float dtype (the layer has no parameters).
    """

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        region: Region = "sample",
        p: float = 1.0,
        rescale: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.threshold = _check_threshold(threshold)
        _check_region(region)
        self.region: Region = region
        self.p = _check_p(p)
        self.rescale = bool(rescale)
        self.generator = generator

    def forward(self, x: Tensor, attention_maps: Tensor | None = None) -> Tensor:
        check_feature_map(x)
        if not self.training or self.p == 0.0:
            return x
        return batch_attention_drop_block(
            x,
            attention_maps,
            threshold=self.threshold,
            region=self.region,
            p=self.p,
            rescale=self.rescale,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold}, region={self.region!r}, p={self.p}, "
            f"rescale={self.rescale}"
        )
