"""Dataset parsers on tiny fake folders in the real formats, and the image dataset wrapper."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lagnet.data import (
    CUHK03NP,
    DATASET_NAMES,
    MSMT17,
    DukeMTMCreID,
    ImageDataset,
    Market1501,
    ReIDFolder,
    ReIDRecord,
    build_dataset,
)


def write_images(folder: Path, names: Iterable[str], size: tuple[int, int] = (8, 16)) -> None:
    """Tiny real images (PIL picks JPEG or PNG from the suffix), a distinct colour each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (10 * i % 256, 40, 200)).save(folder / name)


MARKET_TRAIN = [
    "0002_c1s1_000451_03.jpg",
    "0002_c2s1_000301_01.jpg",
    "0007_c3s3_076994_01.jpg",
    "0007_c6s1_011351_02.jpg",
    "0011_c1s1_001051_01.jpg",
]
MARKET_QUERY = ["0001_c1s1_001051_00.jpg", "0003_c4s6_015641_00.jpg"]
MARKET_GALLERY = [
    "0001_c2s1_000301_01.jpg",
    "0003_c1s1_001151_02.jpg",
    "0000_c1s1_000151_01.jpg",  # distractor
    "0000_c6s4_001427_02.jpg",  # distractor
    "-1_c1s1_000401_03.jpg",  # junk
    "-1_c3s2_039966_04.jpg",  # junk
]


def make_market(root: Path) -> Path:
    write_images(root / "bounding_box_train", MARKET_TRAIN)
    write_images(root / "query", MARKET_QUERY)
    write_images(root / "bounding_box_test", MARKET_GALLERY)
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")
    (root / "query" / "readme.txt").write_text("not an image")
    return root


# --- Market-1501 ---------------------------------------------------------------------------


def test_market_parses_ids_cameras_junk_and_distractors(tmp_path: Path) -> None:
    ds = Market1501(make_market(tmp_path))
    assert ds.train[0] == ReIDRecord(
        str(tmp_path / "bounding_box_train" / "0002_c1s1_000451_03.jpg"), 0, 0
    )
    # Training identities 2, 7, 11 relabelled in sorted order to 0, 1, 2.
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 1), (1, 2), (1, 5), (2, 0)]
    assert ds.train_pid_map == {2: 0, 7: 1, 11: 2}
    assert ds.num_train_pids == 3
    assert ds.num_train_cams == 4
    # Query and gallery keep the original identities; junk (-1) is dropped, distractors stay.
    assert [(r.pid, r.camid) for r in ds.query] == [(1, 0), (3, 3)]
    assert sorted((r.pid, r.camid) for r in ds.gallery) == [(0, 0), (0, 5), (1, 1), (3, 0)]
    assert all(Path(r.path).is_file() for r in ds.train + ds.query + ds.gallery)
    assert not any("-1_" in Path(r.path).name for r in ds.gallery)


def test_market_summary_and_repr(tmp_path: Path) -> None:
    ds = Market1501(make_market(tmp_path))
    text = ds.summary()
    assert "Market-1501" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert rows == {"train": ["3", "5", "4"], "query": ["2", "2", "2"], "gallery": ["3", "4", "3"]}
    assert "num_train_pids=3" in repr(ds)


def test_market_accepts_the_unzipped_parent_folder(tmp_path: Path) -> None:
    make_market(tmp_path / "Market-1501-v15.09.15")
    ds = Market1501(tmp_path)
    assert ds.root == tmp_path / "Market-1501-v15.09.15"
    assert len(ds.train) == 5


def test_missing_root_shows_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist(.|\n)*Expected layout") as info:
        Market1501(tmp_path / "nowhere")
    message = str(info.value)
    for part in ("bounding_box_train/", "query/", "bounding_box_test/", "0002_c1s1_000451_03"):
        assert part in message


def test_missing_split_folder_is_named(tmp_path: Path) -> None:
    make_market(tmp_path)
    for f in (tmp_path / "query").iterdir():
        f.unlink()
    (tmp_path / "query").rmdir()
    with pytest.raises(FileNotFoundError, match=r"missing 'query'(.|\n)*Expected layout"):
        Market1501(tmp_path)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    make_market(tmp_path)
    for f in (tmp_path / "query").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"the query split .* has no images"):
        Market1501(tmp_path)


