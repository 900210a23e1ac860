from __future__ import annotations

import pytest
import torch

import lagnet.layers.attention as attention_module
from lagnet import (
    LocalAttentionSystem,
    attention_part_pool,
    local_attention_pool,
    select_attention_maps,
    signed_sqrt_l2,
)


def naive_part_pool(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The released code's style: a loop over samples and maps."""
    b, c, _, _ = x.shape
    out = torch.empty(b, c, maps.shape[1], dtype=x.dtype)
    for i in range(b):
        for k in range(maps.shape[1]):
            s = x[i] + maps[i, k]
            out[i, :, k] = s.amax(dim=(1, 2)) + s.mean(dim=(1, 2))
    return out


@pytest.mark.parametrize(
    ("b", "c", "k", "h", "w"), [(2, 8, 3, 5, 3), (3, 16, 16, 7, 4), (1, 4, 1, 1, 1)]
)
def test_part_pool_matches_naive_loops(
    b: int, c: int, k: int, h: int, w: int, device: torch.device
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=g)
    maps = torch.rand(b, k, h, w, generator=g)
    got = attention_part_pool(x.to(device), maps.to(device))
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), naive_part_pool(x, maps))


def test_select_attention_maps_descending_energy() -> None:
    g = torch.Generator().manual_seed(1)
    att = torch.rand(2, 10, 4, 3, generator=g)
    sel = select_attention_maps(att, 4)
    energy = att.sum(dim=(2, 3))
    order = energy.argsort(dim=1, descending=True)[:, :4]
    for i in range(2):
        torch.testing.assert_close(sel[i], att[i, order[i]])
    sel_energy = sel.sum(dim=(2, 3))
    assert torch.all(sel_energy[:, :-1] >= sel_energy[:, 1:])


def test_signed_sqrt_l2_layout_and_norm() -> None:
    parts = torch.tensor([[[4.0, -9.0], [1.0, 0.0]]])  # (B=1, C=2, K=2)
    out = signed_sqrt_l2(parts, eps=0.0)
    raw = torch.tensor([[2.0, 1.0, -3.0, 0.0]])  # map 0 (c0, c1), then map 1
    torch.testing.assert_close(out, raw / raw.norm())


@pytest.mark.parametrize(("c", "k", "h", "w"), [(16, 4, 6, 3), (32, 32, 5, 5), (64, 24, 9, 2)])
def test_las_shapes(c: int, k: int, h: int, w: int, device: torch.device) -> None:
    las = LocalAttentionSystem(c, k).to(device)
    x = torch.randn(3, c, h, w, device=device, requires_grad=True)
    out = las(x)
    out.attention_features.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert out.part_features.shape == (3, c, k)
    assert out.attention_maps.shape == (3, k, h, w)
    assert out.attention_features.shape == (3, k * c)
    assert out.global_feature.shape == (3, c)
    assert torch.all(out.attention_maps >= 0)
    torch.testing.assert_close(out.attention_features.norm(dim=1), torch.ones(3, device=device))
    torch.testing.assert_close(
        out.global_feature, out.part_features.amax(2) + out.part_features.mean(2)
    )


def test_las_matches_functional_composition() -> None:
    torch.manual_seed(0)
    las = LocalAttentionSystem(12, 5).eval()
    x = torch.randn(2, 12, 4, 3)
    out = las(x)
    att = torch.relu(las.bn(las.conv(x)))
    ref = local_attention_pool(x, att, 5)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out.part_features, naive_part_pool(x, select_attention_maps(att, 5)))


def test_part_pool_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    maps = torch.rand(2, 4, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(attention_part_pool, (x, maps))


def test_las_gradcheck() -> None:
    torch.manual_seed(3)
    las = LocalAttentionSystem(4, 2).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: las(t).attention_features, (x,))


