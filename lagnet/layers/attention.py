"""Local Attention System (LAS): top-K attention maps and the part features pooled from them.

Functional forms:

- :func:`select_attention_maps` keeps the ``K`` most energetic maps, in descending energy;
- :func:`attention_part_pool` pools one part feature per selected map,
  ``v_k = avg_hw(x + A_k) + max_hw(x + A_k)`` (the released code *adds* the map to the features);
- :func:`signed_sqrt_l2` turns the stacked part features into the normalised attention features;
- :func:`local_attention_pool` chains the three.

The max term is computed in chunks over ``K`` and differentiated with the argmax indices only,
so neither the forward nor the backward pass holds a ``(B, C, K, H, W)`` tensor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lagnet._validation import (
    check_channels,
    check_feature_map,
    check_float_tensor,
    check_positive_int,
)

__all__ = [
    "LocalAttentionOutput",
    "LocalAttentionSystem",
    "attention_part_pool",
    "local_attention_pool",
    "select_attention_maps",
    "signed_sqrt_l2",
]

# Elements of the (B, C, k, H*W) broadcast sum materialised at once in a chunk.
_CHUNK_ELEMENTS = 1 << 24


class LocalAttentionOutput(NamedTuple):
    """What :class:`LocalAttentionSystem` returns.

    Attributes:
        part_features: ``(B, C, K)``, one pooled feature per selected map.
        attention_maps: ``(B, K, H, W)``, the selected maps in descending energy.
        attention_features: ``(B, K*C)``, part features laid out map by map (``k*C + c``),
            signed square root, L2-normalised over all ``K*C`` values.
        global_feature: ``(B, C)``, ``max_K + mean_K`` of the part features.
    """

    part_features: Tensor
    attention_maps: Tensor
    attention_features: Tensor
    global_feature: Tensor


def select_attention_maps(attention: Tensor, num_attentions: int) -> Tensor:
    """Keep the ``K`` maps with the largest spatial sum: ``(B, M, H, W) -> (B, K, H, W)``.

    Maps come out in descending order of energy (``torch.topk``, sorted).
    """
    check_float_tensor(attention, "attention", "(B, M, H, W)")
    check_positive_int(num_attentions, "num_attentions")
    b, m, h, w = attention.shape
    if num_attentions > m:
        raise ValueError(
            f"num_attentions={num_attentions} is larger than the number of attention maps ({m})"
        )
    flat = attention.flatten(2)
    idx = flat.sum(dim=2).topk(num_attentions, dim=1, sorted=True).indices
    selected = flat.gather(1, idx.unsqueeze(-1).expand(b, num_attentions, h * w))
    return selected.view(b, num_attentions, h, w)


def _capturing() -> bool:
    """True while torch.compile, torch.export or the JIT tracer is capturing a graph."""
    return bool(
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch._C._get_tracing_state() is not None
    )


class _ChannelSparseConv1x1(torch.autograd.Function):
    """Bias-free 1x1 convolution whose backward skips output channels with no gradient.

    Only the selected attention maps reach the loss, so most of the ``C`` output channels of
    the attention convolution get an all-zero gradient; the backward matmuls run on the
    channels that do not. Used on CPU only (finding the channels needs their count on the host).
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor) -> Tensor:
        return nn.functional.conv2d(x, weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        b, c_in, h, w = x.shape
        c_out = weight.shape[0]
        gz = grad.reshape(b, c_out, h * w)
        active = gz.abs().amax(dim=(0, 2)).nonzero().squeeze(1)
        w2 = weight.reshape(c_out, c_in)
        ga = gz.index_select(1, active)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(w2.index_select(0, active).t(), ga).view(b, c_in, h, w)
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                gx = gx.contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1]:
            gwa = torch.einsum("bun,bcn->uc", ga, x.reshape(b, c_in, h * w))
            gw = w2.new_zeros(c_out, c_in).index_copy_(0, active, gwa).view_as(weight)
        return gx, gw