def test_split_of_only_junk_says_so(tmp_path: Path) -> None:
    make_market(tmp_path)
    for f in (tmp_path / "query").iterdir():
        f.unlink()
    write_images(tmp_path / "query", ["-1_c1s1_000001_00.jpg"])
    with pytest.raises(ValueError, match=r"has no images \(1 junk images with identity -1"):
        Market1501(tmp_path)


def test_unparseable_names_are_listed_not_skipped(tmp_path: Path) -> None:
    make_market(tmp_path)
    bad = [f"person{i}.jpg" for i in range(7)]
    write_images(tmp_path / "bounding_box_test", bad)
    with pytest.raises(
        ValueError,
        match=r"7 file names in the gallery split .*'person0.jpg', 'person1.jpg'.*\(and 2 more\)",
    ):
        Market1501(tmp_path)


def test_camera_zero_in_a_name_is_unparseable(tmp_path: Path) -> None:
    make_market(tmp_path)
    write_images(tmp_path / "query", ["0005_c0s1_000001_00.jpg"])
    with pytest.raises(ValueError, match=r"'0005_c0s1_000001_00.jpg'"):
        Market1501(tmp_path)


def test_distractors_in_the_training_split_are_refused(tmp_path: Path) -> None:
    make_market(tmp_path)
    write_images(tmp_path / "bounding_box_train", ["0000_c1s1_000002_01.jpg"])
    with pytest.raises(ValueError, match=r"distractor images \(identity 0\)"):
        Market1501(tmp_path)


# --- DukeMTMC-reID and CUHK03-NP -------------------------------------------------------------


def test_duke_parses_its_names(tmp_path: Path) -> None:
    write_images(
        tmp_path / "DukeMTMC-reID" / "bounding_box_train",
        ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg", "0005_c8_f0020541.jpg"],
    )
    write_images(tmp_path / "DukeMTMC-reID" / "query", ["0006_c1_f0000001.jpg"])
    write_images(
        tmp_path / "DukeMTMC-reID" / "bounding_box_test",
        ["0006_c3_f0000010.jpg", "7140_c7_f0100001.jpg"],
    )
    ds = DukeMTMCreID(tmp_path)
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 1), (0, 4), (1, 7)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(6, 2), (7140, 6)]
    assert ds.num_train_cams == 3
    write_images(tmp_path / "DukeMTMC-reID" / "query", ["0002_c2s1_000451_03.jpg"])
    with pytest.raises(ValueError, match=r"'0002_c2s1_000451_03.jpg'"):
        DukeMTMCreID(tmp_path)


def make_cuhk03(top: Path) -> None:
    for split, n in (("detected", 2), ("labeled", 3)):
        base = top / "cuhk03-np" / split
        write_images(
            base / "bounding_box_train", [f"{p:04d}_c1_{i}.png" for p in (1, 3) for i in range(n)]
        )
        write_images(base / "query", ["0002_c1_1.png", "0004_c2_1.png"])
        write_images(base / "bounding_box_test", ["0002_c2_3.png", "0004_c1_2.png"])


def test_cuhk03np_detected_and_labeled(tmp_path: Path) -> None:
    make_cuhk03(tmp_path)
    detected = CUHK03NP(tmp_path, split="detected")
    labeled = CUHK03NP(tmp_path / "cuhk03-np", split="labeled")
    assert len(detected.train) == 4 and len(labeled.train) == 6
    assert {r.pid for r in detected.train} == {0, 1}
    assert [(r.pid, r.camid) for r in labeled.query] == [(2, 0), (4, 1)]
    assert all("/labeled/" in r.path for r in labeled.train + labeled.gallery)
    assert "CUHK03-NP (labeled)" in labeled.summary()
    assert build_dataset("cuhk03np-labeled", tmp_path).num_train_images == 6
    assert build_dataset("cuhk03np-detected", tmp_path).num_train_images == 4


