from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lagnet import (
    AttentionCenterLoss,
    BatchHardTripletLoss,
    CrossEntropyLoss,
    LAGNetLoss,
    LAGNetOutput,
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
    torch.testing.assert_close(CrossEntropyLoss()(logits, y), F.cross_entropy(logits, y))
    torch.testing.assert_close(
        CrossEntropyLoss(0.1)(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1)
    )


@pytest.mark.parametrize("margin", [1.2, 0.3, None])
def test_batch_hard_triplet_matches_loops(margin: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    torch.testing.assert_close(BatchHardTripletLoss(margin)(x, y), naive_batch_hard(x, y, margin))


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
        CrossEntropyLoss()(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(
        ValueError, match="features have dimension 5 but the centers were built with feature_dim=6"
    ):
        AttentionCenterLoss(3, 6)(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="margin must be >= 0 or None"):
        BatchHardTripletLoss(-1.0)
    with pytest.raises(ValueError, match="triplet_weight must be >= 0, got -2"):
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
