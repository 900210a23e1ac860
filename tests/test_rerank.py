"""Tests of lagnet.evaluation.re_ranking against a dense transcription of the algorithm."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lagnet.evaluation import re_ranking
from lagnet.evaluation.rerank import re_ranking_on_device


def dense_re_ranking(
    q_g: npt.NDArray[Any],
    q_q: npt.NDArray[Any],
    g_g: npt.NDArray[Any],
    k1: int,
    k2: int,
    lambda_value: float,
) -> npt.NDArray[np.float32]:
    """k-reciprocal re-ranking, written densely and loop by loop from the paper's recipe."""
    nq = q_g.shape[0]
    full = np.block([[q_q, q_g], [q_g.T, g_g]])
    squared = np.square(full).astype(np.float32)
    original = (squared / squared.max(axis=0)).T  # column-normalised, then transposed
    n = original.shape[0]
    ranking = np.argsort(original, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> npt.NDArray[np.int64]:
        return np.array([j for j in ranking[i, : k + 1] if i in ranking[j, : k + 1]], np.int64)

    half = int(np.around(k1 / 2))
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        base = reciprocal(i, k1)
        members = list(base)
        for candidate in base:
            cand_set = reciprocal(int(candidate), half)
            if len(np.intersect1d(cand_set, base)) > 2 / 3 * len(cand_set):
                members.extend(cand_set)
        cols = np.unique(np.array(members, dtype=np.int64))
        weights = np.exp(-original[i, cols])
        v[i, cols] = weights / weights.sum()
    if k2 != 1:
        v = np.stack([v[ranking[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.empty((nq, n), dtype=np.float32)
    for i in range(nq):
        overlap = np.minimum(v[i][None, :], v).sum(axis=1)
        jaccard[i] = 1 - overlap / (2 - overlap)
    final: npt.NDArray[np.float32] = jaccard * (1 - lambda_value) + original[:nq] * lambda_value
    return final[:, nq:]


def euclidean(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return out


def symmetric_problem(nq: int, ng: int, dim: int, seed: int) -> tuple[npt.NDArray[Any], ...]:
    rng = np.random.default_rng(seed)
    qf, gf = rng.normal(size=(nq, dim)), rng.normal(size=(ng, dim))
    return euclidean(qf, gf), euclidean(qf, qf), euclidean(gf, gf)


@settings(max_examples=40, deadline=None)
@given(
    nq=st.integers(1, 8),
    ng=st.integers(2, 30),
    dim=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    symmetric=st.booleans(),
    data=st.data(),
)
def test_matches_dense_transcription(
    nq: int, ng: int, dim: int, seed: int, symmetric: bool, data: st.DataObject
) -> None:
    k1 = data.draw(st.integers(1, ng), label="k1")
    k2 = data.draw(st.integers(1, min(8, nq + ng)), label="k2")
    lam = data.draw(st.sampled_from([0.0, 0.3, 1.0, 0.77]), label="lambda")
    if symmetric:
        q_g, q_q, g_g = symmetric_problem(nq, ng, dim, seed)
    else:  # arbitrary non-negative blocks, not symmetric
        rng = np.random.default_rng(seed)
        q_g, q_q, g_g = rng.random((nq, ng)), rng.random((nq, nq)), rng.random((ng, ng))
    expected = dense_re_ranking(q_g, q_q, g_g, k1, k2, lam)
    got = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    assert got.dtype == np.float32 and got.shape == (nq, ng)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_default_parameters_larger_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    q_g, q_q, g_g = symmetric_problem(25, 70, 4, 1)
    expected = dense_re_ranking(q_g, q_q, g_g, 20, 6, 0.3)
    np.testing.assert_allclose(re_ranking(q_g, q_q, g_g), expected, rtol=0, atol=1e-5)
    # tiny internal blocks: same answer
    monkeypatch.setattr("lagnet.evaluation._shared.BLOCK_ELEMENTS", 300)
    np.testing.assert_allclose(re_ranking(q_g, q_q, g_g), expected, rtol=0, atol=1e-5)


def test_float32_torch_inputs_give_torch_output() -> None:
    q_g, q_q, g_g = (m.astype(np.float32) for m in symmetric_problem(6, 20, 3, 2))
    expected = dense_re_ranking(q_g, q_q, g_g, 5, 3, 0.3)
    got = re_ranking(
        torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g), k1=5, k2=3
    )
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)


def test_reranking_helps_on_a_clustered_problem() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(10, 6))
    q_ids, g_ids = rng.integers(0, 10, 20), rng.integers(0, 10, 100)
    qf = centres[q_ids] + 0.6 * rng.normal(size=(20, 6))
    gf = centres[g_ids] + 0.6 * rng.normal(size=(100, 6))
    q_g, q_q, g_g = euclidean(qf, gf), euclidean(qf, qf), euclidean(gf, gf)
    final = re_ranking(q_g, q_q, g_g, k1=10, k2=4)
    same = q_ids[:, None] == g_ids[None, :]
    # same-id pairs get relatively closer
    assert final[same].mean() / final[~same].mean() < q_g[same].mean() / q_g[~same].mean()


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"k1": 11}, ValueError, r"k1=11 is larger than the gallery \(10 items"),
        ({"k1": -1}, ValueError, "k1 must be >= 1, got -1"),
        ({"k1": 0}, ValueError, "k1 must be >= 1, got 0"),
        ({"k2": -2}, ValueError, "k2 must be >= 1, got -2"),
        ({"k2": 15}, ValueError, "k2=15 is larger than query \\+ gallery = 14"),
        ({"k1": 2.5}, TypeError, "k1 must be an int"),
        ({"lambda_value": 1.5}, ValueError, r"lambda_value must be in \[0, 1\], got 1.5"),
        ({"lambda_value": "a"}, TypeError, "lambda_value must be a number"),
        ({"lambda_value": float("nan")}, ValueError, "lambda_value must be a finite number"),
    ],
)
def test_bad_parameters(kwargs: dict[str, Any], error: type[Exception], pattern: str) -> None:
    q_g, q_q, g_g = symmetric_problem(4, 10, 3, 0)
    args: dict[str, Any] = {"k1": 3, "k2": 2}
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        re_ranking(q_g, q_q, g_g, **args)