def _chunk_len(b: int, c: int, k: int, n: int) -> int:
    per_map = max(1, b * c * n)
    return max(1, min(k, _CHUNK_ELEMENTS // per_map))


def _add_max(x: Tensor, a: Tensor, with_indices: bool) -> tuple[Tensor, Tensor | None]:
    """``max_n(x[b, c, n] + a[b, k, n])`` -> ``(B, C, K)`` (and argmax), chunked over ``K``.

    Eager mode reuses one ``(B, C, k, N)`` buffer for every chunk (allocating a fresh one per
    chunk costs more than the arithmetic); under a compiler the plain broadcast is traced so
    that it can be fused into one reduction.
    """
    b, c, n = x.shape
    k = a.shape[1]
    xs = x.unsqueeze(2)
    if _capturing():
        s = xs + a.unsqueeze(1)
        if with_indices:
            v, i = s.max(dim=3)
            return v, i
        return s.amax(dim=3), None
    step = _chunk_len(b, c, k, n)
    chunks = -(-k // step)
    if chunks * step != k:  # pad with -inf maps so that every chunk has the same size
        pad = a.new_full((b, chunks * step - k, n), float("-inf"))
        a = torch.cat([a, pad], dim=1)
    buf = x.new_empty(b, c, step, n)
    values = x.new_empty(chunks, b, c, step)
    indices = torch.empty(chunks, b, c, step, dtype=torch.int64, device=x.device)
    for j in range(chunks):
        torch.add(xs, a[:, j * step : (j + 1) * step].unsqueeze(1), out=buf)
        if with_indices:
            torch.max(buf, dim=3, out=(values[j], indices[j]))
        else:
            torch.amax(buf, dim=3, out=values[j])
    out = values.permute(1, 2, 0, 3).reshape(b, c, chunks * step)[:, :, :k]
    if not with_indices:
        return out, None
    idx = indices.permute(1, 2, 0, 3).reshape(b, c, chunks * step)[:, :, :k]
    return out, idx


class _AddMax(torch.autograd.Function):
    """Max-plus pooling with a memory-light backward (argmax indices, not the broadcast sum)."""

    @staticmethod
    def forward(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        out, idx = _add_max(x, a, with_indices=True)
        assert idx is not None
        return out, idx

    @staticmethod
    def setup_context(
        ctx: Any, inputs: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor]
    ) -> None:
        x, a = inputs
        _, idx = output
        ctx.save_for_backward(idx)
        ctx.mark_non_differentiable(idx)
        ctx.x_shape = x.shape
        ctx.a_shape = a.shape

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor, _grad_idx: Tensor | None) -> tuple[Tensor, Tensor]:
        (idx,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        gx = grad_out.new_zeros(ctx.x_shape).scatter_add_(2, idx, grad_out)
        ga = grad_out.new_zeros(ctx.a_shape).scatter_add_(
            2, idx.transpose(1, 2).contiguous(), grad_out.transpose(1, 2).contiguous()
        )
        return gx, ga


def attention_part_pool(features: Tensor, attention_maps: Tensor) -> Tensor:
    """Pool one part feature per attention map: ``(B, C, H, W), (B, K, H, W) -> (B, C, K)``.

    ``v[b, :, k] = avg_hw(x_b + A_bk) + max_hw(x_b + A_bk)`` with the map broadcast over
    channels, as the released LAG-Net code computes it. The average term is computed in closed
    form (``avg(x) + avg(A_k)``); the max term in chunks, with an argmax-based backward.
    """
    check_feature_map(features, "features")
    check_float_tensor(attention_maps, "attention_maps", "(B, K, H, W)")
    b, _, h, w = features.shape
    if attention_maps.shape[0] != b or attention_maps.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"attention_maps must have shape (B, K, H, W) = ({b}, K, {h}, {w}) to match the "
            f"features, got {tuple(attention_maps.shape)}"
        )
    x = features.flatten(2)
    a = attention_maps.flatten(2).to(x.dtype)
    avg = x.mean(dim=2).unsqueeze(2) + a.mean(dim=2).unsqueeze(1)
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
        mx: Tensor = _AddMax.apply(x, a)[0]
    else:
        mx, _ = _add_max(x, a, with_indices=False)
    return avg + mx


def signed_sqrt_l2(part_features: Tensor, eps: float = 1e-12) -> Tensor:
    """Signed square root then L2 over all values: ``(B, C, K) -> (B, K*C)`` (map by map).

    ``sign(v) * sqrt(|v| + eps)``, laid out as ``k*C + c``, then divided by its L2 norm.
    """
    if part_features.ndim != 3:
        raise ValueError(
            f"part_features must have shape (B, C, K), got shape {tuple(part_features.shape)}"
        )
    flat = part_features.transpose(1, 2).flatten(1)
    flat = torch.sign(flat) * torch.sqrt(flat.abs() + eps)
    return nn.functional.normalize(flat, dim=1)


def local_attention_pool(
    features: Tensor, attention: Tensor, num_attentions: int
) -> LocalAttentionOutput:
    """Select the top-``K`` maps of ``attention`` and pool ``features`` with them.

    Args:
        features: ``(B, C, H, W)`` feature map.
        attention: ``(B, M, H, W)`` non-negative attention maps, ``M >= K``.
        num_attentions: ``K``.
    """
    maps = select_attention_maps(attention, num_attentions)
    parts = attention_part_pool(features, maps)
    global_feature = parts.amax(dim=2) + parts.mean(dim=2)
    return LocalAttentionOutput(parts, maps, signed_sqrt_l2(parts), global_feature)


class LocalAttentionSystem(nn.Module):
    """Local Attention System: ``relu(bn(conv1x1(x)))`` attention, top-K maps, part pooling.

    Args:
        in_channels: ``C`` of the input feature map.
        num_attentions: ``K``, how many maps to keep (``1 <= K <= C``).
        bn_eps: epsilon of the attention batch norm (1e-3 in the released code).

    Shapes: ``forward((B, C, H, W)) -> LocalAttentionOutput`` with ``part_features (B, C, K)``,
    ``attention_maps (B, K, H, W)``, ``attention_features (B, K*C)``, ``global_feature (B, C)``.
    """

    def __init__(self, in_channels: int, num_attentions: int = 24, *, bn_eps: float = 1e-3) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_attentions, "num_attentions")
        if num_attentions > in_channels:
            raise ValueError(
                f"num_attentions={num_attentions} must not exceed in_channels={in_channels}: "
                "the attention maps are the C channels of a 1x1 convolution"
            )
        self.in_channels = in_channels
        self.num_attentions = num_attentions
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(in_channels, eps=bn_eps)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="relu")

    def attention(self, x: Tensor) -> Tensor:
        """All ``C`` non-negative attention maps: ``(B, C, H, W) -> (B, C, H, W)``."""
        weight = self.conv.weight
        if (
            x.device.type == "cpu"
            and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad)
            and not _capturing()
        ):
            z = _ChannelSparseConv1x1.apply(x, weight)
        else:
            z = self.conv(x)
        return torch.relu(self.bn(z))

    def forward(self, x: Tensor) -> LocalAttentionOutput:
        check_feature_map(x)
        check_channels(x, self.in_channels)
        return local_attention_pool(x, self.attention(x), self.num_attentions)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_attentions={self.num_attentions}"
