"""ImageCache: decoded pixels equal the PIL path's, one error for every unreadable file, the
memory-mapped disk cache and its invalidation, argument checks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lagnet.data import ImageCache, read_image

H, W = 384, 128


@pytest.fixture(scope="module")
def crops(market_crops: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Real JPEG crops (128x64) from the synthetic Market writer, plus a PNG and a grey JPEG."""
    paths = market_crops
    extra = tmp_path_factory.mktemp("extra")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 31, 3), dtype=np.uint8)).save(extra / "odd.png")
    Image.fromarray(rng.integers(0, 256, (90, 45), dtype=np.uint8)).save(extra / "grey.jpg")
    return [*paths, str(extra / "odd.png"), str(extra / "grey.jpg")]


def pil_pixels(path: str, height: int, width: int) -> torch.Tensor:
    """What build_transforms' first op (Resize, bicubic) hands to ToTensor, as uint8 CHW."""
    resized = T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC)(read_image(path))
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def test_pixels_equal_the_pil_path(crops: list[str]) -> None:
    cache = ImageCache(crops, H, W, workers=2, progress=False)
    assert cache.images.shape == (len(crops), 3, H, W)
    assert cache.images.dtype == torch.uint8 and cache.images.is_contiguous()
    for i, path in enumerate(crops):
        assert torch.equal(cache.images[i], pil_pixels(path, H, W)), path
    assert len(cache) == len(crops) and cache.paths == crops
    assert cache.nbytes == len(crops) * 3 * H * W == ImageCache.estimate_nbytes(len(crops), H, W)
    assert cache.source == "decoded" and cache.file is None


def test_thread_count_does_not_change_the_result(crops: list[str]) -> None:
    one = ImageCache(crops, 40, 24, workers=1, progress=False)
    three = ImageCache(crops, 40, 24, workers=3, progress=False)
    assert torch.equal(one.images, three.images)
    assert torch.equal(one.images[-1], pil_pixels(crops[-1], 40, 24))


def test_progress_bar_and_log(crops: list[str]) -> None:
    lines: list[str] = []
    cache = ImageCache(crops[:3], 32, 16, progress=True, log=lines.append)
    assert len(lines) == 1
    assert lines[0].startswith("image cache: 3 images at 32x16, 4.5 KiB uint8 on cpu, decoded in")
    assert lines[0] == cache.summary()
    assert repr(cache) == "ImageCache(3 images, 32x16, 4.5 KiB on cpu)"


