"""The embedded synthetic dataset: format, determinism, caching, and the colour baseline."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lagnet.data import (
    MANIFEST_NAME,
    Market1501,
    ReIDRecord,
    build_dataset,
    color_histogram_features,
    generate_synthetic_market,
)
from lagnet.evaluation.protocol import evaluate_rank_reference

SMALL = {
    "num_train_ids": 3,
    "num_test_ids": 2,
    "images_per_id_per_cam": 2,
    "num_cameras": 2,
    "num_distractors": 2,
    "num_junk": 2,
}


@pytest.fixture(scope="module")
def default_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default dataset, generated once for this module (its speed: benchmarks/)."""
    root = tmp_path_factory.mktemp("synthetic") / "market"
    generate_synthetic_market(root)
    return root


def market_map(
    qf: torch.Tensor, gf: torch.Tensor, query: Sequence[ReIDRecord], gallery: Sequence[ReIDRecord]
) -> float:
    """Market-1501 mAP through the plain protocol (lagnet.evaluation.protocol)."""
    return evaluate_rank_reference(
        torch.cdist(qf, gf).numpy(),
        np.array([r.pid for r in query]),
        np.array([r.pid for r in gallery]),
        np.array([r.camid for r in query]),
        np.array([r.camid for r in gallery]),
    ).mAP


def test_market_map_helper() -> None:
    gallery = [ReIDRecord("", p, c) for p, c in [(1, 1), (2, 1), (1, 0), (2, 0)]]
    query = [ReIDRecord("", 1, 0), ReIDRecord("", 2, 0)]
    g = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    assert market_map(torch.tensor([[0.0], [1.0]]), g, query, gallery) == 1.0
    # Swapped features: both other-identity images come first (the query's same-camera match
    # is removed), so the only valid match is at rank 3: AP = 1/3.
    assert market_map(torch.tensor([[1.0], [0.0]]), g, query, gallery) == pytest.approx(1 / 3)


def test_default_dataset_is_a_market_folder(default_root: Path) -> None:
    root = default_root
    ds = Market1501(root)
    assert ds.num_train_pids == 100 and ds.num_train_cams == 4
    assert len(ds.train) == 100 * 4 * 4
    assert len(ds.query) == 100 * 4  # one query per test identity and camera
    gallery_pids = [r.pid for r in ds.gallery]
    assert gallery_pids.count(0) == 100  # distractors are loaded
    assert len(gallery_pids) == 100 * 4 * 3 + 100
    assert {r.pid for r in ds.query} == set(gallery_pids) - {0}
    assert not {r.pid for r in ds.query} & set(ds.train_pid_map)  # train and test disjoint
    # Junk is on disk in the real naming, and dropped by the loader.
    junk = sorted((root / "bounding_box_test").glob("-1_c*s1_*_00.jpg"))
    assert len(junk) == 40
    names = [Path(r.path).name for r in ds.train + ds.query + ds.gallery]
    assert all(len(n.split("_")) == 4 and n.endswith("_00.jpg") for n in names)
    assert len(set(names)) == len(names)
    with Image.open(ds.query[0].path) as image:
        assert image.size == (64, 128) and image.format == "JPEG"
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["params"]["num_train_ids"] == 100
    assert manifest["counts"] == {
        "bounding_box_train": 1600,
        "query": 400,
        "bounding_box_test": 1340,
    }
    assert build_dataset("synthetic", root).gallery == ds.gallery


def test_colour_histogram_baseline_is_weak(default_root: Path) -> None:
    root = default_root
    ds = Market1501(root)
    qf = color_histogram_features(ds.query)
    gf = color_histogram_features(ds.gallery)
    score = market_map(qf, gf, ds.query, ds.gallery)
    print(f"colour-histogram baseline mAP on the default split: {score:.4f}")
    assert score < 0.5
    # The evaluation itself can succeed: identity-coded features give a perfect score.
    oracle = torch.nn.functional.one_hot(torch.tensor([r.pid for r in ds.query + ds.gallery]))
    oracle = oracle.float()
    assert market_map(oracle[: len(ds.query)], oracle[len(ds.query) :], ds.query, ds.gallery) == 1.0


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = generate_synthetic_market(tmp_path / "a", seed=3, **SMALL)
    b = generate_synthetic_market(tmp_path / "b", seed=3, **SMALL)
    c = generate_synthetic_market(tmp_path / "c", seed=4, **SMALL)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert len(files_a) == 3 * 2 * 2 + 2 * 2 * 2 + 2 + 2
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    gallery_a = sorted((a / "query").iterdir())
    gallery_c = sorted((c / "query").iterdir())
    assert [p.read_bytes() for p in gallery_a] != [p.read_bytes() for p in gallery_c]


