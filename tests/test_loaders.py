"""build_loader: the cache or a DataLoader, the same batches either way, the fallback notice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import lagnet.data.cached_loader as cached_loader
import lagnet.data.loaders as loaders
from lagnet import build_lagnet
from lagnet.data import (
    BatchTransform,
    CachedLoader,
    ImageCache,
    ImageDataset,
    PKSampler,
    ReIDDataset,
    ReIDRecord,
    build_dataset,
    build_loader,
    build_transforms,
    default_workers,
    generate_synthetic_market,
)
from lagnet.engine import evaluate
from lagnet.evaluation import extract_features
from lagnet.presets import SYNTHETIC_SIZES


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> ReIDDataset:
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate_synthetic_market(root, seed=0, **SYNTHETIC_SIZES["tiny"])
    return build_dataset("synthetic", root)


@pytest.fixture(scope="module")
def split(data: ReIDDataset) -> list[ReIDRecord]:
    return data.gallery


def batches(loader: object) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [tuple(b) for b in loader]  # type: ignore[attr-defined, misc]


def test_test_preset_is_the_same_with_and_without_the_cache(split: list[ReIDRecord]) -> None:
    lines: list[str] = []
    cached = build_loader(split, 64, 32, train=False, batch_size=8, cache="host", log=lines.append)
    plain = build_loader(split, 64, 32, train=False, batch_size=8, cache="off")
    assert isinstance(cached, CachedLoader) and isinstance(plain, DataLoader)
    assert len(cached) == len(plain) == 3  # 20 images: 8, 8, 4
    for (a, pa, ca), (b, pb, cb) in zip(batches(cached), batches(plain), strict=True):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        assert torch.equal(a, b)  # bit for bit
        assert torch.equal(pa, pb) and torch.equal(ca, cb)
    assert lines == [
        "image cache: 20 images at 64x32, 120.0 KiB uint8 on cpu, decoded in "
        + lines[0].split("decoded in ")[1]
    ]
    reference = build_transforms(64, 32, train=False)
    first = ImageDataset(split[:1], reference)[0][0]
    assert torch.equal(batches(cached)[0][0][0], first)


def test_training_loader_indexes_the_cache_with_the_pk_sampler(split: list[ReIDRecord]) -> None:
    records = [r._replace(pid=i % 4) for i, r in enumerate(split)]  # 4 ids x 5 images
    sampler = PKSampler([r.pid for r in records], 2, 3, seed=1)
    loader = build_loader(
        records, 64, 32, train=True, batch_size=6, sampler=sampler, cache="device", log=None,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert isinstance(loader, CachedLoader) and loader.sampler is sampler and loader.drop_last
    order = list(sampler)
    got = batches(loader)
    assert len(got) == len(loader) == 2
    pids = torch.cat([p for _, p, _ in got])
    assert pids.tolist() == [records[i].pid for i in order]
    # the batches are the sampler's images, augmented with draws from the given generator
    pixels = ImageCache([r.path for r in records], 64, 32, progress=False).images
    augment = BatchTransform(64, 32, train=True, generator=torch.Generator().manual_seed(5))
    for k, (images, _, _) in enumerate(got):
        expected = augment(pixels[order[6 * k : 6 * k + 6]])
        assert torch.equal(images, expected)
    plain = BatchTransform(64, 32, train=False)(pixels[order[:6]])
    assert not torch.equal(got[0][0], plain)  # flips or erasing changed the first batch


def test_cache_off_gets_dataloader_defaults(split: list[ReIDRecord]) -> None:
    loader = build_loader(split, 64, 32, train=False, batch_size=4, cache="off")
    assert isinstance(loader, DataLoader)
    assert loader.num_workers == 0 and not loader.pin_memory and not loader.persistent_workers
    assert not loader.drop_last
    loader = build_loader(split, 64, 32, train=True, batch_size=4, cache="off", workers=2)
    assert isinstance(loader, DataLoader)
    assert loader.num_workers == 2 and loader.persistent_workers
    assert loader.prefetch_factor == loaders.PREFETCH_FACTOR and loader.drop_last


def test_default_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loaders, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers("cpu") == 0
    assert default_workers("cuda") == loaders.MAX_DEFAULT_WORKERS == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers("cuda:1") == 3  # 16 cores / 4 ranks, one kept per rank
    monkeypatch.setattr(loaders, "usable_cores", lambda: 2)
    assert default_workers("cuda") == 1


def test_auto_falls_back_with_one_notice(
    split: list[ReIDRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cached_loader, "available_memory", lambda: 100_000)
    lines: list[str] = []
    loader = build_loader(split, 64, 32, train=False, batch_size=4, log=lines.append)
    assert isinstance(loader, DataLoader)
    assert lines == [
        "image cache off: 0.00 GiB does not fit in 0.5 of the available RAM (0.00 GiB); "
        "decoding with DataLoader workers instead"
    ]
    monkeypatch.setattr(cached_loader, "available_memory", lambda: 10**9)
    lines.clear()
    assert isinstance(build_loader(split, 64, 32, train=False, batch_size=4, log=lines.append),
                      CachedLoader)  # fmt: skip
    assert len(lines) == 1 and lines[0].startswith("image cache: 20 images")


def test_corrupt_images_are_all_named_before_any_batch(
    split: list[ReIDRecord], tmp_path: Path
) -> None:
    bad = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    bad[0].write_bytes(b"not a jpeg")
    bad[1].write_bytes(Path(split[0].path).read_bytes()[:200])  # truncated
    records = [*split[:3], ReIDRecord(str(bad[0]), 1, 0), ReIDRecord(str(bad[1]), 1, 1)]
    with pytest.raises(OSError, match=r"^2 of 5 images cannot be read") as info:
        build_loader(records, 64, 32, train=False, batch_size=4, cache="host", log=None)
    assert str(bad[0]) in str(info.value) and str(bad[1]) in str(info.value)


def test_bad_arguments(split: list[ReIDRecord]) -> None:
    with pytest.raises(ValueError, match=r"^cache must be one of \('auto', 'device', 'host', "):
        build_loader(split, 64, 32, train=False, batch_size=4, cache="gpu")
    with pytest.raises(ValueError, match="records is empty"):
        build_loader([], 64, 32, train=False, batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        build_loader(split, 64, 32, train=False, batch_size=0)
    with pytest.raises(TypeError, match="train must be a bool, got str"):
        build_loader(split, 64, 32, train="yes", batch_size=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers must be >= 0, got -1"):
        build_loader(split, 64, 32, train=False, batch_size=4, cache="off", workers=-1)


def test_extract_and_evaluate_take_records_and_a_cache_choice(
    data: ReIDDataset, split: list[ReIDRecord]
) -> None:
    torch.manual_seed(0)
    model = build_lagnet(8, backbone="resnet18", num_attentions=4).eval()
    loader = DataLoader(ImageDataset(split, build_transforms(64, 32, train=False)), batch_size=8)
    old = extract_features(model, loader, progress=False)
    for cache in ("host", "off"):
        new = extract_features(
            model, split, input_size=(64, 32), cache=cache, batch_size=8, progress=False
        )
        assert torch.equal(new.features, old.features), cache
        assert torch.equal(new.pids, old.pids) and torch.equal(new.camids, old.camids)
    with pytest.raises(ValueError, match=r"input_size=\(H, W\) is required"):
        extract_features(model, split, progress=False)
    query, gallery = data.query, data.gallery
    by_loader = evaluate(
        model,
        DataLoader(ImageDataset(query, build_transforms(64, 32, train=False)), batch_size=8),
        DataLoader(ImageDataset(gallery, build_transforms(64, 32, train=False)), batch_size=8),
    )
    by_records = evaluate(model, query, gallery, input_size=(64, 32), cache="host", batch_size=8)
    assert by_records.mAP == by_loader.mAP and by_records.mINP == by_loader.mINP
    assert (by_records.cmc == by_loader.cmc).all()
