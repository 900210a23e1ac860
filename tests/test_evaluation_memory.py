"""evaluate_features holds no temporary the size of the features (issue 16, section 5).

At MSMT17 size (82,161 x 2,048 float32 gallery) a whole-gallery NaN/inf scan cost 1.1 GiB of
temporaries (``isfinite`` of a float tensor allocates ``abs(x)`` and three boolean masks) and the
squared norms another 0.63 GiB (``y * y``): the process peaked at 2.55 GiB instead of ~2 GiB.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lagnet.evaluation import distance, evaluate_features, pairwise_distance
from lagnet.evaluation.distance import (
    SCAN_ELEMENTS,
    DistanceBlocks,
    check_finite_features,
    scan_rows,
    squared_norms,
)

CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1 << 20


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[int, ...]]:
    """Record the shape of the first argument of every call to ``torch.<name>``."""
    calls: list[tuple[int, ...]] = []
    real: Callable[..., torch.Tensor] = getattr(torch, name)

    def recording(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch, name, recording)
    return calls


def test_scan_rows() -> None:
    assert SCAN_ELEMENTS == 1 << 20
    assert scan_rows(torch.empty(10, 2048)) == 512
    assert scan_rows(torch.empty(10, 3000)) == 349
    assert scan_rows(torch.empty(10, 1 << 21)) == 1  # at least one row
    assert scan_rows(torch.empty(10, 0)) == SCAN_ELEMENTS


def test_finite_check_scans_blocks_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distance, "SCAN_ELEMENTS", 1000)
    calls = spy(monkeypatch, "isfinite")
    x = torch.randn(1050, 100)
    check_finite_features(x, "gallery_features")
    assert calls == [(10, 100)] * 105  # never the whole (1050, 100)
    x[1049, 99] = float("inf")
    x[1048, 0] = float("nan")
    with pytest.raises(ValueError, match=r"gallery_features contains NaN \(first in row 1048\)"):
        check_finite_features(x, "gallery_features")
    x[1048, 0] = 0.0
    with pytest.raises(ValueError, match=r"gallery_features contains inf \(first in row 1049\)"):
        check_finite_features(x, "gallery_features")


def test_finite_check_of_empty_and_zero_width_features() -> None:
    check_finite_features(torch.empty(0, 8), "x")
    check_finite_features(torch.empty(5, 0), "x")


def test_squared_norms_in_blocks_are_the_whole_tensor_sums(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    y = torch.randn(2500, 300, generator=torch.Generator().manual_seed(0)) * 3
    expected = (y * y).sum(dim=1)
    monkeypatch.setattr(distance, "SCAN_ELEMENTS", 300 * 1000)
    calls = spy(monkeypatch, "sum")
    got = squared_norms(y)
    assert calls == [(1000, 300), (1000, 300), (500, 300)]
    assert torch.equal(got, expected)  # bit for bit
    assert torch.equal(squared_norms(y.double()), (y.double() ** 2).sum(dim=1))


def test_distances_unchanged_by_the_scan_size(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 64, generator=g), torch.randn(700, 64, generator=g)
    whole = pairwise_distance(x, y)
    monkeypatch.setattr(distance, "SCAN_ELEMENTS", 64 * 7)
    assert torch.equal(pairwise_distance(x, y), whole)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_distance_blocks_use_a_float32_gallery_in_place(metric: distance.Metric) -> None:
    gallery = torch.randn(1000, 32)
    blocks = DistanceBlocks(gallery, metric, torch.float32)
    assert blocks.y.data_ptr() == gallery.data_ptr()  # no dtype or contiguity copy


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.skipif(
    not (CLEAR_REFS.exists() and os.access(CLEAR_REFS, os.W_OK)),
    reason="needs Linux's /proc/self/clear_refs to reset the peak RSS",
)
def test_evaluate_features_peak_memory_is_not_proportional_to_the_gallery() -> None:
    # A 128 MiB gallery and one query: the distances are 128 KiB, and the scans over the
    # gallery work on blocks of 1 Mi elements, so the call needs a few MB beyond its inputs
    # (measured: 7.3 MiB). Any full-size temporary or copy of the gallery is 32 MiB (a mask) or
    # 128 MiB; before issue 16 the finite scan alone took 224 MiB here (abs(x) and three
    # masks) and the squared norms 128 MiB (y * y).
    g = torch.Generator().manual_seed(0)
    gallery = torch.randn(32768, 1024, generator=g)
    query = gallery[:1] + 0.1
    g_pids = torch.arange(32768) % 1000
    g_cams = torch.ones(32768, dtype=torch.int64)
    q_ids = torch.zeros(1, dtype=torch.int64)
    warm_up = evaluate_features(
        query[:, :8], gallery[:2000, :8], q_ids, g_pids[:2000], q_ids, g_cams[:2000]
    )
    assert warm_up.num_valid_queries == 1  # the code's pages and the allocator's pools are in
    CLEAR_REFS.write_text("5")  # the peak RSS starts again from the current RSS
    before = rss_bytes()
    result = evaluate_features(query, gallery, q_ids, g_pids, q_ids, g_cams)
    extra = peak_rss_bytes() - before
    assert result.rank1 == 1.0
    assert extra < 32 * MIB, f"evaluate_features took {extra / MIB:.0f} MiB beyond its inputs"
