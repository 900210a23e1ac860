from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lagnet.layers import (
    EmbeddingHead,
    GlobalPool,
    MultiGranularityHead,
    ReductionHead,
    StripePool,
    global_pool,
    stripe_pool,
)

CUDA = torch.cuda.is_available()


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


@pytest.mark.parametrize("channels_last", [False, True])
def test_stripe_pool_is_bit_identical_to_adaptive_pooling(channels_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    for h in range(1, 26):
        for s in range(1, 8):
            x = torch.randn(2, 3, h, 5, generator=g)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            mx = F.adaptive_max_pool2d(x, (s, 1)).squeeze(-1)
            avg = F.adaptive_avg_pool2d(x, (s, 1)).squeeze(-1)
            assert torch.equal(stripe_pool(x, s, "max"), mx), (h, s)
            assert torch.equal(stripe_pool(x, s, "avg"), avg), (h, s)
            assert torch.equal(stripe_pool(x, s, "max+max"), mx + mx), (h, s)
            assert torch.equal(stripe_pool(x, s), mx + avg), (h, s)


def test_stripe_pool_gradient_goes_to_the_stripe_maximum() -> None:
    # H = 4, S = 3: windows rows [0, 2), [1, 3), [2, 4); one column.
    x = torch.tensor([[[[1.0], [5.0], [2.0], [0.0]]]], requires_grad=True)
    out = stripe_pool(x, 3, "max")
    assert out.tolist() == [[[5.0, 5.0, 2.0]]]
    out.sum().backward()
    assert x.grad is not None
    assert x.grad.flatten().tolist() == [0.0, 2.0, 1.0, 0.0]


def test_stripe_pool_module() -> None:
    x = torch.randn(2, 3, 7, 4)
    assert torch.equal(StripePool(3, "max")(x), stripe_pool(x, 3, "max"))
    assert "num_stripes=3, mode='max+avg'" in repr(StripePool(3))
    with pytest.raises(TypeError, match=r"num_stripes must be an int, got float \(3.0\)"):
        StripePool(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pooling mode must be one of"):
        StripePool(3, "sum")  # type: ignore[arg-type]


def test_stripe_pool_exports_without_adaptive_max_pooling() -> None:
    x = torch.randn(2, 3, 8, 4)  # 3 stripes do not divide 8 rows
    program = torch.export.export(StripePool(3).eval(), (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("adaptive_max_pool" in t for t in targets), targets
    assert torch.equal(program.module()(x), stripe_pool(x, 3))


def test_stripes_of_a_pooled_descriptor_are_twice_it() -> None:
    # The released code's quirk (docs/reference-code.md): stripes of the 1x1 descriptor.
    g = torch.randn(2, 6)
    torch.testing.assert_close(
        stripe_pool(g[:, :, None, None], 3), 2 * g[:, :, None].expand(2, 6, 3)
    )


def test_embedding_head() -> None:
    head = EmbeddingHead(16, num_classes=5, embed_dim=8)
    out = head(torch.randn(4, 16))
    assert out.feature.shape == (4, 8) and out.logits.shape == (4, 5)
    out2 = head(torch.randn(4, 16, 1, 1))
    assert out2.feature.shape == (4, 8)
    assert isinstance(head.neck[1], torch.nn.LeakyReLU) and head.neck[1].negative_slope == 0.1
    assert head.neck[2].bias is None and head.classifier.bias is None
    assert "in_channels=16, num_classes=5, embed_dim=8" in repr(head)
    assert list(head.state_dict()) == [
        "neck.0.weight",
        "neck.0.bias",
        "neck.0.running_mean",
        "neck.0.running_var",
        "neck.0.num_batches_tracked",
        "neck.2.weight",
        "bottleneck.weight",
        "bottleneck.bias",
        "bottleneck.running_mean",
        "bottleneck.running_var",
        "bottleneck.num_batches_tracked",
        "classifier.weight",
    ]
    with pytest.raises(
        ValueError, match="has 15 channels but this layer was built for in_channels=16"
    ):
        head(torch.randn(4, 15))
    with pytest.raises(
        ValueError, match=r"expects \(B, C\) or \(B, C, 1, 1\), got shape \(4, 16, 2, 2\)"
    ):
        head(torch.randn(4, 16, 2, 2))


def test_embedding_head_by_hand() -> None:
    # eval BN with identity statistics, slope 0.5, identity projection, one classifier row
    head = EmbeddingHead(2, num_classes=1, embed_dim=2, negative_slope=0.5).eval()
    with torch.no_grad():
        head.neck[2].weight.copy_(torch.eye(2))
        head.classifier.weight.copy_(torch.tensor([[1.0, 10.0]]))
    out = head(torch.tensor([[3.0, -4.0]]))
    scale = 1 / (1 + 1e-5) ** 0.5  # two eval batch norms with eps 1e-5
    torch.testing.assert_close(out.feature, torch.tensor([[3.0, -2.0]]) * scale * scale)
    torch.testing.assert_close(out.logits, torch.tensor([[3.0 - 20.0]]) * scale * scale)


def test_embedding_head_signature_and_old_positional_forms() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = EmbeddingHead(16, num_classes=5)  # keywords: no warning
    assert (head.in_channels, head.num_classes, head.embed_dim) == (16, 5, 512)
    with pytest.warns(DeprecationWarning, match=r"uses the old order.*num_classes=5, embed_dim=8"):
        old = EmbeddingHead(16, 8, 5)
    assert (old.num_classes, old.embed_dim) == (5, 8)
    with pytest.warns(DeprecationWarning, match="second positional argument is now num_classes"):
        two = EmbeddingHead(16, 7)
    assert (two.num_classes, two.embed_dim) == (7, 512)
    with pytest.raises(TypeError, match="EmbeddingHead needs num_classes"):
        EmbeddingHead(16)
    with pytest.raises(TypeError, match="got 4 positional arguments"):
        EmbeddingHead(16, 8, 5, 3)
    with pytest.raises(TypeError, match="by keyword and positional arguments"):
        EmbeddingHead(16, 8, num_classes=5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'in_features'"):
        EmbeddingHead(in_features=16, num_classes=5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="embed_dim must be >= 1, got 0"):
        EmbeddingHead(16, num_classes=5, embed_dim=0)
    with pytest.raises(TypeError, match="num_classes must be an int, got str"):
        EmbeddingHead(16, num_classes="751")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative_slope must be a finite number, got nan"):
        EmbeddingHead(16, num_classes=5, negative_slope=float("nan"))


def test_heads_refuse_a_batch_of_one_in_training() -> None:
    head = EmbeddingHead(4, num_classes=3, embed_dim=2)
    with pytest.raises(
        ValueError, match=r"EmbeddingHead in training mode needs a batch of at least 2.*\.eval\(\)"
    ):
        head(torch.randn(1, 4))
    assert head.eval()(torch.randn(1, 4)).feature.shape == (1, 2)
    with pytest.raises(
        ValueError, match="ReductionHead in training mode needs a batch of at least"
    ):
        ReductionHead(4, 2)(torch.randn(1, 4, 1, 1))
    mgh = MultiGranularityHead(4, 3, num_stripes=2, embed_dim=2, reduce_dim=2)
    with pytest.raises(ValueError, match="needs a batch of at least 2"):
        mgh(torch.randn(1, 4, 6, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_heads_name_both_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(3, 4, dtype=dtype)
    with pytest.raises(
        TypeError,
        match=rf"x has dtype {dtype} but the parameters of EmbeddingHead are torch.float32",
    ):
        EmbeddingHead(4, num_classes=3)(x)
    with pytest.raises(TypeError, match="parameters of ReductionHead are torch.float32"):
        ReductionHead(4, 2)(x)
    with pytest.raises(TypeError, match="parameters of EmbeddingHead are torch.float32"):
        MultiGranularityHead(4, 3)(torch.randn(3, 4, 6, 2, dtype=dtype))
    # a module cast to the input's dtype is fine
    assert EmbeddingHead(4, num_classes=3).to(dtype)(x).logits.dtype == dtype


def test_embedding_head_gradcheck() -> None:
    torch.manual_seed(0)
    head = EmbeddingHead(4, num_classes=2, embed_dim=3).double()
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


def test_each_stripe_sees_only_its_rows() -> None:
    # 9 rows, 3 stripes: rows 0-2, 3-5, 6-8. Changing rows 6-8 changes stripe 2 only.
    torch.manual_seed(1)
    head = MultiGranularityHead(8, 7, num_stripes=3, embed_dim=6, reduce_dim=4).eval()
    x = torch.randn(2, 8, 9, 3)
    y = x.clone()
    y[:, :, 6:] += 3.0
    a, b = head(x), head(y)
    for field in ("stripe_features", "stripe_logits", "stripe_reduced"):
        fa, fb = getattr(a, field), getattr(b, field)
        assert torch.equal(fa[:, :2], fb[:, :2]), field
        assert not torch.allclose(fa[:, 2], fb[:, 2]), field


def test_multi_granularity_pooled_stripes_quirk() -> None:
    # Stripes of the pooled 1x1 descriptor are all the same input: with the three stripe heads
    # sharing weights, the three stripe features are equal (and they differ for real stripes).
    torch.manual_seed(2)
    outs = []
    for source in ("pooled", "map"):
        head = MultiGranularityHead(8, 7, num_stripes=3, stripes_from=source).eval()  # type: ignore[arg-type]
        for other in (head.stripe_heads[1], head.stripe_heads[2]):
            other.load_state_dict(head.stripe_heads[0].state_dict())
        outs.append(head(torch.randn(2, 8, 6, 4)).stripe_features)
    pooled, real = outs
    assert torch.equal(pooled[:, 0], pooled[:, 1]) and torch.equal(pooled[:, 0], pooled[:, 2])
    assert not torch.allclose(real[:, 0], real[:, 1])


def test_multi_granularity_errors() -> None:
    with pytest.raises(ValueError, match="num_stripes must be >= 0, got -1"):
        MultiGranularityHead(8, 7, num_stripes=-1)
    with pytest.raises(TypeError, match=r"num_stripes must be an int, got str \('3'\)"):
        MultiGranularityHead(8, 7, num_stripes="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduce_dim must be >= 1, got -4"):
        MultiGranularityHead(8, 7, reduce_dim=-4)
    with pytest.raises(ValueError, match="embed_dim must be >= 1, got 0"):
        MultiGranularityHead(8, 7, embed_dim=0)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        MultiGranularityHead(8, 0)
    with pytest.raises(ValueError, match=r"pool must be one of \('max\+avg'"):
        MultiGranularityHead(8, 7, pool="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stripes_from must be one of .*, got 'rows'"):
        MultiGranularityHead(8, 7, stripes_from="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_stripes must be >= 1, got 0"):
        stripe_pool(torch.randn(1, 2, 3, 3), 0)
    with pytest.raises(TypeError, match="num_stripes must be an int"):
        stripe_pool(torch.randn(1, 2, 3, 3), 2.0)  # type: ignore[arg-type]


def test_state_dict_keys_are_unchanged() -> None:
    # the released checkpoints map onto these names (lagnet.reference)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def embedding(prefix: str) -> list[str]:
        return [
            *(f"{prefix}.neck.0.{n}" for n in bn),
            f"{prefix}.neck.2.weight",
            *(f"{prefix}.bottleneck.{n}" for n in bn),
            f"{prefix}.classifier.weight",
        ]

    def reduction(prefix: str) -> list[str]:
        return [f"{prefix}.0.weight", *(f"{prefix}.1.{n}" for n in bn)]

    head = MultiGranularityHead(4, 3, num_stripes=1, embed_dim=2, reduce_dim=2)
    assert list(head.state_dict()) == [
        *embedding("head"),
        *reduction("reduction"),
        *embedding("stripe_heads.0"),
        *reduction("stripe_reductions.0"),
    ]


def train_heads_step(x: torch.Tensor) -> tuple[torch.Tensor, MultiGranularityHead]:
    torch.manual_seed(3)
    head = MultiGranularityHead(8, 5, num_stripes=3, embed_dim=6, reduce_dim=4)
    out = head(x)
    loss = (
        F.cross_entropy(out.logits.float(), torch.arange(4) % 5)
        + F.cross_entropy(out.stripe_logits.float().flatten(0, 1), torch.arange(12) % 5)
        + out.reduced.float().square().sum()
        + out.stripe_reduced.float().square().sum()
    )
    loss.backward()
    return loss, head


def test_cpu_bf16_autocast_trains() -> None:
    x = torch.randn(4, 8, 7, 3).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, head = train_heads_step(x)
    assert torch.isfinite(loss)
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_trains(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    head = MultiGranularityHead(8, 5, num_stripes=3, embed_dim=6, reduce_dim=4).cuda()
    x = torch.randn(4, 8, 7, 3, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        out = head(x)
        loss = out.logits.float().logsumexp(1).sum() + out.stripe_reduced.float().square().sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert head.head.classifier.weight.grad is not None
    assert head.head.classifier.weight.grad.dtype == torch.float32


def test_compile_fullgraph_training() -> None:
    x = torch.randn(4, 8, 7, 3)
    eager_loss, eager = train_heads_step(x)
    torch.manual_seed(3)
    head = MultiGranularityHead(8, 5, num_stripes=3, embed_dim=6, reduce_dim=4)
    compiled = torch.compile(head, fullgraph=True)
    out = compiled(x)
    loss = (
        F.cross_entropy(out.logits, torch.arange(4) % 5)
        + F.cross_entropy(out.stripe_logits.flatten(0, 1), torch.arange(12) % 5)
        + out.reduced.square().sum()
        + out.stripe_reduced.square().sum()
    )
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for (name, p), q in zip(head.named_parameters(), eager.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        # compiled kernels sum in another order: compare to the gradient's own scale
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max(), name
    pool = torch.compile(StripePool(3), fullgraph=True)
    torch.testing.assert_close(pool(x), stripe_pool(x, 3))
    gp = torch.compile(GlobalPool(), fullgraph=True)
    torch.testing.assert_close(gp(x), global_pool(x))


def test_multi_granularity_head_compiles_fullgraph_eval() -> None:
    head = MultiGranularityHead(8, 7, num_stripes=3, embed_dim=6, reduce_dim=4).eval()
    x = torch.randn(2, 8, 7, 3)
    compiled = torch.compile(head, fullgraph=True)
    with torch.no_grad():
        for a, b in zip(compiled(x), head(x), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["max+avg", "max", "avg", "max+max"])
def test_pooling_trains_under_cpu_bf16_autocast_and_compiles(mode: str) -> None:
    x = torch.randn(3, 4, 7, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stripe_pool(x, 3, mode) + global_pool(x, mode)[:, :, None]  # type: ignore[arg-type]
        loss = out.float().square().sum()
    loss.backward()
    assert torch.isfinite(loss) and x.grad is not None and x.grad.dtype == torch.float32
    y = x.detach().clone().requires_grad_()
    compiled = torch.compile(StripePool(3, mode), fullgraph=True)  # type: ignore[arg-type]
    compiled(y).square().sum().backward()
    z = x.detach().clone().requires_grad_()
    stripe_pool(z, 3, mode).square().sum().backward()  # type: ignore[arg-type]
    assert y.grad is not None and z.grad is not None
    torch.testing.assert_close(y.grad, z.grad)