def test_bad_matrices() -> None:
    q_g, q_q, g_g = symmetric_problem(4, 10, 3, 0)
    with pytest.raises(ValueError, match=r"q_q_dist has shape \(4, 5\), expected \(4, 4\)"):
        re_ranking(q_g, np.zeros((4, 5)), g_g, k1=3)
    with pytest.raises(ValueError, match=r"g_g_dist has shape \(9, 9\), expected \(10, 10\)"):
        re_ranking(q_g, q_q, g_g[:9, :9], k1=3)
    with pytest.raises(ValueError, match="q_g_dist must be 2-D"):
        re_ranking(q_g[0], q_q, g_g, k1=3)
    with pytest.raises(ValueError, match="empty query set"):
        re_ranking(np.zeros((0, 10)), np.zeros((0, 0)), g_g, k1=3)
    bad = q_g.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="q_g_dist contains NaN or infinite"):
        re_ranking(bad, q_q, g_g, k1=3)
    with pytest.raises(TypeError, match="g_g_dist must be a numpy array or torch tensor"):
        re_ranking(q_g, q_q, g_g.tolist(), k1=3)
    with pytest.raises(ValueError, match="column 0 of the combined distance matrix"):
        re_ranking(np.zeros((1, 3)), np.zeros((1, 1)), np.ones((3, 3)), k1=2, k2=1)


