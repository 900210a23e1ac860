"""Tests of evaluate_rank (NumPy and torch paths) against the plain protocol of
lagnet.evaluation.protocol, RankResult and mean_average_precision."""

from __future__ import annotations

import itertools
from dataclasses import FrozenInstanceError
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lagnet.evaluation import RankResult, evaluate_rank, mean_average_precision
from lagnet.evaluation._accumulate import make_accumulator
from lagnet.evaluation.protocol import evaluate_rank_reference


def reference_eval(
    distmat: npt.NDArray[Any],
    q_pids: npt.NDArray[Any],
    g_pids: npt.NDArray[Any],
    q_camids: npt.NDArray[Any],
    g_camids: npt.NDArray[Any],
    max_rank: int = 50,
    **kwargs: Any,
) -> dict[str, Any]:
    """The plain per-query protocol (lagnet.evaluation.protocol) as a dict; num_valid 0 when
    no query has a match."""
    try:
        res = evaluate_rank_reference(
            distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, **kwargs
        )
    except ValueError as error:
        assert "no query has a valid match" in str(error)
        return {"num_valid": 0}
    return {
        "num_valid": res.num_valid_queries,
        "ap": res.ap,
        "inp": res.inp,
        "mAP": res.mAP,
        "mINP": res.mINP,
        "cmc": res.cmc,
    }


def assert_same(result: RankResult, ref: dict[str, Any]) -> None:
    assert result.num_valid_queries == ref["num_valid"]
    assert result.mAP == ref["mAP"]
    assert result.mINP == ref["mINP"]
    np.testing.assert_array_equal(result.cmc, ref["cmc"])
    np.testing.assert_array_equal(result.ap, ref["ap"])
    np.testing.assert_array_equal(result.inp, ref["inp"])


def ids(*values: int) -> npt.NDArray[np.int64]:
    return np.array(values, dtype=np.int64)


# ------------------------------------------------------------------ hand-computed cases


def test_only_match_at_rank_two() -> None:
    dist = np.array([[0.1, 0.2, 0.3]])
    res = evaluate_rank(dist, ids(1), ids(2, 1, 3), ids(0), ids(1, 1, 1), max_rank=3)
    assert res.mAP == 0.5
    assert res.mINP == 0.5
    np.testing.assert_array_equal(res.cmc, [0.0, 1.0, 1.0])
    assert res.rank1 == 0.0
    assert res.num_valid_queries == 1
    assert not res.cmc_padded


def test_average_precision_and_inp_two_matches() -> None:
    # matches at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2, INP = 2 / 3
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    res = evaluate_rank(dist, ids(7), ids(7, 3, 7, 4), ids(0), ids(1, 1, 2, 1), max_rank=4)
    assert res.mAP == pytest.approx((1.0 + 2.0 / 3.0) / 2.0, abs=1e-15)
    assert res.mINP == pytest.approx(2.0 / 3.0, abs=1e-15)
    np.testing.assert_array_equal(res.cmc, [1.0, 1.0, 1.0, 1.0])


def test_same_camera_matches_are_removed_and_query_skipped() -> None:
    dist = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    q_pids, g_pids = ids(1, 2), ids(1, 2, 1)
    q_cams, g_cams = ids(0, 0), ids(0, 1, 0)
    res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    # query 0: both id-1 gallery images share its camera -> skipped
    assert np.isnan(res.ap[0]) and np.isnan(res.inp[0])
    assert res.num_valid_queries == 1
    # query 1: its match (gallery 1) ranks second among all three (nothing removed)
    assert res.ap[1] == 0.5
    assert res.mAP == 0.5


def test_removed_items_do_not_count_in_ranks() -> None:
    # gallery 0 (same id, same camera) is removed, so the match at gallery 1 is rank 1
    dist = np.array([[0.1, 0.2, 0.3]])
    res = evaluate_rank(dist, ids(1), ids(1, 1, 2), ids(0), ids(0, 1, 1), max_rank=2)
    assert res.mAP == 1.0
    np.testing.assert_array_equal(res.cmc, [1.0, 1.0])


