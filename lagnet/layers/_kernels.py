"""Performance kernels behind the Local Attention System (the maths is in ``attention.py``).

- :func:`add_max_pool`: ``max_n(x[b, c, n] + a[b, k, n])``, computed in chunks over ``k`` and
  differentiated through the argmax indices, so neither pass holds a ``(B, C, K, H*W)`` tensor.
- :class:`SparseGradConv1x1`: a bias-free 1x1 ``nn.Conv2d`` whose CPU backward skips the output
  channels that receive no gradient (only the selected attention maps reach the loss).

Both fall back to plain torch operations while a graph is captured (``torch.compile``,
``torch.export``, the JIT tracer), where the compiler fuses the plain form itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lagnet._validation import autocast_dtype

__all__ = ["SparseGradConv1x1", "add_max_pool", "is_capturing"]

# Elements of the (B, C, k, H*W) broadcast sum materialised at once in a chunk.
CHUNK_ELEMENTS = 1 << 24


def _never() -> bool:
    return False


def _public_or_never(name: str) -> Callable[[], bool]:
    # torch.compiler.is_compiling appeared in torch 2.3 and is_exporting in 2.5.
    compiler = getattr(torch, "compiler", None)
    fn = getattr(compiler, name, None)
    return fn if callable(fn) else _never


_is_compiling = _public_or_never("is_compiling")
_is_exporting = _public_or_never("is_exporting")
_is_tracing: Callable[[], bool] = getattr(torch.jit, "is_tracing", _never)


def is_capturing() -> bool:
    """True while ``torch.compile``, ``torch.export`` or the JIT tracer captures a graph."""
    return bool(_is_compiling() or _is_exporting() or _is_tracing())


# ---------------------------------------------------------------------------------------------
# max-plus pooling
# ---------------------------------------------------------------------------------------------


def chunk_length(b: int, c: int, k: int, n: int) -> int:
    """How many maps one chunk of the ``(B, C, k, N)`` broadcast sum holds."""
    return max(1, min(k, CHUNK_ELEMENTS // max(1, b * c * n)))


def _add_max(x: Tensor, a: Tensor, with_indices: bool) -> tuple[Tensor, Tensor | None]:
    """``(B, C, N), (B, K, N) -> (B, C, K)`` values (and argmax over ``N``), chunked over ``K``.

    Eager mode reuses one ``(B, C, k, N)`` buffer for every chunk (a fresh allocation per chunk
    costs more than the arithmetic); under a compiler the plain broadcast is traced so that it
    can be fused into one reduction.
    """
    b, c, n = x.shape
    k = a.shape[1]
    xs = x.unsqueeze(2)
    if is_capturing():
        s = xs + a.unsqueeze(1)
        if with_indices:
            v, i = s.max(dim=3)
            return v, i
        return s.amax(dim=3), None
    step = chunk_length(b, c, k, n)
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
    """Max-plus pooling whose backward scatters through the argmax (no broadcast sum kept)."""

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


def add_max_pool(x: Tensor, a: Tensor) -> Tensor:
    """``out[b, c, k] = max_n(x[b, c, n] + a[b, k, n])``: ``(B, C, N), (B, K, N) -> (B, C, K)``.

    ``x`` and ``a`` must share a dtype and a device (the caller checks).
    """
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
        out: Tensor = _AddMax.apply(x, a)[0]
        return out
    return _add_max(x, a, with_indices=False)[0]


# ---------------------------------------------------------------------------------------------
# channel-sparse 1x1 convolution
# ---------------------------------------------------------------------------------------------


class _ChannelSparseConv1x1(torch.autograd.Function):
    """Bias-free 1x1 convolution whose backward runs only on output channels with a gradient.

    Finding those channels needs their count on the host, so this is used on the CPU only.
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
        gz = grad.to(x.dtype).reshape(b, c_out, h * w)
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


class SparseGradConv1x1(nn.Conv2d):
    """``nn.Conv2d(C_in, C_out, 1, bias=False)`` with a channel-sparse backward on the CPU.

    The forward value is that of the plain convolution. While CPU autograd records (and no
    graph is being captured) and ``sparse_backward`` is true, the backward skips the output
    channels whose gradient is zero everywhere. Being the module's own ``forward``, it runs
    inside ``nn.Module.__call__``, so forward hooks, pre-hooks and parametrizations see it as
    an ordinary convolution. Under autocast, input and weight are cast to the autocast dtype
    first, as autocast does for ``conv2d``.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, sparse_backward: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=False)
        self.sparse_backward = bool(sparse_backward)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if not (
            self.sparse_backward
            and x.device.type == "cpu"
            and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad)
            and not is_capturing()
        ):
            return super().forward(x)
        dtype = autocast_dtype("cpu")
        if dtype is None:
            out: Tensor = _ChannelSparseConv1x1.apply(x, weight)
            return out
        with torch.autocast("cpu", enabled=False):
            out = _ChannelSparseConv1x1.apply(x.to(dtype), weight.to(dtype))
        return out
