"""Tests of lagnet.retrieval: GalleryIndex and evaluate_index (needs faiss, the dev extra)."""

from __future__ import annotations

import builtins
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lagnet.retrieval import GalleryIndex, evaluate_index

pytest.importorskip("faiss")


def clustered(
    num_items: int, dim: int, seed: int, num_ids: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=torch.Generator().manual_seed(1234))
    pids = torch.randint(0, num_ids, (num_items,), generator=g)
    return centres[pids] + 0.4 * torch.randn(num_items, dim, generator=g), pids


def exact_neighbours(q: torch.Tensor, g: torch.Tensor, k: int, metric: str) -> np.ndarray:
    if metric == "cosine":
        dist = (
            1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
        )
    else:
        dist = torch.cdist(q.double(), g.double())
    return torch.sort(dist, dim=1, stable=True).indices[:, :k].numpy()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_flat_index_is_exact(metric: Any) -> None:
    gallery, _ = clustered(800, 24, 0)
    queries, _ = clustered(50, 24, 1)
    index = GalleryIndex.build(gallery, kind="flat", metric=metric)
    distances, ids = index.search(queries, 10)
    assert distances.dtype == np.float32 and ids.dtype == np.int64
    assert distances.shape == ids.shape == (50, 10)
    np.testing.assert_array_equal(ids, exact_neighbours(queries, gallery, 10, metric))
    assert np.all(np.diff(distances, axis=1) >= 0)
    expected = (
        1 - torch.nn.functional.cosine_similarity(queries[:, None], gallery[ids], dim=2)
        if metric == "cosine"
        else torch.linalg.vector_norm(queries[:, None] - gallery[ids], dim=2)
    )
    np.testing.assert_allclose(distances, expected.numpy(), atol=1e-4)


def test_ids_add_and_missing_results() -> None:
    gallery, _ = clustered(30, 8, 2)
    index = GalleryIndex.build(gallery[:20], ids=np.arange(100, 120), kind="flat")
    index.add(gallery[20:], ids=torch.arange(500, 510))
    assert len(index) == 30
    np.testing.assert_array_equal(index.ids, np.r_[np.arange(100, 120), np.arange(500, 510)])
    assert not index.ids.flags.writeable
    _, ids = index.search(gallery[25:26], 1)
    assert ids.tolist() == [[505]]
    distances, ids = index.search(gallery[:2], 40)  # more than the index holds
    assert (ids[:, 30:] == -1).all() and np.isinf(distances[:, 30:]).all()
    index.add(gallery[:2])  # default ids: the next positions
    assert index.ids[-2:].tolist() == [30, 31]


@pytest.mark.parametrize(
    ("kind", "extra", "min_recall"),
    [
        ("ivf", {"nprobe": 64}, 0.99),
        ("ivfpq", {"pq_m": 8, "pq_bits": 4, "nlist": 16}, 0.5),
        ("hnsw", {}, 0.95),
    ],
)
def test_approximate_kinds(kind: str, extra: dict[str, Any], min_recall: float) -> None:
    gallery, g_pids = clustered(4000, 32, 3)
    queries, q_pids = clustered(100, 32, 4)
    index = GalleryIndex.build(gallery, kind=kind, **extra)  # type: ignore[arg-type]
    assert index.kind == kind
    cams = np.zeros(100, np.int64), np.ones(4000, np.int64)
    result = evaluate_index(
        index, queries, q_pids, cams[0], g_pids, cams[1], k=20, gallery_features=gallery
    )
    assert result.recall_at_k is not None and min_recall <= result.recall_at_k <= 1.0
    assert result.exact_mAP is not None and result.mAP <= result.exact_mAP + 1e-12