def test_ties_are_broken_by_gallery_index() -> None:
    dist = np.ones((1, 3))
    res = evaluate_rank(dist, ids(1), ids(2, 1, 3), ids(0), ids(1, 1, 1), max_rank=3)
    assert res.mAP == 0.5  # the match (index 1) comes after index 0
    res = evaluate_rank(dist, ids(1), ids(1, 2, 3), ids(0), ids(1, 1, 1), max_rank=3)
    assert res.mAP == 1.0  # the match (index 0) comes first
    # equal distances do not tie with smaller ones: index 2 at 0.5 is first
    dist = np.array([[1.0, 1.0, 0.5]])
    res = evaluate_rank(dist, ids(1), ids(1, 2, 3), ids(0), ids(1, 1, 1), max_rank=3)
    assert res.mAP == 0.5


def test_negative_zero_ties_with_zero() -> None:
    dist = np.array([[0.0, -0.0, 1.0]])
    res = evaluate_rank(dist, ids(1), ids(2, 1, 3), ids(0), ids(1, 1, 1), max_rank=3)
    assert res.mAP == 0.5


def test_distractors_with_pid_zero_are_non_matches() -> None:
    dist = np.array([[0.1, 0.2, 0.3]])
    res = evaluate_rank(dist, ids(4), ids(0, 4, 0), ids(0), ids(1, 1, 1), max_rank=3)
    assert res.mAP == 0.5
    assert res.mINP == 0.5


def test_small_gallery_pads_cmc() -> None:
    dist = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    res = evaluate_rank(dist, ids(1, 2), ids(1, 2, 3, 4), ids(0, 0), ids(1, 1, 1, 1))
    assert res.cmc.shape == (50,)
    assert res.cmc_padded
    # query 0's match is rank 4, query 1's rank 2
    np.testing.assert_array_equal(res.cmc[:4], [0.0, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(res.cmc[4:], np.ones(46))
    exact = evaluate_rank(dist, ids(1, 2), ids(1, 2, 3, 4), ids(0, 0), ids(1, 1, 1, 1), max_rank=4)
    assert not exact.cmc_padded


def test_infinite_distances() -> None:
    dist = np.array([[np.inf, 0.5, np.inf, -np.inf]])
    res = evaluate_rank(dist, ids(1), ids(2, 3, 1, 4), ids(0), ids(1, 1, 1, 1), max_rank=4)
    # order: 3 (-inf), 1, 0 (inf, lower index), 2 (inf) -> match at rank 4
    assert res.mAP == 0.25


def test_result_is_frozen_and_read_only() -> None:
    res = evaluate_rank(np.array([[0.1, 0.2]]), ids(1), ids(1, 2), ids(0), ids(1, 1), max_rank=2)
    with pytest.raises(FrozenInstanceError):
        res.mAP = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        res.cmc[0] = 0.0
    assert "mAP=1.0000" in repr(res)


# ------------------------------------------------------------------ property tests


@st.composite
def rank_problems(draw: st.DrawFn) -> tuple[npt.NDArray[Any], ...]:
    nq = draw(st.integers(1, 6))
    ng = draw(st.integers(1, 24))
    n_ids = draw(st.integers(0, 4))
    n_cams = draw(st.integers(1, 3))
    q_pids = draw(hnp.arrays(np.int64, nq, elements=st.integers(0, n_ids)))
    g_pids = draw(hnp.arrays(np.int64, ng, elements=st.integers(0, n_ids)))
    q_cams = draw(hnp.arrays(np.int64, nq, elements=st.integers(0, n_cams - 1)))
    g_cams = draw(hnp.arrays(np.int64, ng, elements=st.integers(0, n_cams - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int64]))
    if draw(st.booleans()):  # small integer values: many ties
        dist = draw(hnp.arrays(np.int64, (nq, ng), elements=st.integers(0, 3))).astype(dtype)
    else:
        dist = draw(
            hnp.arrays(np.float64, (nq, ng), elements=st.floats(-10, 10, allow_nan=False))
        ).astype(dtype if dtype != np.int64 else np.float64)
    return dist, q_pids, g_pids, q_cams, g_cams


@settings(max_examples=60, deadline=None)
@given(problem=rank_problems(), max_rank=st.integers(1, 30))
def test_matches_reference(problem: tuple[npt.NDArray[Any], ...], max_rank: int) -> None:
    dist, q_pids, g_pids, q_cams, g_cams = problem
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, max_rank)
    if ref["num_valid"] == 0:
        with pytest.raises(ValueError, match="no query has a valid match"):
            evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
        return
    res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    assert_same(res, ref)
    assert res.cmc_padded == (max_rank > dist.shape[1])
    # torch input gives the very same numbers
    res_t = evaluate_rank(
        torch.from_numpy(dist),
        torch.from_numpy(q_pids),
        torch.from_numpy(g_pids),
        torch.from_numpy(q_cams),
        torch.from_numpy(g_cams),
        max_rank=max_rank,
    )
    assert_same(res_t, ref)


def make_market_like(
    nq: int, ng: int, n_ids: int, seed: int, spread: float = 1.0
) -> tuple[npt.NDArray[Any], ...]:
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, n_ids + 1, nq)
    g_pids = rng.integers(0, n_ids + 1, ng)  # 0: distractors
    centres = rng.normal(size=(n_ids + 1, 8))
    qf = centres[q_pids] + spread * rng.normal(size=(nq, 8))
    gf = centres[g_pids] + spread * rng.normal(size=(ng, 8))
    dist = np.sqrt(((qf[:, None] - gf[None]) ** 2).sum(-1)).astype(np.float32)
    return dist, q_pids, g_pids, rng.integers(0, 4, nq), rng.integers(0, 4, ng)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_larger_problem(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    dist, q_pids, g_pids, q_cams, g_cams = make_market_like(300, 700, 40, seed)
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 20)
    assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20), ref)
    # tiny internal blocks (many block boundaries) give the same result
    monkeypatch.setattr("lagnet.evaluation._shared.BLOCK_ELEMENTS", 1500)
    assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20), ref)