def test_small_dataset_parses_with_junk_and_distractors(tmp_path: Path) -> None:
    root = generate_synthetic_market(tmp_path / "small", height=64, width=32, **SMALL)
    ds = Market1501(root)
    assert ds.num_train_pids == 3 and len(ds.train) == 3 * 2 * 2
    assert len(ds.query) == 2 * 2
    assert [r.pid for r in ds.gallery].count(0) == 2
    assert len(list((root / "bounding_box_test").glob("-1_*.jpg"))) == 2
    assert read_size(ds.train[0].path) == (32, 64)


def read_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_existing_dataset_is_reused_and_other_content_is_protected(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    generate_synthetic_market(root, **SMALL)
    manifest = root / MANIFEST_NAME
    stamp = manifest.stat().st_mtime_ns
    assert generate_synthetic_market(root, **SMALL) == root
    assert manifest.stat().st_mtime_ns == stamp  # skipped: nothing rewritten
    with pytest.raises(FileExistsError, match="not a synthetic dataset with these parameters"):
        generate_synthetic_market(root, seed=1, **SMALL)
    generate_synthetic_market(root, seed=1, overwrite=True, **SMALL)
    assert json.loads(manifest.read_text())["params"]["seed"] == 1
    # A damaged dataset (a file missing) is not reused.
    next((root / "query").iterdir()).unlink()
    with pytest.raises(FileExistsError):
        generate_synthetic_market(root, seed=1, **SMALL)
    # An empty folder is filled; no temporary folders are left next to root.
    (tmp_path / "empty").mkdir()
    generate_synthetic_market(tmp_path / "empty", **SMALL)
    assert (tmp_path / "empty" / MANIFEST_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "syn"]


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="images_per_id_per_cam must be at least 2"):
        generate_synthetic_market("unused", images_per_id_per_cam=1)
    with pytest.raises(ValueError, match="num_cameras must be between 2 and 9"):
        generate_synthetic_market("unused", num_cameras=1)
    with pytest.raises(ValueError, match="at most 9999 identities"):
        generate_synthetic_market("unused", num_train_ids=5000, num_test_ids=5000)
    assert not Path("unused").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_train_ids": 1.5}, TypeError, r"^num_train_ids must be an int, got float \(1.5\)$"),
        ({"num_cameras": "4"}, TypeError, r"^num_cameras must be an int, got str \('4'\)$"),
        ({"height": True}, TypeError, r"^height must be an int, got bool \(True\)$"),
        ({"num_test_ids": 0}, ValueError, r"^num_test_ids must be >= 1, got 0$"),
        ({"num_junk": -1}, ValueError, r"^num_junk must be >= 0, got -1$"),
        ({"seed": -3}, ValueError, r"^seed must be >= 0, got -3$"),
    ],
)
def test_parameter_types_are_checked_before_writing(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        generate_synthetic_market(tmp_path / "never", **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_histogram_bins_are_checked() -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    with pytest.raises(TypeError, match=r"^bins must be an int, got float \(8.0\)$"):
        color_histogram_features([red], bins=8.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^bins must be >= 1, got 0$"):
        color_histogram_features([red], bins=0)
    with pytest.raises(ValueError, match=r"^bins must be in 1..256, got 300$"):
        color_histogram_features([red], bins=300)


def test_colour_histogram_features(tmp_path: Path) -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    half = Image.new("RGB", (8, 8), (255, 0, 0))
    half.paste((0, 0, 255), (0, 0, 8, 4))
    path = tmp_path / "half.png"
    half.save(path)
    for space in ("hsv", "rgb"):
        feats = color_histogram_features(
            [red, half, str(path), ReIDRecord(str(path), 1, 0)], bins=4, space=space
        )
        assert feats.shape == (4, 64) and feats.dtype == torch.float32
        assert torch.allclose(feats.norm(dim=1), torch.ones(4))
        assert int((feats[0] > 0).sum()) == 1 and int((feats[1] > 0).sum()) == 2
        assert torch.allclose(feats[1], feats[2]) and torch.allclose(feats[2], feats[3])
        assert torch.allclose(feats[1][feats[1] > 0], torch.full((2,), 0.5**0.5))
    assert color_histogram_features([], bins=8).shape == (0, 512)
    with pytest.raises(ValueError, match="space must be 'hsv' or 'rgb'"):
        color_histogram_features([red], space="lab")
    with pytest.raises(OSError, match="cannot read image .*nope.png"):
        color_histogram_features([str(tmp_path / "nope.png")])