def test_cuhk03np_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be 'detected' or 'labeled'"):
        CUHK03NP(tmp_path, split="classic")
    make_cuhk03(tmp_path)
    write_images(tmp_path / "cuhk03-np" / "detected" / "query", ["0005_c3_1.png"])
    with pytest.raises(ValueError, match=r"1 file names in the query split .*'0005_c3_1.png'"):
        CUHK03NP(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"detected/bounding_box_train"):
        CUHK03NP(tmp_path / "cuhk03-np" / "detected")


# --- MSMT17 ---------------------------------------------------------------------------------


def make_msmt(top: Path, version: str = "V1") -> Path:
    root = top / f"MSMT17_{version}"
    train_dir, test_dir = (
        ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    )
    lists = {
        "list_train.txt": (
            train_dir,
            [
                ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                ("0000/0000_001_03_0303morning_0016_1.jpg", 0),
                ("0004/0004_000_15_0303noon_0250_0.jpg", 4),
            ],
        ),
        "list_val.txt": (train_dir, [("0002/0002_000_07_0303afternoon_0001_2.jpg", 2)]),
        "list_query.txt": (test_dir, [("0000/0000_000_02_0303morning_0030_0.jpg", 0)]),
        "list_gallery.txt": (
            test_dir,
            [
                ("0000/0000_001_05_0303morning_0031_0.jpg", 0),
                ("0001/0001_000_09_0303noon_0001_0.jpg", 1),
            ],
        ),
    }
    for list_name, (folder, entries) in lists.items():
        for rel, _ in entries:
            write_images(root / folder / Path(rel).parent, [Path(rel).name])
        text = "".join(f"{rel} {pid}\n" for rel, pid in entries)
        (root / list_name).write_text(text)
    return root


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17_lists_merge_train_and_val(tmp_path: Path, version: str) -> None:
    root = make_msmt(tmp_path, version)
    ds = MSMT17(tmp_path)
    assert ds.root == root and ds.version == version
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 2), (2, 14), (1, 6)]
    assert ds.train_pid_map == {0: 0, 2: 1, 4: 2}
    assert [(r.pid, r.camid) for r in ds.query] == [(0, 1)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 4), (1, 8)]
    assert all(Path(r.path).is_file() for r in ds.train + ds.query + ds.gallery)
    assert build_dataset("msmt17", root).num_train_pids == 3


def test_msmt17_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing 'list_train.txt'(.|\n)*Expected"):
        MSMT17(tmp_path)
    root = make_msmt(tmp_path)
    with (root / "list_query.txt").open("a") as f:
        f.write("0003/0003_000_02_0303morning_0031_0.jpg\n")  # no pid
        f.write("0003/broken.jpg 3\n")
    with pytest.raises(ValueError, match=r"2 lines of .*list_query.txt.*line 2: .*line 3:"):
        MSMT17(root)
    (root / "list_query.txt").write_text("0009/0009_000_02_0303morning_0031_0.jpg 9\n")
    with pytest.raises(FileNotFoundError, match=r"1 images listed .* do not exist.*0009_000_02"):
        MSMT17(root)
    (root / "list_query.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"the query list .* has no images"):
        MSMT17(root)
    for f in (root / "test").rglob("*.jpg"):
        f.unlink()
    for d in sorted((root / "test").rglob("*"), reverse=True):
        d.rmdir()
    (root / "test").rmdir()
    with pytest.raises(FileNotFoundError, match=r"neither 'train/' and 'test/'"):
        MSMT17(root)


# --- generic folder and registry ------------------------------------------------------------


def make_generic(root: Path) -> None:
    write_images(root / "tr", ["id3-cam0-a.png", "id3-cam1-b.png", "id9-cam2-a.png"])
    write_images(root / "q", ["id4-cam0-a.png"])
    write_images(root / "g", ["id4-cam1-a.png", "id-1-cam1-x.png"])


def test_reid_folder_with_pattern(tmp_path: Path) -> None:
    make_generic(tmp_path)
    ds = ReIDFolder(
        tmp_path,
        train_dir="tr",
        query_dir="q",
        gallery_dir="g",
        pattern=r"id(?P<pid>-?\d+)-cam(?P<camid>\d+)-\w+\.png",
        camid_base=0,
    )
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 1), (1, 2)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(4, 1)]  # pid -1 is junk