@pytest.mark.parametrize("kind", ["uniform", "integers"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_where_most_items_precede_a_match(
    kind: str, dtype: type[np.floating[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unstructured distances: the last match is deep in most rows, which takes the
    bucket path; integer values add ties."""
    import lagnet.evaluation._fast_rank as fast

    calls = []
    original = fast._ranks_by_buckets

    def counting(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fast, "_ranks_by_buckets", counting)
    rng = np.random.default_rng(9)
    dist = rng.random((150, 400)) if kind == "uniform" else rng.integers(0, 50, (150, 400))
    dist = dist.astype(dtype)
    q_pids, g_pids = rng.integers(0, 12, 150), rng.integers(0, 12, 400)
    q_cams, g_cams = rng.integers(0, 3, 150), rng.integers(0, 3, 400)
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 30)
    assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=30), ref)
    assert calls


SPECIAL_DISTANCES = np.array([-np.inf, -1e30, -1.0, -0.0, 0.0, 1e-40, 0.5, 1.0, 1e30, np.inf])


@st.composite
def deep_match_problems(draw: st.DrawFn) -> tuple[npt.NDArray[Any], ...]:
    """Problems whose matches tend to sit deep in the ranking (the bucket path's case), with
    distractors (id 0), same-camera items to remove, and values that tie or are extreme."""
    nq = draw(st.integers(1, 8))
    ng = draw(st.integers(1, 60))
    n_ids = draw(st.integers(1, 4))
    n_cams = draw(st.integers(1, 3))
    q_pids = draw(hnp.arrays(np.int64, nq, elements=st.integers(0, n_ids)))
    g_pids = draw(hnp.arrays(np.int64, ng, elements=st.integers(0, n_ids)))
    q_cams = draw(hnp.arrays(np.int64, nq, elements=st.integers(0, n_cams - 1)))
    g_cams = draw(hnp.arrays(np.int64, ng, elements=st.integers(0, n_cams - 1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["uniform", "integers", "special", "one_value", "far"]))
    if kind == "uniform":
        dist = rng.random((nq, ng))
    elif kind == "integers":  # many exact ties between matches and other items
        dist = rng.integers(0, draw(st.integers(1, 5)), (nq, ng)).astype(np.float64)
    elif kind == "special":
        dist = rng.choice(SPECIAL_DISTANCES, (nq, ng))
    elif kind == "one_value":  # every match of a row at one distance (zero span)
        dist = rng.random((nq, ng))
        dist[g_pids[None, :] == q_pids[:, None]] = 0.75
    else:  # values far from zero relative to their spread
        dist = 1e6 + rng.random((nq, ng))
    if draw(st.booleans()):  # push the matches to the end of the ranking
        dist = np.where(g_pids[None, :] == q_pids[:, None], dist + 1.0, dist)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return dist.astype(dtype), q_pids, g_pids, q_cams, g_cams


@settings(max_examples=80, deadline=None)
@given(
    problem=deep_match_problems(),
    max_buckets=st.sampled_from([64, 128, 8192]),
    chunk_elements=st.sampled_from([1, 40, 1 << 18]),
)
def test_bucket_path_matches_reference(
    problem: tuple[npt.NDArray[Any], ...], max_buckets: int, chunk_elements: int
) -> None:
    """Every row with a match goes through the bucket path (few buckets, small chunks)."""
    import lagnet.evaluation._fast_rank as fast

    dist, q_pids, g_pids, q_cams, g_cams = problem
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 10)
    if ref["num_valid"] == 0:
        return
    calls = []
    original = fast._ranks_by_buckets

    def counting(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast, "_ranks_by_buckets", counting)
        mp.setattr(fast, "_DEEP_DIVISOR", 10**9)  # any row with a candidate
        mp.setattr(fast, "_MAX_BUCKETS", max_buckets)
        mp.setattr(fast, "_CHUNK_ELEMENTS", chunk_elements)
        res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert calls
    assert_same(res, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bucket_path_on_mixed_rows(
    dtype: type[np.floating[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deep rows (bucket path, in several chunks of non-adjacent rows) next to shallow rows
    (sorted candidates) in the same blocks, with ties, a single match per row and -0.0."""
    import lagnet.evaluation._fast_rank as fast

    rng = np.random.default_rng(4)
    nq, ng = 120, 3000
    q_pids, g_pids = rng.integers(1, 40, nq), rng.integers(0, 40, ng)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    # id 99: one image in camera 0 (removed for its queries) and one in camera 1, their match
    g_pids[:2], g_cams[:2] = 99, [0, 1]
    q_pids[::7], q_cams[::7] = 99, 0
    dist = rng.random((nq, ng))
    dist[::3] = np.round(dist[::3], 2)  # ties
    dist[1::3] = rng.choice(np.array([-0.5, -0.0, 0.0, 0.5]), (len(dist[1::3]), ng))
    same = g_pids[None, :] == q_pids[:, None]
    shallow = rng.random(nq) < 0.5
    dist[shallow] = np.where(same[shallow], dist[shallow] - 2.0, dist[shallow])
    dist = dist.astype(dtype)
    calls = []
    original = fast._ranks_by_buckets

    def counting(*args: Any) -> Any:
        calls.append(args[1].size)
        return original(*args)

    monkeypatch.setattr(fast, "_ranks_by_buckets", counting)
    monkeypatch.setattr(fast, "_CHUNK_ELEMENTS", 5 * ng)
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 25)
    assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=25), ref)
    assert 10 < sum(calls) < nq  # both paths were used


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64, np.int32, np.int8])
def test_integer_distances(dtype: type[np.integer[Any]]) -> None:
    rng = np.random.default_rng(2)
    info = np.iinfo(dtype)
    # values at both ends of the dtype's range, with ties
    choices = np.array([info.min, info.min + 1, info.max // 2, info.max - 1, info.max], dtype)
    dist = choices[rng.integers(0, 5, (30, 80))]
    q_pids, g_pids = rng.integers(0, 6, 30), rng.integers(0, 6, 80)
    q_cams, g_cams = rng.integers(0, 2, 30), rng.integers(0, 2, 80)
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 20)
    assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20), ref)