def test_auto_kind_and_pca() -> None:
    gallery, g_pids = clustered(1000, 64, 5)
    queries, q_pids = clustered(60, 64, 6)
    index = GalleryIndex.build(gallery, pca_dim=16)
    assert index.kind == "flat" and index.metadata["pca_dim"] == 16
    assert index.metadata["factory"] == "PCA16,L2norm,Flat"
    q_cams, g_cams = np.zeros(60, np.int64), np.ones(1000, np.int64)
    result = evaluate_index(
        index, queries, q_pids, q_cams, g_pids, g_cams, k=10, gallery_features=gallery
    )
    # 16 of 64 dimensions: approximate neighbours, nearly the same retrieval quality
    assert result.recall_at_k is not None and 0.5 < result.recall_at_k < 1.0
    assert result.exact_mAP is not None and abs(result.mAP - result.exact_mAP) < 0.05
    with pytest.raises(ValueError, match="pca_dim must be smaller than the embedding size 64"):
        GalleryIndex.build(gallery, pca_dim=64)


def test_evaluate_index_hand_case() -> None:
    """1-d gallery [0, 1, 2, 3, 10] with ids [7, 5, 7, 7, 5] in cameras [0, 1, 1, 1, 1]; the
    query at 0 has id 7 in camera 0, so its matches are items 2 and 3. With k=4 the list
    [0, 1, 2, 3] loses item 0 (same id and camera): matches at ranks 2 and 3, AP = (1/2 + 2/3)
    / 2. With k=3 item 3 is not retrieved and counts as missed: AP@3 = (1/2) / 2."""
    gallery = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]], dtype=np.float32)
    index = GalleryIndex.build(gallery, kind="flat", metric="euclidean")
    result = evaluate_index(
        index,
        np.zeros((1, 1), np.float32),
        [7],
        [0],
        [7, 5, 7, 7, 5],
        [0, 1, 1, 1, 1],
        k=4,
        gallery_features=gallery,
    )
    assert result.mAP == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result.rank1 == 0.0 and result.recall_at_k == 1.0
    assert result.num_valid_queries == 1
    ids = ([7], [0], [7, 5, 7, 7, 5], [0, 1, 1, 1, 1])
    at3 = evaluate_index(index, np.zeros((1, 1), np.float32), *ids, k=3)
    assert at3.mAP == 0.25 and at3.recall_at_k is None and at3.exact_mAP is None