def test_reid_folder_with_parser(tmp_path: Path) -> None:
    make_generic(tmp_path)
    dirs = {"train_dir": "tr", "query_dir": "q", "gallery_dir": "g"}

    def parse(name: str) -> tuple[int, int] | None:
        head, cam, _ = name.rsplit("-", 2)  # ValueError on other names: unparseable
        return int(head[2:]), int(cam[3:])

    ds = ReIDFolder(tmp_path, parser=parse, camid_base=0, name="Toy", **dirs)
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 1), (1, 2)]
    assert ds.summary().startswith("Toy dataset")
    # With the default camid_base=1, the camera 0 in these names is refused.
    with pytest.raises(
        ValueError,
        match=r"1 file names in the train split .* camera below the first camera number 1: "
        r"'id3-cam0-a.png' \(pid 3, camera 0\)$",
    ):
        ReIDFolder(tmp_path, parser=parse, **dirs)
    write_images(tmp_path / "q", ["weird.png"])
    with pytest.raises(ValueError, match=r"1 file names in the query split .*'weird.png'"):
        ReIDFolder(tmp_path, parser=parse, camid_base=0, **dirs)


def test_reid_folder_argument_errors(tmp_path: Path) -> None:
    make_generic(tmp_path)
    dirs = {"train_dir": "tr", "query_dir": "q", "gallery_dir": "g"}
    with pytest.raises(ValueError, match="exactly one of `pattern` or `parser`"):
        ReIDFolder(tmp_path, **dirs)
    with pytest.raises(ValueError, match="named groups 'pid' and 'camid'"):
        ReIDFolder(tmp_path, pattern=r"id(\d+)-cam(\d+)", **dirs)
    with pytest.raises(ValueError, match=r"3 file names in the train split"):
        ReIDFolder(tmp_path, pattern=r"(?P<pid>\d+)_(?P<camid>\d+)\.jpg", **dirs)
    with pytest.raises(FileNotFoundError, match=r"missing 'nope'"):
        ReIDFolder(
            tmp_path, train_dir="nope", query_dir="q", gallery_dir="g", parser=lambda n: None
        )


# --- nothing silently skipped ------------------------------------------------------------


def test_dangling_symlink_is_an_error_naming_it(tmp_path: Path) -> None:
    make_market(tmp_path)
    link = tmp_path / "query" / "0005_c2s1_000001_00.jpg"
    link.symlink_to(tmp_path / "deleted.jpg")
    with pytest.raises(FileNotFoundError) as info:
        Market1501(tmp_path)
    assert str(info.value) == (
        f"Market-1501: {str(link)!r} in the query split is a link to a missing file"
    )


def test_symlink_to_an_image_is_read(tmp_path: Path) -> None:
    make_market(tmp_path)
    (tmp_path / "query" / "0005_c2s1_000001_00.jpg").symlink_to(
        tmp_path / "query" / MARKET_QUERY[0]
    )
    assert [(r.pid, r.camid) for r in Market1501(tmp_path).query] == [(1, 0), (3, 3), (5, 1)]


def test_unreadable_image_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    make_market(tmp_path)
    target = str(tmp_path / "bounding_box_train" / MARKET_TRAIN[2])
    real_access = os.access
    # chmod does not stop root, so the permission check itself is made to fail for one file
    monkeypatch.setattr(os, "access", lambda p, mode: p != target and real_access(p, mode))
    with pytest.raises(PermissionError) as info:
        Market1501(tmp_path)
    assert str(info.value) == f"Market-1501: {target!r} in the train split is not readable"


def test_negative_identity_other_than_junk_is_refused(tmp_path: Path) -> None:
    make_generic(tmp_path)
    write_images(tmp_path / "g", ["id-7-cam1-y.png"])
    with pytest.raises(
        ValueError,
        match=r"^ReIDFolder: 1 file names in the gallery split .* give an identity below -1 .*: "
        r"'id-7-cam1-y.png' \(pid -7, camera 1\)$",
    ):
        ReIDFolder(
            tmp_path, train_dir="tr", query_dir="q", gallery_dir="g",
            pattern=r"id(?P<pid>-?\d+)-cam(?P<camid>\d+)-\w+\.png", camid_base=0,
        )  # fmt: skip