def test_half_precision_and_non_contiguous_inputs() -> None:
    dist, q_pids, g_pids, q_cams, g_cams = make_market_like(40, 90, 6, 3)
    dist16 = dist.astype(np.float16)
    ref = reference_eval(dist16.astype(np.float32), q_pids, g_pids, q_cams, g_cams, 10)
    assert_same(evaluate_rank(dist16, q_pids, g_pids, q_cams, g_cams, max_rank=10), ref)
    t16 = torch.from_numpy(dist16)
    assert_same(evaluate_rank(t16, q_pids, g_pids, q_cams, g_cams, max_rank=10), ref)
    bf16 = torch.from_numpy(dist).to(torch.bfloat16)
    ref_bf = reference_eval(bf16.float().numpy(), q_pids, g_pids, q_cams, g_cams, 10)
    assert_same(evaluate_rank(bf16, q_pids, g_pids, q_cams, g_cams, max_rank=10), ref_bf)
    wide = np.zeros((40, 180), dtype=np.float32)
    wide[:, ::2] = dist
    ref32 = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 10)
    assert_same(evaluate_rank(wide[:, ::2], q_pids, g_pids, q_cams, g_cams, max_rank=10), ref32)


# ------------------------------------------------------------------ mean_average_precision


def ranked_matches(
    dist: npt.NDArray[Any],
    q_pids: npt.NDArray[Any],
    g_pids: npt.NDArray[Any],
    q_cams: npt.NDArray[Any],
    g_cams: npt.NDArray[Any],
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    order = np.argsort(dist, axis=1, kind="stable")
    same_pid = g_pids[order] == q_pids[:, None]
    keep = ~(same_pid & (g_cams[order] == q_cams[:, None]))
    return same_pid, keep


def test_mean_average_precision_equals_evaluate_rank() -> None:
    dist, q_pids, g_pids, q_cams, g_cams = make_market_like(120, 300, 15, 4)
    matches, keep = ranked_matches(dist, q_pids, g_pids, q_cams, g_cams)
    expected = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams).mAP
    assert mean_average_precision(matches, keep=keep) == expected
    assert mean_average_precision(torch.from_numpy(matches), keep=torch.from_numpy(keep)) == (
        expected
    )
    # without the same-camera removal it is a different (higher) number
    assert mean_average_precision(matches & keep) != expected


