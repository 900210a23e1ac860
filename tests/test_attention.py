from __future__ import annotations

import copy
import math

import pytest
import torch

import lagnet.layers._kernels as kernels
from lagnet.layers import (
    LocalAttentionSystem,
    attention_part_pool,
    local_attention_pool,
    local_attention_system,
    select_attention_maps,
    signed_sqrt_l2,
)

CUDA = torch.cuda.is_available()


def naive_part_pool(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The released code's style: a loop over samples and maps (differentiable)."""
    b, _, _, _ = x.shape
    rows = []
    for i in range(b):
        cols = []
        for k in range(maps.shape[1]):
            s = x[i] + maps[i, k]
            cols.append(s.amax(dim=(1, 2)) + s.mean(dim=(1, 2)))
        rows.append(torch.stack(cols, dim=1))
    return torch.stack(rows)


def identity_las(c: int, k: int) -> LocalAttentionSystem:
    """A LAS whose attention maps are ``relu(x)`` exactly (identity conv, identity eval BN)."""
    las = LocalAttentionSystem(c, k, bn_eps=0.25)
    with torch.no_grad():
        las.conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
        las.bn.running_var.fill_(0.75)  # sqrt(0.75 + 0.25) = 1
    return las.eval()


@pytest.mark.parametrize(
    ("b", "c", "k", "h", "w"), [(2, 8, 3, 5, 3), (3, 16, 16, 7, 4), (1, 4, 1, 1, 1)]
)
def test_part_pool_matches_naive_loops(
    b: int, c: int, k: int, h: int, w: int, device: torch.device
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=g)
    maps = torch.rand(b, k, h, w, generator=g)
    for fused in (True, False):
        got = attention_part_pool(x.to(device), maps.to(device), fused=fused)
        assert got.device.type == device.type
        torch.testing.assert_close(got.cpu(), naive_part_pool(x, maps))


def test_las_by_hand() -> None:
    # x: channel 0 = [1, 3], channel 1 = [2, -1]; maps = relu(x): [1, 3] (energy 4), [2, 0] (2).
    las = identity_las(2, 2)
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, -1.0]]]])
    out = las(x)
    torch.testing.assert_close(out.attention_maps, torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]]))
    # map 0: c0 [2, 6] -> 4 + 6, c1 [3, 2] -> 2.5 + 3; map 1: c0 [3, 3] -> 3 + 3, c1 [4, -1]
    parts = torch.tensor([[[10.0, 6.0], [5.5, 5.5]]])
    torch.testing.assert_close(out.part_features, parts)
    torch.testing.assert_close(out.global_feature, torch.tensor([[10.0 + 8.0, 5.5 + 5.5]]))
    raw = torch.tensor([10.0, 5.5, 6.0, 5.5]).sqrt() / math.sqrt(27.0)  # k*C + c layout
    torch.testing.assert_close(out.attention_features, raw.view(1, 4))
    # the functional twin on the same maps gives the same numbers
    fn = local_attention_system(x, torch.relu(x), 2)
    for a, b in zip(out, fn, strict=True):
        torch.testing.assert_close(a, b)


def test_select_attention_maps_by_hand() -> None:
    att = torch.zeros(1, 4, 1, 2)
    att[0, :, 0, 0] = torch.tensor([1.0, 5.0, 0.0, 2.0])  # energies 1, 5, 0, 2
    sel = select_attention_maps(att, 3)
    assert sel[0, :, 0, 0].tolist() == [5.0, 2.0, 1.0]


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


@pytest.mark.parametrize("chunk_elements", [1, 2 * 8 * 15 * 2, 3 * 2 * 8 * 15, 1 << 24])
def test_any_chunking_gives_the_loop_values_and_gradients(
    monkeypatch: pytest.MonkeyPatch, chunk_elements: int
) -> None:
    # 7 maps cut into chunks of 1, 2 (padded), 3 (padded) and 7 maps.
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 5, 3, generator=g)
    maps = torch.rand(2, 7, 5, 3, generator=g)
    weight = torch.randn(2, 8, 7, generator=g)

    def run(fn: object) -> tuple[torch.Tensor, ...]:
        xx, mm = x.clone().requires_grad_(), maps.clone().requires_grad_()
        out = fn(xx, mm)  # type: ignore[operator]
        (out * weight).sum().backward()
        assert xx.grad is not None and mm.grad is not None
        return out.detach(), xx.grad, mm.grad

    for a, b in zip(run(attention_part_pool), run(naive_part_pool), strict=True):
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


def test_channels_last_input_and_gradient() -> None:
    las = LocalAttentionSystem(8, 3)
    x = torch.randn(2, 8, 6, 4)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    xs = x.clone().requires_grad_()
    a, b = las(xs), las(xc)
    torch.testing.assert_close(a.part_features, b.part_features)
    a.attention_features.sum().backward()
    b.attention_features.sum().backward()
    assert xc.grad is not None and xs.grad is not None
    assert xc.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(xc.grad, xs.grad)


def test_compile_fullgraph_training() -> None:
    torch.manual_seed(0)
    las = LocalAttentionSystem(16, 4)
    x = torch.randn(2, 16, 6, 3, requires_grad=True)
    compiled = torch.compile(las, fullgraph=True)
    out = compiled(x)
    out.attention_features.sum().backward()
    assert x.grad is not None and las.conv.weight.grad is not None
    gx, gw = x.grad.clone(), las.conv.weight.grad.clone()
    x.grad = None
    las.zero_grad()
    ref = las(x)
    ref.attention_features.sum().backward()
    torch.testing.assert_close(out.part_features, ref.part_features)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, las.conv.weight.grad)


