"""Tests of re_ranking_features / iter_re_ranking_features: the numbers of re_ranking on the
dense distance matrices of the same features, computed without any (N, N) matrix."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytest
import torch

from lagnet.evaluation import (
    evaluate_features,
    evaluate_rank,
    iter_re_ranking_features,
    pairwise_distance,
    re_ranking,
    re_ranking_features,
)
from lagnet.evaluation._kreciprocal_torch import smallest_stable

Metric = Literal["euclidean", "sqeuclidean", "cosine"]


def dense(qf: torch.Tensor, gf: torch.Tensor, metric: Metric = "euclidean", **kw: Any) -> Any:
    return re_ranking(
        pairwise_distance(qf, gf, metric=metric),
        pairwise_distance(qf, qf, metric=metric),
        pairwise_distance(gf, gf, metric=metric),
        **kw,
    )


def from_features(qf: torch.Tensor, gf: torch.Tensor, **kw: Any) -> torch.Tensor:
    return torch.cat([block for _, block in iter_re_ranking_features(qf, gf, **kw)])


def clustered(
    nq: int, ng: int, dim: int, num_ids: int, seed: int, spread: float = 0.7
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=g)
    q_ids = torch.randint(0, num_ids, (nq,), generator=g)
    g_ids = torch.randint(0, num_ids, (ng,), generator=g)
    qf = centres[q_ids] + spread * torch.randn(nq, dim, generator=g)
    gf = centres[g_ids] + spread * torch.randn(ng, dim, generator=g)
    return qf, gf


@pytest.mark.parametrize(
    ("nq", "ng", "dim", "kind", "k1", "k2", "lam"),
    [
        (1, 25, 4, "random", 20, 6, 0.3),
        (30, 80, 16, "random", 20, 6, 0.3),
        (70, 330, 32, "random", 9, 1, 0.0),
        (40, 260, 8, "clustered", 20, 6, 0.3),  # about 4 images per id: k1 > class size
        (300, 700, 24, "clustered", 20, 6, 0.3),
        (50, 120, 6, "clustered", 5, 10, 1.0),
    ],
)
def test_equals_dense_re_ranking(
    nq: int, ng: int, dim: int, kind: str, k1: int, k2: int, lam: float
) -> None:
    if kind == "random":
        g = torch.Generator().manual_seed(nq + ng)
        qf, gf = torch.randn(nq, dim, generator=g), torch.randn(ng, dim, generator=g)
    else:
        qf, gf = clustered(nq, ng, dim, max(2, (nq + ng) // 4), seed=nq)
    kw: dict[str, Any] = {"k1": k1, "k2": k2, "lambda_value": lam}
    expected = dense(qf, gf, **kw)
    got = from_features(qf, gf, **kw)
    assert got.dtype == torch.float32 and got.shape == (nq, ng)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_other_metrics_and_float64(metric: Metric) -> None:
    qf, gf = clustered(35, 150, 12, 30, seed=3)
    expected = dense(qf, gf, metric, k1=10, k2=4)
    torch.testing.assert_close(
        from_features(qf, gf, metric=metric, k1=10, k2=4), expected, rtol=0, atol=1e-5
    )
    expected64 = dense(qf.double(), gf.double(), metric, k1=10, k2=4)
    got64 = from_features(qf.double(), gf.double(), metric=metric, k1=10, k2=4)
    torch.testing.assert_close(got64, expected64, rtol=0, atol=1e-5)


def test_exact_ties_are_broken_like_the_dense_method() -> None:
    """Integer features: every distance is exact in float32, so duplicated images give exactly
    tied distances in both methods; the neighbour lists must break them by index."""
    g = torch.Generator().manual_seed(7)
    base = torch.randint(0, 4, (40, 6), generator=g).float()
    qf = base[torch.randint(0, 40, (30,), generator=g)]
    gf = torch.cat([base, base[torch.randint(0, 40, (60,), generator=g)]])  # duplicates
    for k1, k2 in ((20, 6), (7, 3), (3, 1)):
        expected = dense(qf, gf, k1=k1, k2=k2)
        got = from_features(qf, gf, k1=k1, k2=k2)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_chunks_and_row_blocks_do_not_change_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    qf, gf = clustered(600, 300, 8, 60, seed=5)
    whole = from_features(qf, gf, chunk_size=10_000)
    for chunk in (1, 256, 300):
        assert torch.equal(from_features(qf, gf, chunk_size=chunk), whole)
    monkeypatch.setattr("lagnet.evaluation._shared.BLOCK_ELEMENTS", 2000)  # tiny blocks
    assert torch.equal(from_features(qf, gf), whole)


def test_top_k() -> None:
    qf, gf = clustered(20, 90, 8, 20, seed=9)
    full = dense(qf, gf, k1=8, k2=3)
    values, indices = re_ranking_features(qf, gf, k1=8, k2=3, top_k=10)
    assert values.shape == indices.shape == (20, 10) and indices.dtype == torch.int64
    torch.testing.assert_close(values, full.gather(1, indices), rtol=0, atol=1e-6)
    assert torch.all(values[:, 1:] >= values[:, :-1])
    expected_values = torch.sort(full, dim=1).values[:, :10]
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-5)
    all_values, all_indices = re_ranking_features(qf, gf, k1=8, k2=3, top_k=None)
    assert all_values.shape == (20, 90)
    assert torch.equal(torch.sort(all_indices, dim=1).values, torch.arange(90).expand(20, 90))
    big_values, _ = re_ranking_features(qf, gf, k1=8, k2=3, top_k=500)  # capped at G
    assert big_values.shape == (20, 90)


def test_smallest_stable_breaks_ties_by_index() -> None:
    values = torch.tensor([[3.0, 1.0, 2.0, 1.0, 1.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    assert smallest_stable(values, 3).tolist() == [[5, 1, 3], [0, 1, 2]]
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 5, (50, 200), generator=g).float()
    expected = torch.sort(ties, dim=1, stable=True).indices[:, :21]
    assert torch.equal(smallest_stable(ties, 21), expected)


def test_evaluate_features_rerank_equals_dense_evaluation() -> None:
    g = torch.Generator().manual_seed(4)
    qf, gf = clustered(280, 500, 16, 60, seed=4, spread=1.0)
    q_pids = torch.randint(0, 50, (280,), generator=g)
    g_pids = torch.randint(0, 50, (500,), generator=g)
    q_cams, g_cams = (
        torch.randint(0, 3, (280,), generator=g),
        torch.randint(0, 3, (500,), generator=g),
    )
    ids = (q_pids, g_pids, q_cams, g_cams)
    res = evaluate_features(qf, gf, *ids, rerank=True, chunk_size=256)
    ref = evaluate_rank(dense(qf, gf), *ids)
    assert res.num_valid_queries == ref.num_valid_queries
    assert abs(res.mAP - ref.mAP) < 1e-9
    np.testing.assert_allclose(res.cmc, ref.cmc, atol=1e-12)


def test_bad_input() -> None:
    qf, gf = clustered(5, 12, 4, 3, seed=1)
    bad = gf.clone()
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"gallery_features contains inf \(first in row 3\)"):
        re_ranking_features(qf, bad, k1=5)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"gallery_features contains NaN \(first in row 3\)"):
        re_ranking_features(qf, bad, k1=5)
    with pytest.raises(ValueError, match=r"k1=13 is larger than the gallery \(12 items"):
        re_ranking_features(qf, gf, k1=13)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        re_ranking_features(qf, gf, k1=5, top_k=0)
    with pytest.raises(ValueError, match=r"feature dimensions differ"):
        re_ranking_features(qf[:, :3], gf, k1=5)
    with pytest.raises(TypeError, match="query_features must be a torch.Tensor"):
        re_ranking_features(qf.numpy(), gf, k1=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at distance 0 from every item"):
        re_ranking_features(torch.ones(2, 4), torch.ones(6, 4), k1=3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu() -> None:
    qf, gf = clustered(300, 700, 24, 150, seed=2)
    cpu = from_features(qf, gf)
    blocks = list(iter_re_ranking_features(qf.cuda(), gf.cuda()))
    assert all(block.device.type == "cuda" for _, block in blocks)
    torch.testing.assert_close(torch.cat([b for _, b in blocks]).cpu(), cpu, rtol=0, atol=1e-5)
    moved = from_features(qf, gf, device="cuda")
    torch.testing.assert_close(moved.cpu(), cpu, rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(4)
    ids = (
        torch.randint(0, 150, (300,), generator=g),
        torch.randint(0, 150, (700,), generator=g),
        torch.randint(0, 3, (300,), generator=g),
        torch.randint(0, 3, (700,), generator=g),
    )
    on_gpu = evaluate_features(qf.cuda(), gf.cuda(), *ids, rerank=True)
    on_cpu = evaluate_features(qf, gf, *ids, rerank=True)
    assert abs(on_gpu.mAP - on_cpu.mAP) < 1e-6