def test_mean_average_precision_hand_cases() -> None:
    assert mean_average_precision(np.array([[0, 1, 0]])) == 0.5
    assert mean_average_precision(np.array([[1, 0, 1], [0, 0, 0]])) == pytest.approx(
        (1 + 2 / 3) / 2, abs=1e-15
    )
    keep = np.array([[False, True, True]])
    assert mean_average_precision(np.array([[True, False, True]]), keep=keep) == 0.5


def test_mean_average_precision_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        mean_average_precision(np.array([True, False]))
    with pytest.raises(ValueError, match="no query has a correct match"):
        mean_average_precision(np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="keep has shape"):
        mean_average_precision(np.ones((2, 3), dtype=bool), keep=np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="only contain 0 and 1"):
        mean_average_precision(np.array([[0, 2]]))
    with pytest.raises(TypeError, match="boolean or 0/1 integers"):
        mean_average_precision(np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="empty query set"):
        mean_average_precision(np.zeros((0, 3), dtype=bool))


# ------------------------------------------------------------------ CUHK03 single-shot CMC


def test_cuhk03_equals_market_with_one_image_per_identity() -> None:
    rng = np.random.default_rng(5)
    g_pids = rng.permutation(30)  # one image per id
    q_pids = rng.integers(0, 30, 25)
    dist = rng.random((25, 30))
    q_cams, g_cams = np.zeros(25, np.int64), np.ones(30, np.int64)
    market = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    cuhk = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, cmc_mode="cuhk03")
    np.testing.assert_array_equal(cuhk.cmc, market.cmc)
    assert cuhk.mAP == market.mAP and cuhk.mINP == market.mINP
    assert cuhk.cmc_mode == "cuhk03"


