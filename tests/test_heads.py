from __future__ import annotations

import pytest
import torch

from lagnet import (
    EmbeddingHead,
    GlobalPool,
    MultiGranularityHead,
    ReductionHead,
    global_pool,
    stripe_pool,
)


def test_global_pool_modes() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    mx, avg = x.amax(dim=(2, 3)), x.mean(dim=(2, 3))
    torch.testing.assert_close(global_pool(x), mx + avg)
    torch.testing.assert_close(global_pool(x, "max"), mx)
    torch.testing.assert_close(global_pool(x, "avg"), avg)
    torch.testing.assert_close(global_pool(x, "max+max"), 2 * mx)
    assert "mode='max'" in repr(GlobalPool("max"))


@pytest.mark.parametrize(("h", "s"), [(24, 3), (7, 3), (2, 3), (9, 4)])
def test_stripe_pool_matches_manual_stripes(h: int, s: int) -> None:
    x = torch.randn(2, 3, h, 5)
    out = stripe_pool(x, s)
    assert out.shape == (2, 3, s)
    for i in range(s):
        lo, hi = (i * h) // s, -((-(i + 1) * h) // s)  # adaptive pooling bounds
        part = x[:, :, lo:hi]
        torch.testing.assert_close(out[:, :, i], part.amax(dim=(2, 3)) + part.mean(dim=(2, 3)))


def test_stripes_of_a_pooled_descriptor_are_twice_it() -> None:
    # The released code's quirk (REFERENCE.md section 4): stripes of the 1x1 descriptor.
    g = torch.randn(2, 6)
    torch.testing.assert_close(
        stripe_pool(g[:, :, None, None], 3), 2 * g[:, :, None].expand(2, 6, 3)
    )


def test_embedding_head() -> None:
    head = EmbeddingHead(16, 8, 5)
    out = head(torch.randn(4, 16))
    assert out.feature.shape == (4, 8) and out.logits.shape == (4, 5)
    out2 = head(torch.randn(4, 16, 1, 1))
    assert out2.feature.shape == (4, 8)
    assert isinstance(head.neck[1], torch.nn.LeakyReLU) and head.neck[1].negative_slope == 0.1
    assert head.neck[2].bias is None and head.classifier.bias is None
    with pytest.raises(
        ValueError, match="has 15 channels but this layer was built for in_channels=16"
    ):
        head(torch.randn(4, 15))
    with pytest.raises(
        ValueError, match=r"expects \(B, C\) or \(B, C, 1, 1\), got shape \(4, 16, 2, 2\)"
    ):
        head(torch.randn(4, 16, 2, 2))


def test_embedding_head_gradcheck() -> None:
    torch.manual_seed(0)
    head = EmbeddingHead(4, 3, 2).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: head(t).logits, (x,))


def test_reduction_head() -> None:
    red = ReductionHead(16, 4)
    out = red(torch.randn(3, 16))
    assert out.shape == (3, 4) and torch.all(out >= 0)
    assert list(dict(red.named_children())) == ["0", "1", "2"]


@pytest.mark.parametrize(("h", "w", "s"), [(24, 8, 3), (13, 5, 3), (6, 6, 0), (9, 4, 2)])
def test_multi_granularity_head_any_size(h: int, w: int, s: int) -> None:
    head = MultiGranularityHead(8, 7, num_stripes=s, embed_dim=6, reduce_dim=4)
    x = torch.randn(3, 8, h, w)
    out = head(x)
    assert (
        out.feature.shape == (3, 6) and out.logits.shape == (3, 7) and out.reduced.shape == (3, 4)
    )
    assert out.stripe_features.shape == (3, s, 6)
    assert out.stripe_logits.shape == (3, s, 7)
    assert out.stripe_reduced.shape == (3, s, 4)
    if s:
        stripes = stripe_pool(x, s)
        torch.testing.assert_close(
            out.stripe_features[:, 0], head.stripe_heads[0](stripes[:, :, 0]).feature
        )


def test_multi_granularity_pooled_stripes_quirk() -> None:
    head = MultiGranularityHead(8, 7, num_stripes=3, stripes_from="pooled").eval()
    x = torch.randn(2, 8, 6, 4)
    out = head(x)
    g2 = 2 * global_pool(x)
    torch.testing.assert_close(out.stripe_features[:, 1], head.stripe_heads[1](g2).feature)


def test_multi_granularity_errors() -> None:
    with pytest.raises(ValueError, match="num_stripes must be an int >= 0, got -1"):
        MultiGranularityHead(8, 7, num_stripes=-1)
    with pytest.raises(ValueError, match="unknown pooling mode 'sum'"):
        MultiGranularityHead(8, 7, pool="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stripes_from must be 'map' or 'pooled', got 'rows'"):
        MultiGranularityHead(8, 7, stripes_from="rows")
    with pytest.raises(ValueError, match="num_stripes must be >= 1, got 0"):
        stripe_pool(torch.randn(1, 2, 3, 3), 0)


def test_multi_granularity_head_compiles_fullgraph() -> None:
    head = MultiGranularityHead(8, 7, num_stripes=3, embed_dim=6, reduce_dim=4).eval()
    x = torch.randn(2, 8, 7, 3)
    compiled = torch.compile(head, fullgraph=True)
    with torch.no_grad():
        for a, b in zip(compiled(x), head(x), strict=True):
            torch.testing.assert_close(a, b)