def test_every_unreadable_file_is_named_in_one_error(crops: list[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    paths = [crops[0], str(broken), crops[1], str(empty), str(missing)]
    with pytest.raises(OSError) as info:
        ImageCache(paths, 16, 8, progress=False)
    message = str(info.value)
    assert message.startswith("3 of 5 images cannot be read")
    for bad in (broken, empty, missing):
        assert repr(str(bad)) in message
    assert crops[0] not in message


def test_many_unreadable_files_show_ten_and_a_count(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"gone{i:02d}.jpg") for i in range(13)]
    with pytest.raises(OSError, match=r"13 of 13 images") as info:
        ImageCache(paths, 16, 8, progress=False)
    message = str(info.value)
    assert all(p in message for p in paths[:10])
    assert paths[10] not in message and message.endswith("... and 3 more")


def test_disk_cache_is_written_then_memory_mapped(crops: list[str], tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "nested"
    first = ImageCache(crops, 48, 24, progress=False, cache_dir=folder)
    assert first.source == "decoded" and first.file is not None
    assert first.file.parent == folder and first.file.stat().st_size == first.nbytes
    assert [p.name for p in folder.iterdir()] == [first.file.name]  # no temporary left
    second = ImageCache(crops, 48, 24, progress=False, cache_dir=folder)
    assert second.source == "disk" and second.file == first.file
    assert torch.equal(second.images, first.images)
    assert "loaded from" in second.summary()
    if Path("/proc/self/maps").exists():
        assert str(first.file) in Path("/proc/self/maps").read_text()
    # writes go to a private copy, never to the file
    before = first.file.read_bytes()
    second.images[0].fill_(7)
    assert first.file.read_bytes() == before


def test_disk_cache_key_covers_files_and_size(crops: list[str], tmp_path: Path) -> None:
    paths = []
    for i, src in enumerate(crops[:4]):
        dst = tmp_path / f"img{i}.jpg"
        dst.write_bytes(Path(src).read_bytes())
        paths.append(str(dst))
    folder = tmp_path / "cache"
    first = ImageCache(paths, 32, 16, progress=False, cache_dir=folder)
    other_size = ImageCache(paths, 32, 24, progress=False, cache_dir=folder)
    fewer = ImageCache(paths[:3], 32, 16, progress=False, cache_dir=folder)
    assert len({first.file, other_size.file, fewer.file}) == 3
    # a file replaced by another image (new content, new modification time) invalidates it
    Path(paths[1]).write_bytes(Path(crops[5]).read_bytes())
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = ImageCache(paths, 32, 16, progress=False, cache_dir=folder)
    assert changed.source == "decoded" and changed.file != first.file
    assert torch.equal(changed.images[1], pil_pixels(crops[5], 32, 16))
    assert torch.equal(changed.images[0], first.images[0])


def test_truncated_cache_file_is_rebuilt(crops: list[str], tmp_path: Path) -> None:
    first = ImageCache(crops[:2], 32, 16, progress=False, cache_dir=tmp_path)
    assert first.file is not None
    first.file.write_bytes(b"\0" * 10)
    again = ImageCache(crops[:2], 32, 16, progress=False, cache_dir=tmp_path)
    assert again.source == "decoded" and torch.equal(again.images, first.images)
    assert again.file is not None and again.file.stat().st_size == again.nbytes


def test_unwritable_cache_dir_warns_and_keeps_the_images(crops: list[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="could not save the image cache"):
        cache = ImageCache(crops[:2], 32, 16, progress=False, cache_dir=blocker / "sub")
    assert cache.file is None and torch.equal(cache.images[0], pil_pixels(crops[0], 32, 16))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"height": 0}, ValueError, "height must be >= 1, got 0"),
        ({"width": -3}, ValueError, "width must be >= 1, got -3"),
        ({"height": 32.0}, TypeError, r"height must be an int, got float \(32.0\)"),
        ({"workers": 0}, ValueError, "workers must be >= 1, got 0"),
        ({"workers": True}, TypeError, "workers must be an int, got bool"),
        ({"paths": []}, ValueError, "paths is empty"),
        ({"paths": "a.jpg"}, TypeError, "paths must be a sequence of file paths, got str"),
        ({"paths": ["a.jpg", 3]}, TypeError, r"paths\[1\] must be a str or os.PathLike, got int"),
        ({"cache_dir": 5}, TypeError, "cache_dir must be a path or None, got int"),
        ({"progress": 1}, TypeError, r"progress must be a bool, got int \(1\)"),
        ({"pin_memory": "yes"}, TypeError, "pin_memory must be a bool, got str"),
    ],
)
def test_bad_arguments(
    crops: list[str], kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"paths": crops[:1], "height": 32, "width": 16, "progress": False}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ImageCache(**args)  # type: ignore[arg-type]


def test_estimate_nbytes_checks_its_arguments() -> None:
    assert ImageCache.estimate_nbytes(12936, 384, 128) == 12936 * 147_456 == 1_907_490_816
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        ImageCache.estimate_nbytes(0, 384, 128)


def test_from_tensor_and_to(device: torch.device) -> None:
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.int64).remainder(256).to(torch.uint8)
    cache = ImageCache.from_tensor(images.view(2, 3, 4, 5), ["a", "b"])
    assert cache.source == "tensor" and (cache.height, cache.width) == (4, 5)
    assert cache.to("cpu") is cache
    moved = cache.to(device)
    assert moved.device.type == device.type and moved.paths == ["a", "b"]
    assert torch.equal(moved.images.cpu(), cache.images)
    pinned = cache.to("cpu", pin_memory=True)
    assert pinned.images.is_pinned() == torch.cuda.is_available()
    assert torch.equal(pinned.images, cache.images)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) uint8 tensor, got dtype torch.float32"):
        ImageCache.from_tensor(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="paths has 1 entries but images holds 2 images"):
        ImageCache.from_tensor(images.view(2, 3, 4, 5), ["a"])


def test_interrupt_stops_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from lagnet.data import image_cache

    calls: list[str] = []

    def fake_read(path: str) -> Image.Image:
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        time.sleep(0.01)
        raise OSError(f"cannot read image {path!r}: fake")

    monkeypatch.setattr(image_cache, "read_image", fake_read)
    with pytest.raises(KeyboardInterrupt):
        ImageCache([f"img{i}.jpg" for i in range(200)], 8, 4, workers=1, progress=False)
    assert len(calls) < 20  # the images not started were dropped, not decoded


def test_pin_memory_decodes_into_pinned_memory(crops: list[str], tmp_path: Path) -> None:
    plain = ImageCache(crops[:3], 32, 16, progress=False, cache_dir=tmp_path)
    pinned = ImageCache(crops[:3], 32, 16, progress=False, pin_memory=True)
    loaded = ImageCache(crops[:3], 32, 16, progress=False, pin_memory=True, cache_dir=tmp_path)
    assert loaded.source == "disk"
    for cache in (pinned, loaded):  # pinning needs CUDA; without it the memory stays pageable
        assert cache.images.is_pinned() == torch.cuda.is_available()
        assert torch.equal(cache.images, plain.images)
        assert cache.to("cpu", pin_memory=True) is cache