def exact_cuhk03_cmc(
    dist: npt.NDArray[Any],
    q_pids: npt.NDArray[Any],
    g_pids: npt.NDArray[Any],
    q_cams: npt.NDArray[Any],
    g_cams: npt.NDArray[Any],
    max_rank: int,
) -> npt.NDArray[np.float64]:
    """Expected single-shot CMC, by enumerating every choice of one image per identity."""
    total = np.zeros(max_rank)
    num_valid = 0
    for q in range(len(q_pids)):
        valid = ~((g_pids == q_pids[q]) & (g_cams == q_cams[q]))
        groups = [np.flatnonzero(valid & (g_pids == p)) for p in np.unique(g_pids[valid])]
        if not np.any(valid & (g_pids == q_pids[q])):
            continue
        num_valid += 1
        choices = list(itertools.product(*groups))
        for chosen in choices:
            picked = np.array(chosen)
            order = picked[np.argsort(dist[q, picked], kind="stable")]
            first = int(np.flatnonzero(g_pids[order] == q_pids[q])[0])
            total[first:] += 1.0 / len(choices)
    return total / num_valid


def test_cuhk03_matches_exact_expectation() -> None:
    rng = np.random.default_rng(11)
    g_pids = np.array([1, 1, 1, 2, 2, 3, 3, 3, 4])
    g_cams = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0])
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 1, 0])
    dist = rng.random((3, 9))
    expected = exact_cuhk03_cmc(dist, q_pids, g_pids, q_cams, g_cams, 4)
    res = evaluate_rank(
        dist, q_pids, g_pids, q_cams, g_cams, max_rank=4, cmc_mode="cuhk03", num_repeats=4000
    )
    # 12,000 samples: standard error < 0.005
    np.testing.assert_allclose(res.cmc, expected, atol=0.025)
    assert not np.allclose(
        evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=4).cmc, expected, atol=0.05
    )
    assert res.cmc_padded is False
    padded = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=5, cmc_mode="cuhk03")
    assert padded.cmc_padded  # 4 gallery identities
    assert padded.cmc[-1] == 1.0


def test_cuhk03_is_seeded() -> None:
    dist, q_pids, g_pids, q_cams, g_cams = make_market_like(60, 200, 8, 6, spread=3.0)

    def run(**kwargs: Any) -> npt.NDArray[np.float64]:
        res = evaluate_rank(
            dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, cmc_mode="cuhk03", **kwargs
        )
        return res.cmc

    np.testing.assert_array_equal(run(), run())
    np.testing.assert_array_equal(run(seed=3), run(generator=torch.Generator().manual_seed(3)))
    assert not np.array_equal(run(seed=0), run(seed=1))
    market = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    cuhk = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, cmc_mode="cuhk03")
    assert cuhk.mAP == market.mAP and cuhk.mINP == market.mINP
    np.testing.assert_array_equal(cuhk.ap, market.ap)
    assert np.all(np.diff(cuhk.cmc) >= 0)


def test_cuhk03_does_not_depend_on_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    dist, q_pids, g_pids, q_cams, g_cams = make_market_like(50, 120, 6, 8, spread=3.0)
    kwargs: dict[str, Any] = {"max_rank": 10, "cmc_mode": "cuhk03", "num_repeats": 3}
    big = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, **kwargs)
    monkeypatch.setattr("lagnet.evaluation._shared.BLOCK_ELEMENTS", 250)
    small = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, **kwargs)
    np.testing.assert_array_equal(big.cmc, small.cmc)


# ------------------------------------------------------------------ bad input