def test_cpu_bf16_autocast_trains() -> None:
    torch.manual_seed(1)
    las = LocalAttentionSystem(16, 4)
    x = torch.randn(4, 16, 6, 3).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = las(x)
        loss = out.attention_features.float().square().sum() + out.global_feature.float().sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    w = las.conv.weight.grad
    assert w is not None and w.dtype == torch.float32 and w.abs().sum() > 0
    assert las.bn.weight.grad is not None and las.bn.weight.grad.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_trains(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    las = LocalAttentionSystem(32, 6).cuda()
    x = torch.randn(4, 32, 12, 4, device="cuda").contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        out = las(x)
        loss = out.attention_features.float().square().sum() + out.global_feature.float().sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert las.conv.weight.grad is not None and las.conv.weight.grad.dtype == torch.float32


def test_channel_sparse_backward_matches_dense_convolution() -> None:
    torch.manual_seed(5)
    las = LocalAttentionSystem(32, 3)
    dense = copy.deepcopy(las)
    dense.fused = False
    assert not dense.conv.sparse_backward
    x = torch.randn(4, 32, 5, 3, requires_grad=True)
    las(x).attention_features.sum().backward()
    assert x.grad is not None and las.conv.weight.grad is not None
    gx, gw = x.grad.clone(), las.conv.weight.grad.clone()
    # only the channels selected in some sample get a gradient
    assert 0 < int((gw.abs().sum(dim=(1, 2, 3)) > 0).sum()) <= 4 * 3
    x.grad = None
    dense(x).attention_features.sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, dense.conv.weight.grad)


def test_channel_sparse_conv_gradcheck() -> None:
    conv = kernels._ChannelSparseConv1x1
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: conv.apply(a, b)[:, :3], (x, w))


def test_hooks_on_the_attention_convolution_run_in_cpu_training() -> None:
    torch.manual_seed(6)
    las = LocalAttentionSystem(8, 2)
    calls: list[str] = []
    las.conv.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    las.conv.register_forward_hook(lambda m, args, out: calls.append("post"))
    x = torch.randn(2, 8, 4, 3, requires_grad=True)
    las(x).attention_features.sum().backward()
    assert calls == ["pre", "post"]
    with torch.no_grad():
        las(x)
    assert calls == ["pre", "post", "pre", "post"]


def test_a_hook_that_replaces_the_convolution_output_is_honoured_in_training() -> None:
    torch.manual_seed(7)
    hooked = LocalAttentionSystem(8, 2)
    doubled = copy.deepcopy(hooked)
    with torch.no_grad():
        doubled.conv.weight.mul_(2)
    hooked.conv.register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(3, 8, 4, 3)
    grads = []
    for las in (hooked, doubled):
        xx = x.clone().requires_grad_()
        out = las(xx)
        out.attention_features.sum().backward()
        grads.append((out.part_features.detach(), xx.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_fused_switch() -> None:
    las = LocalAttentionSystem(8, 2, fused=False)
    assert not las.fused and not las.conv.sparse_backward
    las.fused = True
    assert las.conv.sparse_backward
    with pytest.raises(TypeError, match="fused must be a bool, got 1"):
        las.fused = 1  # type: ignore[assignment]
    assert set(las.state_dict()) == {
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }


def test_capture_check_falls_back_when_torch_lacks_the_api() -> None:
    assert kernels._public_or_never("no_such_function_in_torch_compiler")() is False
    assert kernels.is_capturing() is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_other_than_the_parameters_is_named(dtype: torch.dtype) -> None:
    las = LocalAttentionSystem(8, 2)
    x = torch.randn(2, 8, 4, 4, dtype=dtype)
    with pytest.raises(
        TypeError, match=rf"x has dtype {dtype} but the parameters of LocalAttentionSystem are "
    ):
        las(x)


def test_negative_or_nan_maps_are_refused() -> None:
    x = torch.randn(2, 4, 3, 3)
    maps = torch.rand(2, 5, 3, 3)
    maps[1, 2, 0, 0] = -0.5
    with pytest.raises(ValueError, match="must be non-negative and not NaN.*got min -0.5"):
        local_attention_system(x, maps, 2)
    maps[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="must be non-negative and not NaN"):
        local_attention_system(x, maps, 2)


def test_maps_on_another_device_are_named() -> None:
    x = torch.randn(2, 4, 3, 3)
    maps = torch.rand(2, 5, 3, 3, device="meta")
    with pytest.raises(ValueError, match="attention is on meta but features is on cpu"):
        local_attention_system(x, maps, 2)
    with pytest.raises(ValueError, match="attention_maps is on meta but features is on cpu"):
        attention_part_pool(x, maps)


def test_deprecated_local_attention_pool_warns_with_the_new_name() -> None:
    x, maps = torch.randn(2, 4, 3, 3), torch.rand(2, 5, 3, 3)
    with pytest.warns(DeprecationWarning, match="use `from lagnet.layers import local_attention_"):
        old = local_attention_pool(x, maps, 2)
    for a, b in zip(old, local_attention_system(x, maps, 2), strict=True):
        assert torch.equal(a, b)


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
    with pytest.raises(ValueError, match=r"part_features must be 3-D with shape \(B, C, K\)"):
        signed_sqrt_l2(torch.rand(2, 3))


def test_extra_repr() -> None:
    assert "in_channels=8, num_attentions=2" in repr(LocalAttentionSystem(8, 2))


def test_under_autocast_float32_and_the_autocast_dtype_are_accepted() -> None:
    las = LocalAttentionSystem(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 8, 4, 3, dtype=dtype, requires_grad=True)
            las(x).attention_features.float().sum().backward()
            assert x.grad is not None and x.grad.dtype == dtype
        with pytest.raises(TypeError, match="x has dtype torch.float64 but the parameters"):
            las(torch.randn(2, 8, 4, 3, dtype=torch.float64))
