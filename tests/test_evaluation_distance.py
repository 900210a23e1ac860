"""Tests of pairwise_distance and evaluate_features."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytest
import torch

from lagnet.evaluation import (
    RankResult,
    evaluate_features,
    evaluate_rank,
    pairwise_distance,
    re_ranking,
)


def features(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_results_identical(a: RankResult, b: RankResult) -> None:
    assert a.mAP == b.mAP
    assert a.mINP == b.mINP
    assert a.num_valid_queries == b.num_valid_queries
    assert a.cmc_padded == b.cmc_padded
    np.testing.assert_array_equal(a.cmc, b.cmc)
    np.testing.assert_array_equal(a.ap, b.ap)
    np.testing.assert_array_equal(a.inp, b.inp)


# ------------------------------------------------------------------ pairwise_distance


def test_metrics_match_explicit_formulas() -> None:
    x, y = features(7, 5, 0), features(9, 5, 1)
    diff = x[:, None, :] - y[None, :, :]
    sq = (diff**2).sum(-1)
    torch.testing.assert_close(pairwise_distance(x, y, metric="sqeuclidean"), sq)
    torch.testing.assert_close(pairwise_distance(x, y), sq.sqrt())
    torch.testing.assert_close(pairwise_distance(x, y, metric="euclidean"), sq.sqrt())
    cos = (x[:, None, :] * y[None, :, :]).sum(-1) / (x.norm(dim=1)[:, None] * y.norm(dim=1))
    torch.testing.assert_close(pairwise_distance(x, y, metric="cosine"), 1 - cos)


def test_float32_and_half_inputs() -> None:
    x, y = features(6, 4, 2, torch.float32), features(5, 4, 3, torch.float32)
    out = pairwise_distance(x, y)
    assert out.dtype == torch.float32 and out.shape == (6, 5)
    torch.testing.assert_close(out, torch.cdist(x.double(), y.double()).float())
    half = pairwise_distance(x.half(), y.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.cdist(x.half().float(), y.half().float()))
    mixed = pairwise_distance(x, y.double())
    assert mixed.dtype == torch.float64


def test_self_distance_is_exactly_zero_and_not_negative() -> None:
    x = features(20, 3, 4, torch.float32) * 1000
    d = pairwise_distance(x, x, metric="sqeuclidean")
    assert (d >= 0).all()
    e = pairwise_distance(x, x)
    assert not torch.isnan(e).any()


def test_cosine_of_zero_vector_is_one() -> None:
    x = torch.zeros(1, 3)
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    torch.testing.assert_close(pairwise_distance(x, y, metric="cosine"), torch.ones(1, 2))


def test_chunk_size() -> None:
    x, y = features(70, 6, 5, torch.float32), features(30, 6, 6, torch.float32)
    full = pairwise_distance(x, y)
    for chunk in (1, 7, 64, 1000):
        torch.testing.assert_close(pairwise_distance(x, y, chunk_size=chunk), full)
    assert torch.equal(pairwise_distance(x, y, chunk_size=256), full)  # default blocking
    assert torch.equal(pairwise_distance(x, y, chunk_size=5), pairwise_distance(x, y, chunk_size=5))


def test_no_autograd_and_empty() -> None:
    x = features(3, 2, 7).requires_grad_()
    out = pairwise_distance(x, features(4, 2, 8))
    assert not out.requires_grad
    assert pairwise_distance(torch.zeros(0, 2), torch.zeros(3, 2)).shape == (0, 3)


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "error", "pattern"),
    [
        (
            torch.zeros(2, 3),
            torch.zeros(4, 5),
            {},
            ValueError,
            r"dimensions differ.*\(2, 3\).*\(4, 5\)",
        ),
        (torch.zeros(3), torch.zeros(4, 3), {}, ValueError, r"x must be 2-D.*\(3,\)"),
        (torch.zeros(2, 3), torch.zeros(4, 3, 1), {}, ValueError, r"y must be 2-D"),
        (np.zeros((2, 3)), torch.zeros(4, 3), {}, TypeError, "x must be a torch.Tensor"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 3), {}, TypeError, "floating"),
        (
            torch.zeros(2, 3),
            torch.zeros(4, 3),
            {"metric": "l1"},
            ValueError,
            r"metric must be one of .*, got 'l1'",
        ),
        (torch.zeros(2, 3), torch.zeros(4, 3), {"chunk_size": 0}, ValueError, "chunk_size must"),
    ],
)
def test_pairwise_bad_input(
    x: Any, y: Any, kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        pairwise_distance(x, y, **kwargs)


# ------------------------------------------------------------------ evaluate_features


def reid_problem(nq: int, ng: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n_ids = 25
    centres = torch.randn(n_ids + 1, dim, generator=g)
    q_pids = torch.randint(1, n_ids + 1, (nq,), generator=g)
    g_pids = torch.randint(0, n_ids + 1, (ng,), generator=g)
    qf = centres[q_pids] + 0.8 * torch.randn(nq, dim, generator=g)
    gf = centres[g_pids] + 0.8 * torch.randn(ng, dim, generator=g)
    q_cams = torch.randint(0, 4, (nq,), generator=g)
    g_cams = torch.randint(0, 4, (ng,), generator=g)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_chunked_equals_unchunked(metric: Literal["euclidean", "sqeuclidean", "cosine"]) -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = reid_problem(600, 400, 16, 0)
    qf, gf = qf.float(), gf.float()
    args = (qf, gf, q_pids, g_pids, q_cams, g_cams)
    whole = evaluate_rank(pairwise_distance(qf, gf, metric=metric), *args[2:], max_rank=20)
    assert 0.2 < whole.mAP < 0.95  # a non-trivial problem
    for chunk in (None, 1, 256, 300, 10_000):
        res = evaluate_features(*args, metric=metric, max_rank=20, chunk_size=chunk)
        assert_results_identical(res, whole)


def test_cuhk03_mode_does_not_depend_on_chunk_size() -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = reid_problem(520, 300, 8, 1)
    args = (qf, gf, q_pids, g_pids, q_cams, g_cams)
    a = evaluate_features(*args, cmc_mode="cuhk03", num_repeats=3, chunk_size=256, seed=4)
    b = evaluate_features(*args, cmc_mode="cuhk03", num_repeats=3, chunk_size=1024, seed=4)
    assert_results_identical(a, b)
    c = evaluate_rank(
        pairwise_distance(qf, gf),
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        cmc_mode="cuhk03",
        num_repeats=3,
        seed=4,
    )
    assert_results_identical(a, c)


def test_rerank_option() -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = reid_problem(30, 80, 8, 2)
    args = (qf, gf, q_pids, g_pids, q_cams, g_cams)
    res = evaluate_features(*args, rerank=True, k1=6, k2=3, lambda_value=0.2, max_rank=10)
    dist = re_ranking(
        pairwise_distance(qf, gf),
        pairwise_distance(qf, qf),
        pairwise_distance(gf, gf),
        k1=6,
        k2=3,
        lambda_value=0.2,
    )
    assert_results_identical(res, evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10))
    plain = evaluate_features(*args, max_rank=10)
    assert res.mAP != plain.mAP
    with pytest.raises(ValueError, match="k1=100 is larger than the gallery"):
        evaluate_features(*args, rerank=True, k1=100)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (
            {"query_features": torch.zeros(3, 7)},
            ValueError,
            r"dimensions differ.*\(3, 7\).*\(5, 4\)",
        ),
        ({"query_features": torch.zeros(0, 4)}, ValueError, "empty query set"),
        ({"gallery_features": torch.zeros(0, 4)}, ValueError, "empty gallery"),
        ({"query_features": torch.zeros(3)}, ValueError, "query_features must be 2-D"),
        ({"gallery_features": np.zeros((5, 4))}, TypeError, "gallery_features must be a torch"),
        ({"metric": "manhattan"}, ValueError, r"metric must be one of .*, got 'manhattan'"),
        ({"q_pids": [1, 2]}, ValueError, "q_pids has length 2, expected 3"),
        ({"g_camids": [0] * 6}, ValueError, "g_camids has length 6, expected 5"),
        ({"max_rank": 0}, ValueError, "max_rank must be >= 1"),
        ({"chunk_size": -1}, ValueError, "chunk_size must be >= 1"),
    ],
)
def test_evaluate_features_bad_input(
    change: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    args: dict[str, Any] = {
        "query_features": torch.randn(3, 4),
        "gallery_features": torch.randn(5, 4),
        "q_pids": [1, 2, 3],
        "g_pids": [1, 2, 3, 1, 2],
        "q_camids": [0, 0, 0],
        "g_camids": [1, 1, 1, 1, 1],
    }
    args.update(change)
    with pytest.raises(error, match=pattern):
        evaluate_features(**args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features() -> None:
    qf, gf, q_pids, g_pids, q_cams, g_cams = reid_problem(600, 400, 16, 3)
    qf, gf = qf.float().cuda(), gf.float().cuda()
    dist = pairwise_distance(qf, gf)
    assert dist.device.type == "cuda"
    torch.testing.assert_close(dist.cpu(), pairwise_distance(qf.cpu(), gf.cpu()))
    whole = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    for chunk in (256, None):
        res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk)
        assert_results_identical(res, whole)


@pytest.mark.parametrize("rerank", [False, True])
def test_evaluate_features_names_inf_and_nan_features(rerank: bool) -> None:
    """An inf feature gives inf - inf = NaN distances; the error names the feature, not NaN."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = reid_problem(6, 30, 4, 5)
    bad = qf.clone()
    bad[2, 1] = float("inf")
    ids = (q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match=r"query_features contains inf \(first in row 2\)"):
        evaluate_features(bad, gf, *ids, rerank=rerank, k1=5)
    bad = gf.clone()
    bad[7, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"gallery_features contains inf \(first in row 7\)"):
        evaluate_features(qf, bad, *ids, rerank=rerank, k1=5)
    bad[7, 0] = float("nan")
    with pytest.raises(ValueError, match=r"gallery_features contains NaN \(first in row 7\)"):
        evaluate_features(qf, bad, *ids, rerank=rerank, k1=5)