def good_inputs() -> tuple[Any, ...]:
    return np.array([[0.1, 0.2]]), ids(1), ids(1, 2), ids(0), ids(1, 1)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"distmat": np.array([0.1, 0.2])}, ValueError, r"2-D.*shape \(2,\)"),
        ({"distmat": np.zeros((1, 2, 1))}, ValueError, r"2-D.*\(1, 2, 1\)"),
        ({"distmat": [[0.1, 0.2]]}, TypeError, "numpy array or torch tensor"),
        ({"distmat": np.array([[0.1, np.nan]])}, ValueError, r"NaN.*query 0, gallery 1"),
        ({"distmat": np.zeros((0, 2))}, ValueError, "empty query set"),
        ({"distmat": np.zeros((1, 0))}, ValueError, "empty gallery"),
        ({"distmat": np.array([[True, False]])}, TypeError, "real-valued"),
        ({"q_pids": ids(1, 2)}, ValueError, "q_pids has length 2, expected 1"),
        ({"g_pids": ids(1)}, ValueError, "g_pids has length 1, expected 2"),
        ({"q_camids": ids()}, ValueError, "q_camids has length 0, expected 1"),
        ({"g_camids": ids(1, 1, 1)}, ValueError, "g_camids has length 3, expected 2"),
        ({"g_pids": np.array([1.0, 2.0])}, TypeError, "g_pids must hold integers"),
        ({"q_pids": np.array([[1]])}, ValueError, r"q_pids must be 1-D, got shape \(1, 1\)"),
        ({"max_rank": 0}, ValueError, "max_rank must be >= 1, got 0"),
        ({"max_rank": -3}, ValueError, "max_rank must be >= 1, got -3"),
        ({"max_rank": 2.0}, TypeError, "max_rank must be an int"),
        (
            {"cmc_mode": "duke"},
            ValueError,
            r"cmc_mode must be one of \('market', 'cuhk03'\), got 'duke'",
        ),
        ({"num_repeats": 0}, ValueError, "num_repeats must be >= 1"),
        ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_input(change: dict[str, Any], error: type[Exception], pattern: str) -> None:
    dist, q_pids, g_pids, q_cams, g_cams = good_inputs()
    args: dict[str, Any] = {
        "distmat": dist,
        "q_pids": q_pids,
        "g_pids": g_pids,
        "q_camids": q_cams,
        "g_camids": g_cams,
    }
    args.update(change)
    with pytest.raises(error, match=pattern):
        evaluate_rank(**args)


def test_torch_nan_and_all_skipped() -> None:
    dist = torch.tensor([[0.1, float("nan")], [0.3, 0.4]])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(dist, ids(1, 1), ids(1, 2), ids(0, 0), ids(1, 1))
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(np.array([[0.1, 0.2]]), ids(1), ids(1, 2), ids(0), ids(0, 0))
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(np.array([[0.1, 0.2]]), ids(5), ids(1, 2), ids(0), ids(0, 0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors() -> None:
    dist, q_pids, g_pids, q_cams, g_cams = make_market_like(200, 500, 20, 12)
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 20)
    on_gpu = [torch.from_numpy(x).cuda() for x in (dist, q_pids, g_pids, q_cams, g_cams)]
    assert_same(evaluate_rank(*on_gpu, max_rank=20), ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cmc_mode", ["market", "cuhk03"])
def test_cuda_equals_cpu_with_ties(cmc_mode: str) -> None:
    """Ranked on the GPU (torch sort), the numbers are the CPU's bit for bit, ties included."""
    rng = np.random.default_rng(21)
    dist = rng.integers(0, 6, (300, 900)).astype(np.float32)  # many exact ties
    dist[::5] = -0.0
    q_pids, g_pids = rng.integers(0, 30, 300), rng.integers(0, 30, 900)
    q_cams, g_cams = rng.integers(0, 3, 300), rng.integers(0, 3, 900)
    kwargs: dict[str, Any] = {"max_rank": 30, "cmc_mode": cmc_mode, "num_repeats": 3}
    cpu = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, **kwargs)
    gpu = evaluate_rank(torch.from_numpy(dist).cuda(), q_pids, g_pids, q_cams, g_cams, **kwargs)
    np.testing.assert_array_equal(gpu.cmc, cpu.cmc)
    np.testing.assert_array_equal(gpu.ap, cpu.ap)
    np.testing.assert_array_equal(gpu.inp, cpu.inp)
    assert gpu.mAP == cpu.mAP and gpu.mINP == cpu.mINP


# ------------------------------------------------------------------ torch path, CUHK03 oracle


def torch_path(
    dist: npt.NDArray[Any],
    q_pids: npt.NDArray[Any],
    g_pids: npt.NDArray[Any],
    q_cams: npt.NDArray[Any],
    g_cams: npt.NDArray[Any],
    **kwargs: Any,
) -> RankResult:
    """The GPU path (torch sort and masks), run here on CPU tensors."""
    options: dict[str, Any] = {"max_rank": 50, "cmc_mode": "market", "num_repeats": 10}
    options.update(seed=0, generator=None, backend="torch")
    options.update(kwargs)
    num_query, num_gallery = dist.shape
    acc = make_accumulator(num_query, num_gallery, q_pids, g_pids, q_cams, g_cams, **options)
    acc.add(0, torch.from_numpy(dist))
    return acc.result()


@settings(max_examples=60, deadline=None)
@given(problem=deep_match_problems(), cmc_mode=st.sampled_from(["market", "cuhk03"]))
def test_torch_path_matches_protocol(problem: tuple[npt.NDArray[Any], ...], cmc_mode: str) -> None:
    dist, q_pids, g_pids, q_cams, g_cams = problem
    kwargs: dict[str, Any] = {"cmc_mode": cmc_mode, "num_repeats": 4}
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 10, **kwargs)
    if ref["num_valid"] == 0:
        with pytest.raises(ValueError, match="no query has a valid match"):
            torch_path(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, **kwargs)
        return
    assert_same(torch_path(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, **kwargs), ref)


