"""Batch Attention DropBlock (BA-DropBlock): zero the most attended region during training.

Per sample, one of the ``K`` attention maps is drawn with probability proportional to
``sqrt(energy)`` (``torch.multinomial``, optional generator), and the positions where that map
reaches ``threshold * its max`` are zeroed. ``region="batch"`` drops one region shared by the
whole batch instead (the Batch DropBlock idea). Masks are computed without gradient.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lagnet._validation import check_feature_map, check_float_tensor

__all__ = [
    "BatchAttentionDropBlock",
    "attention_drop_mask",
    "batch_attention_drop_block",
]

Region = Literal["sample", "batch"]
REGIONS: tuple[str, ...] = get_args(Region)


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float in (0, 1], got {threshold!r}")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return float(threshold)


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a float in [0, 1], got {p!r}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p (the probability of dropping) must be in [0, 1], got {p}")
    return float(p)


def _check_region(region: str) -> None:
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")


def _default_attention(x: Tensor) -> Tensor:
    # Mean absolute activation over channels: a non-negative map for any CNN feature map.
    return x.detach().abs().float().mean(dim=1, keepdim=True)


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

    ``True`` keeps a position. With ``attention_maps`` ``(B, K, h, w)`` (non-negative; resized
    bilinearly to ``(H, W)`` when ``(h, w)`` differs), each sample draws a map ``k`` with
    probability ``sqrt(sum_hw A_k + 1e-12)`` (L1-normalised) and drops where
    ``A_k >= threshold * max_hw(A_k)``. Without maps, the channel-mean absolute activation of
    ``x`` is the single map. ``region="batch"``: the drawn maps, each divided by its max, are
    averaged over the batch and thresholded the same way, giving one region for all samples.
    ``p`` is the probability that a sample (``"sample"``) or the batch (``"batch"``) is dropped.
    """
    check_feature_map(x)
    threshold = _check_threshold(threshold)
    p = _check_p(p)
    _check_region(region)
    b, _, h, w = x.shape
    with torch.no_grad():
        if attention_maps is None:
            maps = _default_attention(x)
        else:
            check_float_tensor(attention_maps, "attention_maps", "(B, K, H, W)")
            if attention_maps.shape[0] != b:
                raise ValueError(
                    f"attention_maps has batch size {attention_maps.shape[0]} but x has {b} "
                    f"(x {tuple(x.shape)}, attention_maps {tuple(attention_maps.shape)})"
                )
            maps = attention_maps.detach().float()
        k = maps.shape[1]
        weights = torch.sqrt(maps.sum(dim=(2, 3)) + 1e-12)
        weights = weights / weights.sum(dim=1, keepdim=True)
        if k == 1:
            chosen = maps
        else:
            idx = torch.multinomial(weights, 1, generator=generator)
            chosen = maps.gather(1, idx.view(b, 1, 1, 1).expand(b, 1, *maps.shape[2:]))
        if chosen.shape[2:] != (h, w):
            chosen = F.interpolate(chosen, size=(h, w), mode="bilinear", align_corners=False)
        if region == "batch":
            peak = chosen.amax(dim=(2, 3), keepdim=True)
            chosen = (chosen / peak.clamp_min(1e-12)).mean(dim=0, keepdim=True)
        keep = chosen < threshold * chosen.amax(dim=(2, 3), keepdim=True)
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
    In eval mode, or with ``p == 0``, ``forward`` returns ``x`` itself.
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