def test_images_in_sub_folders_are_explained(tmp_path: Path) -> None:
    make_market(tmp_path)
    for name in MARKET_QUERY:
        (tmp_path / "query" / name).unlink()
    write_images(tmp_path / "query" / "cam1", MARKET_QUERY)
    with pytest.raises(
        ValueError,
        match=r"the query split .* has no images; it has sub-folders \('cam1'\), but images "
        r"are read from the split folder itself",
    ):
        Market1501(tmp_path)


def test_bad_regex_and_argument_types(tmp_path: Path) -> None:
    make_generic(tmp_path)
    dirs = {"train_dir": "tr", "query_dir": "q", "gallery_dir": "g"}
    with pytest.raises(ValueError, match=r"^pattern '\(\?P<pid>' is not a regular expression"):
        ReIDFolder(tmp_path, pattern="(?P<pid>", **dirs)
    with pytest.raises(TypeError, match=r"^pattern must be a string or re.Pattern, got int$"):
        ReIDFolder(tmp_path, pattern=3, **dirs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^ReIDFolder: camid_base must be >= 0, got -1$"):
        ReIDFolder(tmp_path, parser=lambda n: None, camid_base=-1, **dirs)
    with pytest.raises(TypeError, match=r"^ReIDFolder: query_dir must be a string, got 5$"):
        ReIDFolder(tmp_path, train_dir="tr", query_dir=5, gallery_dir="g", parser=lambda n: None)  # type: ignore[arg-type]


def test_build_dataset_registry(tmp_path: Path) -> None:
    assert set(DATASET_NAMES) == {
        "market1501",
        "dukemtmcreid",
        "cuhk03np-detected",
        "cuhk03np-labeled",
        "msmt17",
        "synthetic",
    }
    make_market(tmp_path)
    market = build_dataset("Market1501", tmp_path)
    synthetic = build_dataset("synthetic", tmp_path)
    assert isinstance(market, Market1501) and isinstance(synthetic, Market1501)
    assert market.train == synthetic.train and market.gallery == synthetic.gallery
    with pytest.raises(ValueError, match=r"unknown dataset 'viper'; choose one of market1501"):
        build_dataset("viper", tmp_path)
    with pytest.raises(FileNotFoundError, match="generate_synthetic_market"):
        build_dataset("synthetic", tmp_path / "missing")


# --- ImageDataset ---------------------------------------------------------------------------


def test_image_dataset_returns_tensor_pid_camid(tmp_path: Path) -> None:
    ds = Market1501(make_market(tmp_path))
    images = ImageDataset(ds.train)
    assert len(images) == 5
    image, pid, camid = images[3]
    assert image.shape == (3, 16, 8) and image.dtype == torch.float32
    assert (pid, camid) == (1, 5)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    # A grey PNG still comes back as 3-channel RGB.
    grey = tmp_path / "grey.png"
    Image.new("L", (5, 7), 128).save(grey)
    image, _, _ = ImageDataset([(str(grey), 4, 2)])[0]
    assert image.shape == (3, 7, 5)


def test_image_dataset_applies_the_transform_and_batches(tmp_path: Path) -> None:
    ds = Market1501(make_market(tmp_path))
    images = ImageDataset(ds.train, transform=lambda im: torch.full((3, 4, 2), float(im.width)))
    x, pids, camids = next(iter(DataLoader(images, batch_size=5)))
    assert x.shape == (5, 3, 4, 2) and bool((x == 8.0).all())
    assert pids.tolist() == [0, 0, 1, 1, 2] and camids.tolist() == [0, 1, 2, 5, 0]


def test_corrupt_or_truncated_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(OSError, match=r"cannot read image .*0001_c1s1_000001_00\.jpg"):
        ImageDataset([ReIDRecord(str(bad), 1, 0)])[0]
    good = tmp_path / "full.jpg"
    Image.new("RGB", (64, 128), (1, 2, 3)).save(good)
    truncated = tmp_path / "0002_c1s1_000002_00.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(OSError, match=r"cannot read image .*0002_c1s1_000002_00\.jpg"):
        ImageDataset([ReIDRecord(str(truncated), 2, 0)])[0]
    with pytest.raises(OSError, match=r"cannot read image .*missing\.jpg"):
        ImageDataset([ReIDRecord(str(tmp_path / "missing.jpg"), 2, 0)])[0]