def test_torch_path_integers_half_and_nan() -> None:
    dist, q_pids, g_pids, q_cams, g_cams = make_market_like(60, 150, 8, 5)
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 15)
    assert_same(torch_path(dist, q_pids, g_pids, q_cams, g_cams, max_rank=15), ref)
    ints = np.round(dist * 4).astype(np.int32)
    ref_int = reference_eval(ints, q_pids, g_pids, q_cams, g_cams, 15, cmc_mode="cuhk03")
    res = torch_path(ints, q_pids, g_pids, q_cams, g_cams, max_rank=15, cmc_mode="cuhk03")
    assert_same(res, ref_int)
    half = dist.astype(np.float16)
    ref_half = reference_eval(half.astype(np.float32), q_pids, g_pids, q_cams, g_cams, 15)
    assert_same(torch_path(half, q_pids, g_pids, q_cams, g_cams, max_rank=15), ref_half)
    dist[7, 33] = np.nan
    with pytest.raises(ValueError, match=r"NaN \(first at query 7, gallery 33\)"):
        torch_path(dist, q_pids, g_pids, q_cams, g_cams)


@settings(max_examples=40, deadline=None)
@given(problem=deep_match_problems(), repeats=st.integers(1, 5), seed=st.integers(0, 99))
def test_cuhk03_matches_protocol(
    problem: tuple[npt.NDArray[Any], ...], repeats: int, seed: int
) -> None:
    """The vectorised CUHK03 sampling draws exactly what the per-query protocol draws."""
    dist, q_pids, g_pids, q_cams, g_cams = problem
    kwargs: dict[str, Any] = {"cmc_mode": "cuhk03", "num_repeats": repeats, "seed": seed}
    ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, 12, **kwargs)
    if ref["num_valid"] == 0:
        return
    assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=12, **kwargs), ref)


def test_protocol_hand_case() -> None:
    """The oracle itself on a case worked by hand: gallery ranked [g2, g0, g3, g1]; g0 (same id
    and camera as the query) is removed, so the matches g3 and g1 have ranks 2 and 3."""
    dist = np.array([[0.2, 0.9, 0.1, 0.5]])
    res = evaluate_rank_reference(
        dist, ids(1), ids(1, 1, 2, 1), ids(0), ids(0, 1, 1, 1), max_rank=3
    )
    assert res.ap[0] == (1 / 2 + 2 / 3) / 2
    assert res.inp[0] == 2 / 3
    np.testing.assert_array_equal(res.cmc, [0.0, 1.0, 1.0])
    assert res.num_valid_queries == 1 and not res.cmc_padded
