"""CachedLoader and choose_cache: batches equal the PIL path, sampler order, len, drop_last,
device placement, where a cache goes, argument checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lagnet.data import (
    BatchTransform,
    CachedLoader,
    ImageCache,
    PKSampler,
    build_transforms,
    choose_cache,
    read_image,
)
from lagnet.data import cached_loader as cl

H, W = 384, 128


@pytest.fixture(scope="module")
def crops(market_crops: list[str]) -> list[str]:
    return market_crops


@pytest.fixture(scope="module")
def small() -> ImageCache:
    """10 tiny images whose pixels name their index (image i is filled with i)."""
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 2)
    return ImageCache.from_tensor(images.contiguous())


def test_batches_equal_the_pil_test_preset(crops: list[str]) -> None:
    cache = ImageCache(crops, H, W, progress=False)
    pids = list(range(100, 100 + len(crops)))
    camids = [i % 2 for i in range(len(crops))]
    loader = CachedLoader(
        cache, pids, camids, batch_size=5, transform=BatchTransform(H, W, train=False)
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # 12 images: 5, 5, 2
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    images = torch.cat([b[0] for b in batches])
    pil = build_transforms(H, W, train=False)
    assert torch.equal(images, torch.stack([pil(read_image(p)) for p in crops]))
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.tensor(pids))
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.tensor(camids))
    assert all(b[1].dtype == torch.int64 and b[2].dtype == torch.int64 for b in batches)


def test_sampler_order_is_respected(small: ImageCache) -> None:
    order = [7, 2, 2, 9, 0, 4, 5]
    loader = CachedLoader(
        small,
        torch.arange(10) * 10,
        torch.arange(10) % 3,
        batch_size=3,
        transform=BatchTransform(4, 2, train=False),
        sampler=order,
    )
    assert len(loader) == 3
    batches = list(loader)
    # the test preset maps pixel value v of channel 0 to (v / 255 - 0.485) / 0.229
    first_pixel = torch.cat([b[0][:, 0, 0, 0] for b in batches])
    values = torch.tensor(order, dtype=torch.float32).div(255).sub(0.485).div(0.229)
    assert torch.equal(first_pixel, values)
    assert torch.cat([b[1] for b in batches]).tolist() == [10 * i for i in order]
    assert torch.cat([b[2] for b in batches]).tolist() == [i % 3 for i in order]


def test_drop_last_and_len(small: ImageCache) -> None:
    transform = BatchTransform(4, 2, train=True)
    keep = CachedLoader(small, [0] * 10, [0] * 10, batch_size=4, transform=transform)
    drop = CachedLoader(
        small, [0] * 10, [0] * 10, batch_size=4, transform=transform, drop_last=True
    )
    assert (len(keep), len(drop)) == (3, 2)
    assert [b[0].shape[0] for b in keep] == [4, 4, 2]
    assert [b[0].shape[0] for b in drop] == [4, 4]
    exact = CachedLoader(small, [0] * 10, [0] * 10, batch_size=5, transform=transform)
    assert len(exact) == 2 and len(list(exact)) == 2


def test_pk_sampler_indexes_the_cache(small: ImageCache) -> None:
    pids = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    sampler = PKSampler(pids, P=2, K=2, seed=0)
    loader = CachedLoader(
        small,
        pids,
        [0] * 10,
        batch_size=4,
        transform=BatchTransform(4, 2, train=True),
        sampler=sampler,
        drop_last=True,
    )
    assert len(loader) == len(sampler) // 4 == 2
    loader.set_epoch(3)
    assert sampler.epoch == 3
    expected = list(sampler)
    batches = list(loader)
    assert torch.cat([b[1] for b in batches]).tolist() == [pids[i] for i in expected]
    assert all(len(set(b[1].tolist())) == 2 for b in batches)  # P = 2 identities per batch


def test_train_batches_are_augmented(small: ImageCache) -> None:
    gen = torch.Generator().manual_seed(0)
    loader = CachedLoader(
        small,
        [0] * 10,
        [0] * 10,
        batch_size=10,
        transform=BatchTransform(4, 2, train=True, generator=gen),
    )
    (images, _, _) = next(iter(loader))
    test = BatchTransform(4, 2, train=False)(small.images)
    erased = (images == 0).all(dim=1)  # (B, H, W) pixels set to 0 in every channel
    assert bool(erased.any())
    assert torch.equal(images[~erased.any(dim=(1, 2))], test[~erased.any(dim=(1, 2))])


def test_device_placement(small: ImageCache, device: torch.device) -> None:
    transform = BatchTransform(4, 2, train=False)
    for source in (small, small.to(device, pin_memory=True)):
        loader = CachedLoader(
            source, [1] * 10, [2] * 10, batch_size=4, transform=transform, device=device
        )
        images, pids, camids = next(iter(loader))
        assert images.device.type == device.type and images.dtype == torch.float32
        assert pids.device.type == "cpu" and camids.device.type == "cpu"
        assert torch.equal(images.cpu(), transform(small.images[:4]))
    on_device = CachedLoader(
        small.to(device), [1] * 10, [2] * 10, batch_size=4, transform=transform
    )
    assert on_device.device.type == device.type
    assert next(iter(on_device))[0].device.type == device.type


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_never_sync(small: ImageCache) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    transform = BatchTransform(4, 2, train=True, generator=gen)
    for source in (small.to("cuda"), small.to("cpu", pin_memory=True)):
        loader = CachedLoader(
            source, [0] * 10, [0] * 10, batch_size=4, transform=transform, sampler=[3, 1, 4, 1, 5],
            device="cuda",
        )  # fmt: skip
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            batches = list(loader)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert [b[0].shape[0] for b in batches] == [4, 1]
        assert all(b[0].device.type == "cuda" for b in batches)


def test_bad_arguments(small: ImageCache) -> None:
    ok: dict[str, object] = {
        "cache": small,
        "pids": [0] * 10,
        "camids": [0] * 10,
        "batch_size": 4,
        "transform": BatchTransform(4, 2, train=False),
    }

    def make(**changes: object) -> CachedLoader:
        return CachedLoader(**{**ok, **changes})  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="cache must be an ImageCache, got Tensor"):
        make(cache=small.images)
    with pytest.raises(ValueError, match="transform is for 8x2 images but the cache holds 4x2"):
        make(transform=BatchTransform(8, 2, train=False))
    with pytest.raises(TypeError, match="transform must be a BatchTransform, got function"):
        make(transform=lambda x: x)
    with pytest.raises(ValueError, match=r"pids must have shape \(10,\), one per cached image"):
        make(pids=[0] * 9)
    with pytest.raises(TypeError, match="camids must hold integers, got dtype torch.float32"):
        make(camids=torch.zeros(10))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        make(batch_size=0)
    with pytest.raises(TypeError, match="drop_last must be a bool, got int"):
        make(drop_last=1)
    with pytest.raises(TypeError, match="sampler must be an iterable of indices, got int"):
        make(sampler=3)
    with pytest.raises(IndexError, match=r"index 10, outside the cache's 0..9"):
        list(make(sampler=[0, 10]))
    with pytest.raises(IndexError, match=r"index -1, outside the cache's 0..9"):
        list(make(sampler=[-1]))
    with pytest.raises(TypeError, match="has no len"):
        len(make(sampler=iter([1, 2])))


def test_choose_cache_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cl, "available_memory", lambda: 1000)
    assert choose_cache("off", 10, "cpu") == "off"
    assert choose_cache("host", 10**12, "cpu") == "host"
    assert choose_cache("device", 10, "cpu") == "host"  # a CPU device's memory is the host's
    assert choose_cache("device", 10**12, "cuda") == "device"  # asked for: not second-guessed
    assert choose_cache("auto", 500, "cpu") == "host"
    lines: list[str] = []
    assert choose_cache("auto", 501, "cpu", log=lines.append) == "off"
    assert lines == [
        "image cache off: 0.00 GiB does not fit in 0.5 of the available RAM (0.00 GiB); "
        "decoding with DataLoader workers instead"
    ]
    assert choose_cache("auto", 900, "cpu", ram_share=0.9) == "host"
    monkeypatch.setattr(cl, "available_memory", lambda: None)
    assert choose_cache("auto", 1, "cpu") == "off"


def test_choose_cache_auto_prefers_free_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cl, "available_memory", lambda: 10_000)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    assert choose_cache("auto", 500, "cuda") == "device"
    assert choose_cache("auto", 501, "cuda") == "host"  # over half the free GPU memory
    assert choose_cache("auto", 800, "cuda:0", gpu_share=0.8) == "device"
    assert choose_cache("auto", 500, "cpu") == "host"  # a CPU run never asks the GPU
    assert choose_cache("auto", 6000, "cuda") == "off"


def test_choose_cache_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"cache mode must be one of .*got 'gpu'"):
        choose_cache("gpu", 10, "cpu")
    with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
        choose_cache("auto", -1, "cpu")
    with pytest.raises(ValueError, match=r"gpu_share must be in \(0, 1\], got 1.5"):
        choose_cache("auto", 1, "cpu", gpu_share=1.5)
    with pytest.raises(ValueError, match=r"ram_share must be in \(0, 1\], got 0"):
        choose_cache("auto", 1, "cpu", ram_share=0)


def test_available_memory_reads_meminfo() -> None:
    available = cl.available_memory()
    assert available is not None and available > 0


@pytest.mark.slow
def test_bench_data_smoke_runs(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"
    out = tmp_path / "data.json"
    args = ["--images", "16", "--passes", "1", "--batch-size", "8", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("bench_data: 16 JPEG crops 128x64 -> 384x128, batch 8, torch ")
    saved = json.loads(out.read_text())
    settings = ["pil-workers-0", "pil-workers-1", "pil-workers-2", "cache-cpu"]
    if torch.cuda.is_available():
        settings += ["cache-cuda", "cache-pinned-cuda"]
    for preset in ("train", "test"):
        assert list(saved[preset]) == settings
        assert all(saved[preset][s] > 0 for s in settings)
        ratio = saved[preset]["cache-cpu"] / saved[preset]["pil-workers-0"]
        assert f"{preset}: cache-cpu / pil-workers-0 = {ratio:.2f}x" in done.stdout
    assert saved["cache-build"] > 0