def test_chunked_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 5, 3, generator=g)
    maps = torch.rand(2, 7, 5, 3, generator=g)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xx, mm = x.clone().requires_grad_(), maps.clone().requires_grad_()
        out = attention_part_pool(xx, mm)
        out.backward(torch.arange(out.numel(), dtype=torch.float32).view_as(out))
        assert xx.grad is not None and mm.grad is not None
        return out.detach(), xx.grad, mm.grad

    whole = run()
    monkeypatch.setattr(attention_module, "_CHUNK_ELEMENTS", 2 * 8 * 15 * 2)  # 2 maps a chunk
    assert attention_module._chunk_len(2, 8, 7, 15) == 2
    chunked = run()
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b)


def test_backward_memory_is_bounded() -> None:
    # The autograd graph keeps int64 argmax indices (B, C, K), never the (B, C, K, H*W) sum.
    x = torch.randn(2, 64, 24, 8, requires_grad=True)
    maps = torch.rand(2, 24, 24, 8, requires_grad=True)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention_part_pool(x, maps).sum().backward()
    assert saved, "expected the max term to save its indices"
    assert max(s.numel() for s in saved) <= 2 * 64 * 24
    assert torch.Size([2, 64, 24, 192]) not in saved


def test_channels_last_input() -> None:
    las = LocalAttentionSystem(8, 3).eval()
    x = torch.randn(2, 8, 6, 4)
    a = las(x)
    b = las(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a.part_features, b.part_features)


def test_compile_fullgraph() -> None:
    torch.manual_seed(0)
    las = LocalAttentionSystem(16, 4)
    x = torch.randn(2, 16, 6, 3, requires_grad=True)
    compiled = torch.compile(las, fullgraph=True)
    out = compiled(x)
    out.attention_features.sum().backward()
    ref = las(x)
    torch.testing.assert_close(out.part_features, ref.part_features)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_attentions=9 must not exceed in_channels=8"):
        LocalAttentionSystem(8, 9)
    with pytest.raises(ValueError, match="num_attentions must be >= 1, got 0"):
        LocalAttentionSystem(8, 0)
    with pytest.raises(TypeError, match="in_channels must be an int"):
        LocalAttentionSystem(8.0, 2)  # type: ignore[arg-type]
    las = LocalAttentionSystem(8, 2)
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\), got shape \(8, 4, 4\)"):
        las(torch.randn(8, 4, 4))
    with pytest.raises(
        ValueError, match="has 6 channels but this layer was built for in_channels=8"
    ):
        las(torch.randn(2, 6, 4, 4))
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        las(torch.ones(2, 8, 4, 4, dtype=torch.int64))
    with pytest.raises(
        ValueError, match=r"attention_maps must have shape \(B, K, H, W\) = \(2, K, 4, 4\)"
    ):
        attention_part_pool(torch.randn(2, 8, 4, 4), torch.rand(2, 3, 4, 5))
    with pytest.raises(
        ValueError, match="num_attentions=5 is larger than the number of attention maps"
    ):
        select_attention_maps(torch.rand(1, 4, 2, 2), 5)
    with pytest.raises(ValueError, match=r"part_features must have shape \(B, C, K\)"):
        signed_sqrt_l2(torch.rand(2, 3))


def test_extra_repr() -> None:
    assert "in_channels=8, num_attentions=2" in repr(LocalAttentionSystem(8, 2))


def test_channel_sparse_backward_matches_dense_convolution() -> None:
    torch.manual_seed(5)
    las = LocalAttentionSystem(32, 3)
    x = torch.randn(4, 32, 5, 3, requires_grad=True)
    out = las(x)  # CPU training path: channel-sparse backward of the 1x1 convolution
    out.attention_features.sum().backward()
    assert x.grad is not None and las.conv.weight.grad is not None
    gx, gw = x.grad.clone(), las.conv.weight.grad.clone()
    # only the selected channels get a gradient
    assert 0 < int((gw.abs().sum(dim=(1, 2, 3)) > 0).sum()) <= 4 * 3
    x.grad = None
    las.zero_grad()
    z = las.conv(x)  # plain convolution, dense backward
    att = torch.relu(las.bn(z))
    from lagnet import local_attention_pool

    local_attention_pool(x, att, 3).attention_features.sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, las.conv.weight.grad)


def test_channel_sparse_conv_gradcheck() -> None:
    conv = attention_module._ChannelSparseConv1x1
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: conv.apply(a, b)[:, :3], (x, w))
