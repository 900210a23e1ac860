from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lagnet import LAGNetLoss, LAGNetOutput
from lagnet.losses import (
    AttentionCenterLoss,
    BatchHardTripletLoss,
    LabelSmoothingCrossEntropy,
    euclidean_distance_matrix,
    parse_loss_spec,
)


def naive_batch_hard(x: torch.Tensor, y: torch.Tensor, margin: float | None) -> torch.Tensor:
    losses = []
    for i in range(len(x)):
        d = [(x[i] - x[j]).pow(2).sum().clamp(min=1e-12).sqrt() for j in range(len(x))]
        pos = max(d[j] for j in range(len(x)) if y[j] == y[i])
        neg = min(d[j] for j in range(len(x)) if y[j] != y[i])
        losses.append(F.softplus(pos - neg) if margin is None else F.relu(pos - neg + margin))
    return torch.stack(losses).mean()


def test_cross_entropy() -> None:
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(LabelSmoothingCrossEntropy()(logits, y), F.cross_entropy(logits, y))
    torch.testing.assert_close(
        LabelSmoothingCrossEntropy(0.1)(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1)
    )


@pytest.mark.parametrize("margin", [1.2, 0.3, None])
def test_batch_hard_triplet_matches_loops(margin: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    torch.testing.assert_close(BatchHardTripletLoss(margin)(x, y), naive_batch_hard(x, y, margin))


def test_self_distance_is_exact_despite_gram_rounding() -> None:
    # |a|^2 + |a|^2 - 2 a.a is not exactly 0 in float32 for large |a|: without the fix the
    # diagonal came out as sqrt(rounding noise), up to ~1e-3 here instead of 1e-6
    g = torch.Generator().manual_seed(3)
    x = 100 * torch.randn(64, 5, generator=g)
    sq = x.pow(2).sum(dim=1)
    noise = (sq + sq - 2 * (x @ x.t()).diagonal()).abs()
    assert noise.max() > 0  # the float32 expansion really is inexact on this input
    d = euclidean_distance_matrix(x)
    assert torch.equal(d.diagonal(), torch.full((64,), 1e-6))


def test_soft_margin_singleton_anchor_matches_loop() -> None:
    # anchor 7 is the only sample of identity 3: its d_ap is its distance to itself, the case
    # that failed on torch 2.11 (the Gram diagonal there was ~1e-3, the loop's 1e-6)
    # (with seed 20 the float32 Gram diagonal of anchor 7 is 6.9e-4 after the square root on
    # this machine's BLAS, and the unfixed loss was off by 2.3e-5)
    g = torch.Generator().manual_seed(20)
    x = torch.randn(8, 5, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    got = BatchHardTripletLoss(None)(x, y)
    torch.testing.assert_close(got, naive_batch_hard(x, y, None))
    torch.testing.assert_close(got, naive_batch_hard(x.double(), y, None).float())


def test_triplet_single_identity_is_zero_hinge() -> None:
    x = torch.randn(4, 3)
    assert BatchHardTripletLoss(1.2)(x, torch.zeros(4, dtype=torch.long)).item() == 0.0


def test_triplet_gradcheck() -> None:
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda t: BatchHardTripletLoss(1.2)(t, y), (x,))


def test_center_loss_value_and_update_with_repeated_labels() -> None:
    loss = AttentionCenterLoss(3, 2, beta=0.5)
    loss.centers.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]))
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1, 0])
    c_hat = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.0, 0.0], [0.6, 0.8]])
    out = loss(f, y)
    torch.testing.assert_close(out, (f - c_hat).pow(2).sum() / 4)
    # class 0: mean of three differences; class 1: its single difference; class 2 untouched
    mean0 = (f[[0, 1, 3]] - c_hat[[0, 1, 3]]).mean(dim=0)
    expected = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    expected[0] += 0.5 * mean0
    torch.testing.assert_close(loss.centers, expected)
    assert "centers" in loss.state_dict()
    before = loss.centers.clone()
    loss.eval()(f, y)
    torch.testing.assert_close(loss.centers, before)