def test_save_load_round_trip(tmp_path: Path) -> None:
    gallery, _ = clustered(3000, 32, 7)
    queries, _ = clustered(20, 32, 8)
    index = GalleryIndex.build(
        gallery, kind="ivfpq", pq_m=4, pq_bits=4, nlist=8, ids=np.arange(3000) * 3
    )
    path = tmp_path / "gallery.idx"
    assert index.save(path) == path
    loaded = GalleryIndex.load(path, dim=32, metric="cosine")
    assert loaded.metadata == index.metadata
    assert loaded.metadata["lagnet_version"] and loaded.metadata["normalize"] is True
    np.testing.assert_array_equal(loaded.ids, index.ids)
    for a, b in zip(index.search(queries, 7), loaded.search(queries, 7), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left


def corrupt_cases(data: bytes) -> dict[str, tuple[bytes, str]]:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    return {
        "flipped byte": (bytes(flipped), "checksum mismatch"),
        "truncated": (data[: len(data) // 2], "truncated or corrupt"),
        "empty": (b"", "not a lagnet gallery index file"),
        "other file": (b"PK\x03\x04" + data[4:], "not a lagnet gallery index file"),
    }


def test_corrupt_files_are_refused(tmp_path: Path) -> None:
    gallery, _ = clustered(200, 16, 9)
    path = tmp_path / "g.idx"
    GalleryIndex.build(gallery, kind="flat").save(path)
    data = path.read_bytes()
    for name, (content, message) in corrupt_cases(data).items():
        bad = tmp_path / f"{name}.idx"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            GalleryIndex.load(bad)
    with pytest.raises(FileNotFoundError):
        GalleryIndex.load(tmp_path / "missing.idx")


def test_mismatched_files_are_refused(tmp_path: Path) -> None:
    gallery, _ = clustered(200, 16, 10)
    path = tmp_path / "g.idx"
    GalleryIndex.build(gallery, kind="flat", metric="euclidean").save(path)
    with pytest.raises(ValueError, match="built for 16-d embeddings, expected 512-d"):
        GalleryIndex.load(path, dim=512)
    with pytest.raises(ValueError, match="built for the euclidean metric, expected cosine"):
        GalleryIndex.load(path, metric="cosine")
    # a header that disagrees with the faiss index inside, with a valid checksum
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[8:16])
    header = data[16 : 16 + header_len].replace(b'"dim": 16', b'"dim": 61')
    import hashlib

    body = data[:16] + header + data[16 + header_len : -48]
    trailer = data[-48:-40] + hashlib.sha256(body).digest() + data[-8:]
    bad = tmp_path / "bad.idx"
    bad.write_bytes(body + trailer)
    with pytest.raises(ValueError, match=r"inconsistent: the faiss index holds 200 16-d items"):
        GalleryIndex.load(bad)
    index = GalleryIndex.load(path)
    with pytest.raises(ValueError, match="queries has 8 dimensions, the index holds 16-d"):
        index.search(np.zeros((2, 8), np.float32), 3)


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gallery, _ = clustered(200, 16, 11)
    path = tmp_path / "g.idx"
    GalleryIndex.build(gallery, kind="flat").save(path)
    before = path.read_bytes()
    index = GalleryIndex.build(gallery[:50], kind="flat")
    import faiss

    def broken(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.idx"]


def test_missing_faiss_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_faiss(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    monkeypatch.delitem(__import__("sys").modules, "faiss")
    with pytest.raises(ImportError, match=r'pip install "lagnet\[faiss\]"'):
        GalleryIndex.build(np.zeros((3, 4), np.float32))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"embeddings": np.zeros((0, 4), np.float32)}, ValueError, "embeddings is empty"),
        ({"embeddings": np.zeros(4, np.float32)}, ValueError, r"2-D \(N, D\), got shape \(4,\)"),
        ({"embeddings": np.zeros((3, 4), np.int64)}, TypeError, "must be floating point"),
        ({"embeddings": [[0.0]]}, TypeError, "torch.Tensor or numpy array"),
        (
            {"embeddings": np.full((3, 4), np.inf, np.float32)},
            ValueError,
            r"NaN or inf \(first in row 0\)",
        ),
        ({"kind": "lsh"}, ValueError, "kind must be one of"),
        ({"metric": "dot"}, ValueError, "metric must be one of"),
        ({"ids": np.arange(2)}, ValueError, r"ids must have shape \(3,\)"),
        ({"ids": np.zeros(3)}, TypeError, "ids must be integers"),
        ({"kind": "ivf", "nlist": 10}, ValueError, "nlist=10 is larger than the 3 training"),
        ({"kind": "ivfpq", "nlist": 1, "pq_m": 3}, ValueError, "pq_m=3 must divide"),
    ],
)
def test_bad_build_input(kwargs: dict[str, Any], error: type[Exception], pattern: str) -> None:
    args: dict[str, Any] = {"embeddings": np.ones((3, 4), np.float32)}
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        GalleryIndex.build(args.pop("embeddings"), **args)


def test_refine_recovers_recall() -> None:
    """Re-ranking PQ candidates with exact vectors ("flat") finds the exact neighbours."""
    gallery, _ = clustered(3000, 32, 12)
    queries, _ = clustered(40, 32, 13)
    exact = exact_neighbours(queries, gallery, 5, "cosine")
    options: dict[str, Any] = {"kind": "ivfpq", "pq_m": 4, "pq_bits": 4, "nlist": 8, "nprobe": 8}
    coarse = GalleryIndex.build(gallery, **options)
    refined = GalleryIndex.build(gallery, refine="flat", k_factor=50, **options)
    assert refined.metadata["factory"] == "IVF8,PQ4x4fs,RFlat"

    def overlap(index: GalleryIndex) -> float:
        found = index.search(queries, 5)[1]
        return float(
            np.mean([np.intersect1d(a, b).size / 5 for a, b in zip(found, exact, strict=True)])
        )

    assert overlap(refined) == 1.0
    assert overlap(coarse) < 0.9
