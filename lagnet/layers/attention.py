"""Local Attention System (LAS): top-K attention maps and the part features pooled from them.

For a feature map ``x`` ``(B, C, H, W)``:

1. attention maps ``A = relu(bn(conv1x1(x)))``, ``C`` non-negative maps;
2. keep the ``K`` maps with the largest spatial sum, in descending order
   (:func:`select_attention_maps`);
3. one part feature per kept map, ``v_k = avg_hw(x + A_k) + max_hw(x + A_k)``, the map added to
   every channel as the released code does (:func:`attention_part_pool`);
4. the attention features: signed square root and L2 over all ``K*C`` values
   (:func:`signed_sqrt_l2`), and the global feature ``max_k v_k + mean_k v_k``.

:func:`local_attention_system` is steps 2-4 on maps you compute yourself. The kernels that make
step 3 and the backward of step 1 fast live in :mod:`lagnet.layers._kernels`.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lagnet._validation import (
    check_channels,
    check_feature_map,
    check_float_tensor,
    check_input_dtype,
    check_positive_int,
    check_same_device,
)
from lagnet.layers._kernels import SparseGradConv1x1, add_max_pool, is_capturing

__all__ = [
    "LocalAttentionOutput",
    "LocalAttentionSystem",
    "attention_part_pool",
    "local_attention_pool",
    "local_attention_system",
    "select_attention_maps",
    "signed_sqrt_l2",
]


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


def attention_part_pool(features: Tensor, attention_maps: Tensor, *, fused: bool = True) -> Tensor:
    """Pool one part feature per map: ``(B, C, H, W), (B, K, H, W) -> (B, C, K)``.

    ``v[b, :, k] = avg_hw(x_b + A_bk) + max_hw(x_b + A_bk)``, the map broadcast over channels.
    The average is computed in closed form, ``avg(x) + avg(A_k)``. With ``fused=True`` the max
    runs in chunks with an argmax backward (no ``(B, C, K, H*W)`` tensor is kept); with
    ``fused=False`` it is the plain broadcast ``(x + A).amax``. The maps are cast to the
    features' dtype.
    """
    check_feature_map(features, "features")
    check_float_tensor(attention_maps, "attention_maps", "(B, K, H, W)")
    check_same_device(features, attention_maps, "features", "attention_maps")
    b, _, h, w = features.shape
    if attention_maps.shape[0] != b or attention_maps.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"attention_maps must have shape (B, K, H, W) = ({b}, K, {h}, {w}) to match the "
            f"features, got {tuple(attention_maps.shape)}"
        )
    x = features.flatten(2)
    a = attention_maps.flatten(2).to(x.dtype)
    avg = x.mean(dim=2).unsqueeze(2) + a.mean(dim=2).unsqueeze(1)
    if fused:
        return avg + add_max_pool(x, a)
    return avg + (x.unsqueeze(2) + a.unsqueeze(1)).amax(dim=3)


def signed_sqrt_l2(part_features: Tensor, eps: float = 1e-12) -> Tensor:
    """Signed square root then L2 over all values: ``(B, C, K) -> (B, K*C)`` (map by map).

    ``sign(v) * sqrt(|v| + eps)``, laid out as ``k*C + c``, then divided by its L2 norm.
    """
    check_float_tensor(part_features, "part_features", "(B, C, K)")
    flat = part_features.transpose(1, 2).flatten(1)
    flat = torch.sign(flat) * torch.sqrt(flat.abs() + eps)
    return nn.functional.normalize(flat, dim=1)


def _pool(features: Tensor, attention: Tensor, k: int, fused: bool) -> LocalAttentionOutput:
    maps = select_attention_maps(attention, k)
    parts = attention_part_pool(features, maps, fused=fused)
    global_feature = parts.amax(dim=2) + parts.mean(dim=2)
    return LocalAttentionOutput(parts, maps, signed_sqrt_l2(parts), global_feature)


def local_attention_system(
    features: Tensor, attention: Tensor, num_attentions: int, *, fused: bool = True
) -> LocalAttentionOutput:
    """Select the top-``K`` maps of ``attention`` and pool ``features`` with them.

    Args:
        features: ``(B, C, H, W)`` feature map.
        attention: ``(B, M, H, W)`` non-negative attention maps, ``M >= K``, on the features'
            device. Negative or NaN values raise a ValueError; the check reads one flag back
            from the device (skipped while a graph is captured by ``torch.compile`` or
            ``torch.export``). :class:`LocalAttentionSystem` does not need it (its maps come
            out of a ReLU).
        num_attentions: ``K``.
        fused: use the chunked max kernel (see :func:`attention_part_pool`).
    """
    check_feature_map(features, "features")
    check_float_tensor(attention, "attention", "(B, M, H, W)")
    check_same_device(features, attention, "features", "attention")
    if not is_capturing() and not bool((attention >= 0).all()):
        raise ValueError(
            "attention maps must be non-negative and not NaN (LAS maps come out of a ReLU); "
            f"got min {attention.amin().item():g} (apply torch.relu first)"
        )
    return _pool(features, attention, num_attentions, fused)


def local_attention_pool(
    features: Tensor, attention: Tensor, num_attentions: int
) -> LocalAttentionOutput:
    """Deprecated name of :func:`local_attention_system`."""
    warnings.warn(
        "local_attention_pool is deprecated: use "
        "`from lagnet.layers import local_attention_system` (same arguments)",
        DeprecationWarning,
        stacklevel=2,
    )
    return local_attention_system(features, attention, num_attentions)


class LocalAttentionSystem(nn.Module):
    """Local Attention System: ``relu(bn(conv1x1(x)))`` attention, top-K maps, part pooling.

    Args:
        in_channels: ``C`` of the input feature map.
        num_attentions: ``K``, how many maps to keep (``1 <= K <= C``).
        bn_eps: epsilon of the attention batch norm (1e-3 in the released code).
        fused: use the fast kernels: chunked max pooling with an argmax backward, and on the
            CPU a backward of the 1x1 convolution that skips the channels no kept map uses.
            ``False`` gives the plain torch operations (same values). Can be changed later
            through the ``fused`` attribute.

    Shapes: ``forward((B, C, H, W)) -> LocalAttentionOutput`` with ``part_features (B, C, K)``,
    ``attention_maps (B, K, H, W)``, ``attention_features (B, K*C)``, ``global_feature (B, C)``.
    The input must have the parameters' dtype (under autocast: float32 or the autocast dtype).
    """

    def __init__(
        self,
        in_channels: int,
        num_attentions: int = 24,
        *,
        bn_eps: float = 1e-3,
        fused: bool = True,
    ) -> None:
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
        self.conv = SparseGradConv1x1(in_channels, in_channels)
        self.bn = nn.BatchNorm2d(in_channels, eps=bn_eps)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="relu")
        self.fused = fused

    @property
    def fused(self) -> bool:
        """Whether the fast kernels are used (see the class docstring)."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"fused must be a bool, got {value!r}")
        self._fused = value
        if isinstance(self.conv, SparseGradConv1x1):
            self.conv.sparse_backward = value

    def attention(self, x: Tensor) -> Tensor:
        """All ``C`` non-negative attention maps: ``(B, C, H, W) -> (B, C, H, W)``."""
        return torch.relu(self.bn(self.conv(x)))

    def forward(self, x: Tensor) -> LocalAttentionOutput:
        check_feature_map(x)
        check_channels(x, self.in_channels)
        check_input_dtype(x, self.conv.weight.dtype, "x", "LocalAttentionSystem")
        return _pool(x, self.attention(x), self.num_attentions, self._fused)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_attentions={self.num_attentions}"