def test_center_loss_gradcheck() -> None:
    loss = AttentionCenterLoss(2, 3, beta=0.0).double()
    loss.centers.copy_(torch.randn(2, 3, dtype=torch.float64))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: loss(t, torch.tensor([0, 1, 1, 0])), (x,))


def fake_output(b: int = 4, n: int = 3, d: int = 6) -> LAGNetOutput:
    g = torch.Generator().manual_seed(0)
    names = ["la", "drop", "global", "part", "part0", "part1", "part2"]
    return LAGNetOutput(
        embedding=torch.randn(b, 7 * 4, generator=g),
        logits={k: torch.randn(b, n, generator=g) for k in names},
        triplet_features={
            k: torch.randn(b, 4, generator=g)
            for k in ["global_reduced", "part_reduced", "la_reduced", "drop_reduced", "part_bn"]
        },
        attention_features=F.normalize(torch.randn(b, d, generator=g), dim=1),
        attention_maps=torch.rand(b, 2, 3, 3, generator=g),
    )


def test_lagnet_loss_combines_terms() -> None:
    out, y = fake_output(), torch.tensor([0, 0, 1, 2])
    loss = LAGNetLoss(3, 6, ce_weight=1.0, triplet_weight=2.0, center_weight=0.5)
    total, parts = loss(out, y)
    ce = torch.stack([F.cross_entropy(v, y) for v in out.logits.values()]).mean()
    tri = torch.stack([naive_batch_hard(v, y, 1.2) for v in out.triplet_features.values()]).mean()
    cen = out.attention_features.pow(2).sum() / 4  # centers start at zero
    torch.testing.assert_close(parts["cross_entropy"], ce)
    torch.testing.assert_close(parts["triplet"], 2 * tri)
    torch.testing.assert_close(parts["center"], 0.5 * cen)
    torch.testing.assert_close(total, ce + 2 * tri + 0.5 * cen)