def test_negative_distances_are_refused() -> None:
    """Similarities (larger is closer) passed by mistake are refused with a clear message;
    rounding-size negatives of a distance computed as |x|^2 + |y|^2 - 2 x.y are accepted."""
    q_g, q_q, g_g = symmetric_problem(4, 10, 3, 0)
    similarity = 1.0 - q_g  # cosine-similarity-like values, many below 0
    with pytest.raises(ValueError, match=r"q_g_dist contains negative distances \(min -"):
        re_ranking(similarity, q_q, g_g, k1=3)
    with pytest.raises(ValueError, match="not similarities"):
        re_ranking(q_g, q_q, -g_g, k1=3)
    tiny = q_q.copy()
    np.fill_diagonal(tiny, -1e-7)
    expected = re_ranking(q_g, q_q, g_g, k1=3)
    np.testing.assert_array_equal(re_ranking(q_g, tiny, g_g, k1=3), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors() -> None:
    q_g, q_q, g_g = (m.astype(np.float32) for m in symmetric_problem(6, 20, 3, 4))
    expected = dense_re_ranking(q_g, q_q, g_g, 5, 3, 0.3)
    q_g_t, q_q_t, g_g_t = (torch.from_numpy(m).cuda() for m in (q_g, q_q, g_g))
    got = re_ranking(q_g_t, q_q_t, g_g_t, k1=5, k2=3)
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=0, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    nq=st.integers(1, 8),
    ng=st.integers(2, 30),
    seed=st.integers(0, 2**31),
    ties=st.booleans(),
    data=st.data(),
)
@pytest.mark.parametrize("sparse_on_device", [False, True])
def test_torch_path_equals_numpy_path(
    nq: int, ng: int, seed: int, ties: bool, data: st.DataObject, sparse_on_device: bool
) -> None:
    """The device path (torch neighbour search on the dense matrices; with
    ``sparse_on_device``, the sparse steps with torch too, as on CUDA), run on CPU tensors,
    gives the NumPy path's numbers, ties and non-symmetric blocks included."""
    k1 = data.draw(st.integers(1, ng), label="k1")
    k2 = data.draw(st.integers(1, min(8, nq + ng)), label="k2")
    lam = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="lambda")
    rng = np.random.default_rng(seed)
    mats = [rng.random(shape) for shape in ((nq, ng), (nq, nq), (ng, ng))]
    if ties:
        mats = [np.round(m * 3) for m in mats]
        mats = [np.where(m == 0, 1.0, m) for m in mats]  # no all-zero column
    q_g, q_q, g_g = (m.astype(np.float32) for m in mats)
    expected = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    tensors = [torch.from_numpy(m) for m in (q_g, q_q, g_g)]
    got = re_ranking_on_device(
        *tensors, k1=k1, k2=k2, lambda_value=lam, sparse_on_device=sparse_on_device
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sparse_on_device", [False, True])
def test_torch_path_larger_problem(monkeypatch: pytest.MonkeyPatch, sparse_on_device: bool) -> None:
    q_g, q_q, g_g = (m.astype(np.float32) for m in symmetric_problem(40, 150, 5, 3))
    expected = re_ranking(q_g, q_q, g_g)
    monkeypatch.setattr("lagnet.evaluation._shared.BLOCK_ELEMENTS", 1000)  # blocks across Q/G
    tensors = [torch.from_numpy(m) for m in (q_g, q_q, g_g)]
    got = re_ranking_on_device(
        *tensors, k1=20, k2=6, lambda_value=0.3, sparse_on_device=sparse_on_device
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stay_on_the_device() -> None:
    q_g, q_q, g_g = (m.astype(np.float32) for m in symmetric_problem(30, 200, 4, 6))
    expected = re_ranking(q_g, q_q, g_g)
    got = re_ranking(*(torch.from_numpy(m).cuda() for m in (q_g, q_q, g_g)))
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="q_g_dist contains negative distances"):
        re_ranking(*(torch.from_numpy(m).cuda() for m in (-q_g, q_q, g_g)))
