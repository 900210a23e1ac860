"""The sparse steps of k-reciprocal re-ranking with torch (run on CUDA for CUDA inputs) give
the NumPy steps' results: the same sets exactly, the same weights and distances to float32
rounding. Checked here on CPU tensors, with tiny blocks so that every loop takes many steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lagnet.evaluation import _kreciprocal as host
from lagnet.evaluation import _kreciprocal_device as device


def neighbour_lists(n: int, k: int, seed: int, clusters: int) -> np.ndarray:
    """Nearest-first neighbour lists of ``n`` clustered points (each item first in its own)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, 4))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, 4))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k].astype(np.int64)


@pytest.mark.parametrize(
    ("n", "k1", "k2", "block"), [(60, 5, 3, 50), (200, 20, 6, 4096), (30, 4, 1, 7)]
)
def test_sparse_steps_match_numpy(n: int, k1: int, k2: int, block: int) -> None:
    nearest = neighbour_lists(n, max(k1 + 1, k2), seed=n, clusters=max(2, n // 12))
    rows, cols = host.expanded_sets(nearest, k1)
    rows_t, cols_t = device.expanded_sets(torch.from_numpy(nearest), k1, block)
    np.testing.assert_array_equal(rows_t.numpy(), rows)
    np.testing.assert_array_equal(cols_t.numpy(), cols)
    original = np.random.default_rng(1).random(rows.size).astype(np.float32)
    vals = host.gaussian_weights(rows, original, n)
    vals_t = device.gaussian_weights(rows_t, torch.from_numpy(original), n)
    np.testing.assert_allclose(vals_t.numpy(), vals, rtol=3e-7, atol=0)
    if k2 != 1:
        rows, cols, vals = host.query_expansion(rows, cols, vals, nearest, k2)
        rows_t, cols_t, vals_t = device.query_expansion(
            rows_t, cols_t, vals_t, torch.from_numpy(nearest), k2, block
        )
        np.testing.assert_array_equal(rows_t.numpy(), rows)
        np.testing.assert_array_equal(cols_t.numpy(), cols)
        np.testing.assert_allclose(vals_t.numpy(), vals, rtol=3e-7, atol=0)
    nq = n // 3
    jaccard = host.SparseJaccard(rows, cols, vals, nq, n - nq)
    jaccard_t = device.DeviceSparseJaccard(rows_t, cols_t, vals_t, nq, n - nq, block)
    got = torch.cat([jaccard_t.rows(s, e) for s, e in jaccard_t.blocks(0, nq)]).numpy()
    want = np.concatenate([jaccard.rows(s, e) for s, e in jaccard.blocks(0, nq)])
    assert got.shape == (nq, n - nq)
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-7)
    assert (want < 1).sum() > nq  # some overlaps: the comparison is not of all-ones rows