def test_from_spec() -> None:
    out, y = fake_output(), torch.tensor([0, 0, 1, 2])
    a = LAGNetLoss.from_spec("1*CrossEntropy+2*Triplet+1*L2", num_classes=3, attention_dim=6)
    b = LAGNetLoss(3, 6)
    torch.testing.assert_close(a(out, y)[0], b(out, y)[0])
    assert parse_loss_spec("0.5*CE + 1e-1*Center") == {
        "cross_entropy": 0.5,
        "triplet": 0.0,
        "center": 0.1,
    }
    no_center = LAGNetLoss.from_spec("1*CrossEntropy", num_classes=3, attention_dim=6)
    assert no_center(out, y)[1]["center"].item() == 0.0


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("1*CrossEntropy+2*Tripplet", "unknown loss 'Tripplet'"),
        ("CrossEntropy", "malformed loss term 'CrossEntropy'"),
        ("1*CrossEntropy++2*Triplet", "malformed loss term ''"),
        ("1*CE+2*CrossEntropy", "appears twice"),
        ("", "non-empty string"),
    ],
)
def test_malformed_spec(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LAGNetLoss.from_spec(spec, num_classes=3, attention_dim=6)


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="expects a LAGNetOutput.*got Tensor"):
        LAGNetLoss(3, 6)(torch.randn(4, 28), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(
        ValueError, match=r"labels must have shape \(4,\) to match the batch, got \(3,\)"
    ):
        BatchHardTripletLoss()(torch.randn(4, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(
        TypeError, match="labels must be an integer tensor, got dtype torch.float32"
    ):
        LabelSmoothingCrossEntropy()(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(
        ValueError, match="features have dimension 5 but the centers were built with feature_dim=6"
    ):
        AttentionCenterLoss(3, 6)(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"margin must be in \[0, inf\), got -1.0"):
        BatchHardTripletLoss(-1.0)
    with pytest.raises(ValueError, match=r"triplet_weight must be in \[0, inf\), got -2"):
        LAGNetLoss(3, 6, triplet_weight=-2)


def _center_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    loss = AttentionCenterLoss(4, 3, beta=0.5)
    g = torch.Generator().manual_seed(rank)
    features = torch.randn(2, 3, generator=g)
    labels = torch.tensor([rank, 2])  # class 2 on both ranks
    loss(features, labels)
    torch.save({"centers": loss.centers, "features": features, "labels": labels}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_center_update_is_synchronised_across_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "centers")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_center_worker, args=(2, init, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    torch.testing.assert_close(r0["centers"], r1["centers"], rtol=0, atol=0)
    # the same as one process seeing both batches
    single = AttentionCenterLoss(4, 3, beta=0.5)
    single(torch.cat([r0["features"], r1["features"]]), torch.cat([r0["labels"], r1["labels"]]))
    torch.testing.assert_close(r0["centers"], single.centers)
    assert r0["centers"][3].abs().sum() == 0  # class 3 never seen


@pytest.mark.parametrize(
    ("labels", "shown"),
    [
        ([0, 1, 3, 1], "3"),
        ([0, -1, 1, 1], "-1"),
        ([-100, 0, 1, 1], "-100"),
        ([5, 7, -2, 0], "-2, 5, 7"),
    ],
)
def test_out_of_range_labels_are_refused(labels: list[int], shown: str) -> None:
    y = torch.tensor(labels)
    match = rf"labels must be class indices in \[0, 3\) .*; got {shown}$"
    with pytest.raises(ValueError, match=match):
        LabelSmoothingCrossEntropy()(torch.randn(4, 3), y)
    center = AttentionCenterLoss(3, 6)
    before = center.centers.clone()
    with pytest.raises(ValueError, match=match):
        center(torch.randn(4, 6), y)
    with pytest.raises(ValueError, match=match):  # eval mode: -1 used to pick the last center
        center.eval()(torch.randn(4, 6), y)
    assert torch.equal(center.centers, before)
    with pytest.raises(ValueError, match=match):
        LAGNetLoss(3, 6)(fake_output(), y)


def test_ignore_index_message_names_it() -> None:
    with pytest.raises(ValueError, match="ignore_index -100 are not accepted"):
        LabelSmoothingCrossEntropy()(torch.randn(2, 3), torch.tensor([-100, 0]))


def test_out_of_range_labels_inside_compile_assert_on_device() -> None:
    loss = LabelSmoothingCrossEntropy()
    compiled = torch.compile(lambda x, y: loss(x, y), fullgraph=True, backend="eager")
    x = torch.randn(2, 3)
    torch.testing.assert_close(
        compiled(x, torch.tensor([0, 2])), F.cross_entropy(x, torch.tensor([0, 2]))
    )
    with pytest.raises(RuntimeError, match=r"labels must be class indices in \[0, 3\)"):
        compiled(x, torch.tensor([0, 3]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"margin": "1.2"}, TypeError, r"margin must be a number, got str \('1.2'\)"),
        ({"margin": float("nan")}, ValueError, "margin must be a finite number, got nan"),
        ({"ce_weight": float("nan")}, ValueError, "ce_weight must be a finite number, got nan"),
        ({"center_weight": float("inf")}, ValueError, "center_weight must be a finite number"),
        ({"triplet_weight": -0.5}, ValueError, r"triplet_weight must be in \[0, inf\)"),
        ({"ce_weight": "1"}, TypeError, "ce_weight must be a number, got str"),
        (
            {"ce_weight": 0, "triplet_weight": 0.0, "center_weight": 0},
            ValueError,
            "are all 0: the loss would always be 0",
        ),
        ({"label_smoothing": 1.0}, ValueError, r"label_smoothing must be in \[0, 1\), got 1.0"),
        ({"center_beta": 1.5}, ValueError, r"beta must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_loss_arguments(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LAGNetLoss(3, 6, **kwargs)  # type: ignore[arg-type]


def test_bad_margin_for_the_triplet_module() -> None:
    with pytest.raises(TypeError, match=r"margin must be a number, got str \('1.2'\)"):
        BatchHardTripletLoss("1.2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("0*CE+0*Triplet+0*L2", r"every weight in loss spec '0\*CE\+0\*Triplet\+0\*L2' is 0"),
        ("1e999*CE", r"weight '1e999' of 'CE' in spec '1e999\*CE' is infinite"),
    ],
)
def test_degenerate_spec(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_loss_spec(spec)


def test_from_spec_sets_every_other_argument() -> None:
    loss = LAGNetLoss.from_spec(
        "1*CE+1*Triplet+0.5*L2",
        num_classes=3,
        attention_dim=6,
        margin=None,
        label_smoothing=0.2,
        center_beta=0.3,
        sync_distributed=False,
    )
    assert (loss.ce_weight, loss.triplet_weight, loss.center_weight) == (1.0, 1.0, 0.5)
    assert loss.triplet.margin is None and loss.cross_entropy.label_smoothing == 0.2
    assert loss.center.beta == 0.3 and loss.center.sync_distributed is False
    with pytest.raises(TypeError, match=r"weights from the spec string, not \['ce_weight'\]"):
        LAGNetLoss.from_spec("1*CE", num_classes=3, attention_dim=6, ce_weight=2.0)


def test_lagnet_loss_checks_the_output_against_its_sizes() -> None:
    with pytest.raises(
        ValueError, match="classifiers have 3 classes but the loss was built with num_classes=4"
    ):
        LAGNetLoss(4, 6)(fake_output(), torch.tensor([0, 0, 1, 2]))
    with pytest.raises(
        ValueError, match=r"attention_features have shape \(4, 6\) but .* attention_dim=8"
    ):
        LAGNetLoss(3, 8)(fake_output(), torch.tensor([0, 0, 1, 2]))


def test_cross_entropy_old_name_warns() -> None:
    import lagnet.losses

    with pytest.warns(
        DeprecationWarning, match="use `from lagnet.losses import LabelSmoothingCrossEntropy`"
    ):
        old = lagnet.losses.CrossEntropyLoss
    assert old is LabelSmoothingCrossEntropy
    assert "CrossEntropyLoss" not in lagnet.losses.__all__


def test_center_counts_need_no_bincount() -> None:
    # three samples of class 2, none of class 0: a static-size count, not bincount
    loss = AttentionCenterLoss(4, 2, beta=1.0)
    f = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 6.0]])
    loss(f, torch.tensor([2, 2, 1, 2]))
    expected = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1 / 3, 3.0], [0.0, 0.0]])
    torch.testing.assert_close(loss.centers, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_under_cpu_autocast_compute_in_float32(dtype: torch.dtype) -> None:
    out, y = fake_output(), torch.tensor([0, 0, 1, 2])
    half = LAGNetOutput(
        embedding=out.embedding.to(dtype),
        logits={k: v.to(dtype) for k, v in out.logits.items()},
        triplet_features={k: v.to(dtype).requires_grad_() for k, v in out.triplet_features.items()},
        attention_features=out.attention_features.to(dtype).requires_grad_(),
        attention_maps=out.attention_maps,
    )
    ref = LAGNetLoss(3, 6)
    loss = LAGNetLoss(3, 6)
    with torch.autocast("cpu", dtype=dtype):
        total, parts = loss(half, y)
    assert total.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())
    # the same as float32 losses of the rounded inputs
    rounded = LAGNetOutput(
        embedding=half.embedding.float(),
        logits={k: v.float() for k, v in half.logits.items()},
        triplet_features={k: v.detach().float() for k, v in half.triplet_features.items()},
        attention_features=half.attention_features.detach().float(),
        attention_maps=half.attention_maps,
    )
    want, _ = ref(rounded, y)
    torch.testing.assert_close(total, want)
    total.backward()
    assert half.attention_features.grad is not None
    assert half.attention_features.grad.dtype == dtype
