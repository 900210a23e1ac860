from __future__ import annotations

import pytest
import torch

from lagnet.layers import (
    BatchAttentionDropBlock,
    LocalAttentionSystem,
    attention_drop_mask,
    batch_attention_drop_block,
)

CUDA = torch.cuda.is_available()


def one_hot_maps(b: int, values: list[float], h: int = 4, w: int = 4) -> torch.Tensor:
    """Map k is zero except ``values[k]`` at flat position k (energy = values[k])."""
    maps = torch.zeros(b, len(values), h * w)
    for k, v in enumerate(values):
        maps[:, k, k] = v
    return maps.view(b, len(values), h, w)


def test_eval_and_disabled_return_input_itself() -> None:
    x = torch.randn(2, 3, 4, 4)
    m = BatchAttentionDropBlock().eval()
    assert m(x) is x
    assert m(x, torch.rand(2, 5, 4, 4)) is x
    assert BatchAttentionDropBlock(p=0.0).train()(x) is x
    assert batch_attention_drop_block(x, training=False) is x


def test_dropped_area_is_the_thresholded_region_exactly(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    b, k, h, w = 6, 5, 7, 3
    x = (torch.randn(b, 4, h, w, generator=g) + 5.0).to(device)
    maps = (torch.rand(b, k, h, w, generator=g) ** 3).to(device)
    drop = BatchAttentionDropBlock(
        threshold=0.4, generator=torch.Generator(device=device).manual_seed(11)
    )
    out = drop.train()(x, maps)
    # Replay the draw: weights sqrt(energy + 1e-12), one multinomial sample per row.
    weights = torch.sqrt(maps.sum(dim=(2, 3)) + 1e-12)
    idx = torch.multinomial(
        weights / weights.sum(1, keepdim=True),
        1,
        generator=torch.Generator(device=device).manual_seed(11),
    )
    chosen = maps[torch.arange(b, device=device), idx[:, 0]]
    dropped = chosen >= 0.4 * chosen.amax(dim=(1, 2), keepdim=True)
    assert dropped.any(dim=(1, 2)).all()
    expected = x * (~dropped).unsqueeze(1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal((out == 0).all(dim=1), dropped)


def test_map_choice_follows_sqrt_energy() -> None:
    values = [1.0, 4.0, 16.0, 0.0]
    b = 20000
    maps = one_hot_maps(b, values)
    keep = attention_drop_mask(
        torch.ones(b, 1, 4, 4), maps, generator=torch.Generator().manual_seed(5)
    )
    dropped_at = (~keep).view(b, 16)[:, :4].float().mean(dim=0)
    sq = torch.tensor([1.0, 2.0, 4.0, 1e-6])
    torch.testing.assert_close(dropped_at, sq / sq.sum(), atol=0.015, rtol=0)
    # Exactly one position is dropped per sample, none when the zero map is drawn.
    per_sample = (~keep).view(b, 16).sum(dim=1)
    assert set(per_sample.unique().tolist()) <= {0, 1}


def test_generator_determinism() -> None:
    x = torch.randn(8, 3, 6, 6)
    maps = torch.rand(8, 10, 6, 6)
    a = BatchAttentionDropBlock(generator=torch.Generator().manual_seed(1))(x, maps)
    b = BatchAttentionDropBlock(generator=torch.Generator().manual_seed(1))(x, maps)
    c = BatchAttentionDropBlock(generator=torch.Generator().manual_seed(2))(x, maps)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = BatchAttentionDropBlock()(x, maps)
    torch.manual_seed(3)
    assert torch.equal(d, BatchAttentionDropBlock()(x, maps))


def test_batch_region_shares_one_mask() -> None:
    maps = torch.zeros(3, 1, 4, 4)
    maps[0, 0, 0, 0] = 2.0
    maps[1, 0, 0, 0] = 1.0
    maps[2, 0, 3, 3] = 5.0
    keep = attention_drop_mask(torch.ones(3, 2, 4, 4), maps, region="batch", threshold=0.5)
    assert keep.shape == (1, 1, 4, 4)
    # Normalised maps averaged: 2/3 at (0, 0), 1/3 at (3, 3); threshold 0.5 * 2/3 drops both.
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[3, 3] = False
    assert torch.equal(keep[0, 0], expected)
    out = BatchAttentionDropBlock(region="batch", threshold=0.6)(torch.ones(3, 2, 4, 4), maps)
    assert torch.equal(out[:, :, 0, 0], torch.zeros(3, 2))
    assert torch.equal(out[:, :, 3, 3], torch.ones(3, 2))  # 1/3 < 0.6 * 2/3


def test_rescale_by_keep_ratio() -> None:
    x = torch.ones(2, 3, 4, 4)
    maps = one_hot_maps(2, [1.0])
    out = BatchAttentionDropBlock(rescale=True)(x, maps)
    assert torch.equal(out[:, :, 0, 0], torch.zeros(2, 3))
    torch.testing.assert_close(out.view(2, 3, 16)[:, :, 1:], torch.full((2, 3, 15), 16 / 15))


def test_probability_p() -> None:
    b = 4000
    keep = attention_drop_mask(
        torch.ones(b, 1, 4, 4),
        one_hot_maps(b, [1.0]),
        p=0.3,
        generator=torch.Generator().manual_seed(0),
    )
    frac = (~keep).any(dim=(1, 2, 3)).float().mean().item()
    assert abs(frac - 0.3) < 0.03


def test_maps_are_resized_bilinearly() -> None:
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 1.0
    keep = attention_drop_mask(torch.ones(1, 1, 4, 4), maps, threshold=0.9)
    resized = torch.nn.functional.interpolate(
        maps, size=(4, 4), mode="bilinear", align_corners=False
    )
    assert torch.equal(keep[0, 0], resized[0, 0] < 0.9 * resized.max())
    assert not keep[0, 0, 0, 0]
    assert keep[0, 0, 3, 3]


def test_without_maps_uses_mean_absolute_activation() -> None:
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0, 1, 1] = -4.0
    x[0, 1, 2, 2] = 1.0
    out = BatchAttentionDropBlock(threshold=0.5)(x)
    assert out[0, 0, 1, 1] == 0
    assert out[0, 1, 2, 2] == 1.0  # 0.5 < 0.5 * 2.0: kept


def test_gradient_is_the_mask() -> None:
    x = torch.randn(3, 2, 5, 4, requires_grad=True)
    maps = torch.rand(3, 4, 5, 4)
    drop = BatchAttentionDropBlock(generator=torch.Generator().manual_seed(0))
    drop(x, maps).sum().backward()
    keep = attention_drop_mask(x, maps, generator=torch.Generator().manual_seed(0))
    assert x.grad is not None
    torch.testing.assert_close(x.grad, keep.expand_as(x).float())


def test_gradcheck() -> None:
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    maps = torch.rand(2, 3, 3, 3, dtype=torch.float64)

    def f(t: torch.Tensor) -> torch.Tensor:
        return batch_attention_drop_block(
            t, maps, rescale=True, generator=torch.Generator().manual_seed(0)
        )

    assert torch.autograd.gradcheck(f, (x,))


def test_channels_last_and_autocast() -> None:
    x = torch.randn(2, 8, 6, 4).contiguous(memory_format=torch.channels_last)
    out = BatchAttentionDropBlock()(x, torch.rand(2, 3, 6, 4))
    assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.to(torch.bfloat16)
        outb = BatchAttentionDropBlock(rescale=True)(xb, torch.rand(2, 3, 6, 4))
    assert outb.dtype == torch.bfloat16
    assert outb.is_contiguous(memory_format=torch.channels_last)


def test_compile_fullgraph_training() -> None:
    drop = BatchAttentionDropBlock(rescale=True)
    x = torch.randn(4, 3, 6, 4, requires_grad=True)
    maps = torch.rand(4, 5, 6, 4)
    out = torch.compile(drop, fullgraph=True)(x, maps)
    out.sum().backward()
    zeroed = (out == 0).all(dim=1, keepdim=True)
    assert zeroed.any(dim=(2, 3)).all() and not zeroed.all(dim=(2, 3)).any()
    # the gradient is the (rescaled) mask: 0 where dropped, H*W / kept elsewhere
    kept = (~zeroed).sum(dim=(2, 3), keepdim=True).float()
    expected = torch.where(zeroed, 0.0, 24 / kept).expand_as(x)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("region", ["sample", "batch"])
def test_maps_without_a_peak_drop_nothing(region: str) -> None:
    x = torch.randn(3, 2, 4, 5)
    drop = BatchAttentionDropBlock(region=region)  # type: ignore[arg-type]
    for maps in (torch.zeros(3, 4, 4, 5), torch.full((3, 4, 4, 5), 0.7)):
        assert torch.equal(drop(x, maps), x)
    # a map whose every position reaches 0.5 * max: nothing to single out either
    offset = torch.full((3, 1, 4, 5), 1.0)
    offset[:, :, 0, 0] = 1.5
    assert torch.equal(drop(x, offset), x)
    assert torch.equal(drop(torch.ones(3, 2, 4, 5)), torch.ones(3, 2, 4, 5))  # flat features


def test_a_single_position_is_never_dropped() -> None:
    x = torch.randn(4, 3, 1, 1)
    drop = BatchAttentionDropBlock()
    assert torch.equal(drop(x), x)
    assert torch.equal(drop(x, torch.rand(4, 5, 1, 1)), x)
    assert torch.equal(drop(x, torch.rand(4, 5, 3, 3)), x)  # maps resized to 1x1


def test_flat_and_peaked_samples_in_one_batch() -> None:
    maps = torch.zeros(2, 1, 3, 3)
    maps[1, 0, 2, 1] = 4.0  # sample 0 flat (zero), sample 1 peaked at (2, 1)
    keep = attention_drop_mask(torch.ones(2, 1, 3, 3), maps)
    assert keep[0].all()
    expected = torch.ones(3, 3, dtype=torch.bool)
    expected[2, 1] = False
    assert torch.equal(keep[1, 0], expected)


def test_documented_example_drops_a_real_region() -> None:
    torch.manual_seed(0)
    features = torch.randn(4, 1024, 24, 8)
    drop = BatchAttentionDropBlock(threshold=0.5)
    dropped_alone = drop(features)  # attention: the channel-mean |activation|
    zeroed = (dropped_alone == 0).all(dim=1)
    counts = zeroed.sum(dim=(1, 2))
    assert (counts > 0).all() and (counts < 24 * 8).all(), counts
    # the dropped positions are those at or above the middle of the map's range
    a = features.abs().mean(dim=1)
    lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
    assert torch.equal(zeroed, a - lo >= 0.5 * (hi - lo))
    kept = ~zeroed.unsqueeze(1)
    assert torch.equal(dropped_alone * kept, features * kept)
    las = LocalAttentionSystem(1024, 16)
    out = las(features)
    dropped = drop(features, out.attention_maps)
    counts = (dropped == 0).all(dim=1).sum(dim=(1, 2))
    assert (counts > 0).all() and (counts < 24 * 8).all(), counts


def test_bad_attention_maps_are_refused_on_the_cpu() -> None:
    x = torch.randn(2, 3, 4, 4)
    drop = BatchAttentionDropBlock()
    for bad in (-1.0, float("nan"), float("inf")):
        maps = torch.rand(2, 3, 4, 4)
        maps[1, 2, 3, 0] = bad
        with pytest.raises(
            ValueError, match=rf"finite and non-negative.*found 1 bad values, e.g. {bad}"
        ):
            drop(x, maps)
    with pytest.raises(ValueError, match="attention_maps is on meta but x is on cpu"):
        drop(x, torch.rand(2, 3, 4, 4, device="meta"))
    with pytest.raises(
        ValueError, match=r"K >= 1, got x \(2, 3, 4, 4\), attention_maps \(2, 0, 4, 4\)"
    ):
        drop(x, torch.rand(2, 0, 4, 4))


def test_cpu_bf16_autocast_trains_with_las_maps() -> None:
    torch.manual_seed(2)
    las = LocalAttentionSystem(8, 3)
    x = torch.randn(4, 8, 6, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = las(x)
        dropped = BatchAttentionDropBlock(rescale=True)(x, out.attention_maps)
        loss = dropped.float().square().mean() + out.global_feature.float().sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert dropped.is_contiguous(memory_format=torch.channels_last)
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_trains_without_a_sync(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    las = LocalAttentionSystem(8, 3).cuda()
    x = torch.randn(4, 8, 6, 4, device="cuda").contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = las(x)  # warm-up outside the sync check (cuDNN/cuBLAS initialisation)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=dtype):
            out = las(x)
            dropped = BatchAttentionDropBlock()(x, out.attention_maps)
            loss = dropped.float().square().mean() + out.global_feature.float().sum()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"threshold must be a number, got str \('0.5'\)"):
        BatchAttentionDropBlock(threshold="0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold must be a finite number, got nan"):
        BatchAttentionDropBlock(threshold=float("nan"))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"threshold must be in \(0, 1\], got {bad}"):
            BatchAttentionDropBlock(threshold=bad)
    with pytest.raises(
        ValueError, match=r"p \(the probability of dropping\) must be in \[0, 1\], got 2"
    ):
        BatchAttentionDropBlock(p=2)
    with pytest.raises(
        ValueError, match=r"region must be one of \('sample', 'batch'\), got 'pixel'"
    ):
        BatchAttentionDropBlock(region="pixel")  # type: ignore[arg-type]
    drop = BatchAttentionDropBlock()
    with pytest.raises(
        ValueError, match=r"x must be 4-D with shape \(B, C, H, W\), got shape \(2, 3\)"
    ):
        drop(torch.randn(2, 3))
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int32"):
        drop(torch.ones(2, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="with B = 2 .the batch size of x. and K >= 1"):
        drop(torch.randn(2, 3, 4, 4), torch.rand(3, 2, 4, 4))
    with pytest.raises(
        ValueError,
        match=r"attention_maps must be 4-D with shape \(B, K, H, W\), got shape \(2, 4, 4\)",
    ):
        drop(torch.randn(2, 3, 4, 4), torch.rand(2, 4, 4))


def test_extra_repr() -> None:
    r = repr(BatchAttentionDropBlock(threshold=0.3, region="batch"))
    assert "threshold=0.3, region='batch', p=1.0, rescale=False" in r
