"""Images per second delivered to the training step and to the forward, end to end.

    python benchmarks/bench_data.py                      # 600 crops, one torch thread
    python benchmarks/bench_data.py --images 2000 --json data.json

Writes a Market-format folder of JPEG crops at Market-1501's size (128x64, the synthetic
generator) into a temporary folder, then measures, for the training and the test presets at
384x128, batches of 32 fully materialised where the step would use them:

- ``pil-workers-0/1/2``: ``DataLoader(ImageDataset(records, build_transforms(...)))`` with 0, 1
  and 2 worker processes (what ``lagnet train/evaluate`` did before the image cache);
- ``cache-cpu``: an :class:`~lagnet.data.ImageCache` in host memory and a
  :class:`~lagnet.data.CachedLoader` with :class:`~lagnet.data.BatchTransform` on the CPU;
- ``cache-cuda`` (CUDA only): the cache on the GPU, the batch augmented there;
  ``cache-pinned-cuda``: the cache in pinned host memory, batches sent to the GPU;
- ``cache-build``: decoding and resizing every image into the cache (all usable cores).

The main comparison runs with ``torch.set_num_threads(--threads)`` (1 by default, as the issue
measured). Each setting runs one warm-up pass over the images, then ``--passes`` rounds time
one pass of every setting in turn (a shared machine's changing load hits all settings alike);
the median pass is reported. Ratios are of figures measured in this same run. ``--json FILE``
writes ``{"train": {setting: img/s}, "test": {...}, "cache-build": img/s}``; a setting that
cannot run here (CUDA without a GPU) is left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lagnet.data import (
    BatchTransform,
    CachedLoader,
    ImageCache,
    ImageDataset,
    ReIDRecord,
    build_dataset,
    build_transforms,
    generate_synthetic_market,
)

HEIGHT, WIDTH = 384, 128
TARGETS = {"train": 2.5, "test": 5.0}  # cache-cpu / pil-workers-0, issue 15


def write_crops(root: Path, count: int) -> list[ReIDRecord]:
    """``count`` training crops (128x64 JPEGs) of a synthetic Market-format folder."""
    per_id = 2 * 4  # images_per_id_per_cam x num_cameras
    generate_synthetic_market(
        root,
        num_train_ids=max(2, math.ceil(count / per_id)),
        num_test_ids=2,
        images_per_id_per_cam=2,
        num_cameras=4,
        num_distractors=0,
        num_junk=0,
        height=128,
        width=64,
    )
    records = build_dataset("synthetic", root).train
    return records[:count]


def count_pass(loader: Iterable[Any], sync: bool) -> float:
    """Images per second of one full pass over ``loader``."""
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += int(batch[0].shape[0])
    if sync:
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def interleaved(loaders: dict[str, tuple[Iterable[Any], bool]], passes: int) -> dict[str, float]:
    """Median img/s of each loader: one warm-up pass each, then ``passes`` rounds that run every
    loader once in turn, so that a change in the machine's load hits all settings alike."""
    for loader, sync in loaders.values():
        count_pass(loader, sync)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(passes):
        for name, (loader, sync) in loaders.items():
            rates[name].append(count_pass(loader, sync))
    return {name: statistics.median(r) for name, r in rates.items()}


def pil_loader(
    records: list[ReIDRecord], train: bool, workers: int, order: list[int] | None, batch: int
) -> DataLoader[Any]:
    dataset = ImageDataset(records, build_transforms(HEIGHT, WIDTH, train=train))
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=order,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600, help="crops to write (default 600)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per setting")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.images < 1 or args.threads < 1 or args.passes < 1 or args.batch_size < 1:
        parser.error("--images, --threads, --passes and --batch-size must be >= 1")
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {"train": {}, "test": {}}

    with tempfile.TemporaryDirectory() as tmp:
        records = write_crops(Path(tmp) / "market", args.images)
        n = len(records)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        device_name = torch.cuda.get_device_name() if cuda else "no CUDA"
        print(
            f"bench_data: {n} JPEG crops 128x64 -> {HEIGHT}x{WIDTH}, batch {args.batch_size}, "
            f"torch {torch.__version__}, {args.threads} torch thread(s), {cores} usable cores, "
            f"{device_name}; median of {args.passes} passes"
        )
        paths = [r.path for r in records]
        pids = [r.pid for r in records]
        camids = [r.camid for r in records]
        start = time.perf_counter()
        cache = ImageCache(paths, HEIGHT, WIDTH, progress=False)
        results["cache-build"] = n / (time.perf_counter() - start)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()

        for preset in ("train", "test"):
            train = preset == "train"
            sampler = order if train else None
            loaders: dict[str, tuple[Iterable[Any], bool]] = {}
            for workers in (0, 1, 2):
                loader = pil_loader(records, train, workers, sampler, args.batch_size)
                loaders[f"pil-workers-{workers}"] = (loader, False)
            settings: list[tuple[str, ImageCache, torch.device]] = [
                ("cache-cpu", cache, torch.device("cpu"))
            ]
            if cuda:
                gpu = torch.device("cuda")
                settings += [
                    ("cache-cuda", cache.to(gpu), gpu),
                    ("cache-pinned-cuda", cache.to("cpu", pin_memory=True), gpu),
                ]
            for name, source, device in settings:
                generator = torch.Generator(device=device).manual_seed(0)
                transform = BatchTransform(HEIGHT, WIDTH, train=train, generator=generator)
                cached = CachedLoader(
                    source,
                    pids,
                    camids,
                    batch_size=args.batch_size,
                    transform=transform,
                    sampler=sampler,
                    device=device,
                )
                loaders[name] = (cached, device.type == "cuda")
            results[preset] = interleaved(loaders, args.passes)
            del loaders

    names = list(results["train"])
    print(f"{'setting':<20}{'train img/s':>12}{'test img/s':>12}")
    for name in names:
        print(f"{name:<20}{results['train'][name]:>12,.0f}{results['test'][name]:>12,.0f}")
    if not cuda:
        print(f"{'cache-cuda':<20}{'(no CUDA)':>12}{'(no CUDA)':>12}")
    print(f"cache build: {results['cache-build']:,.0f} img/s ({cores} decoding threads)")
    for preset, target in TARGETS.items():
        ratio = results[preset]["cache-cpu"] / results[preset]["pil-workers-0"]
        verdict = "met" if ratio >= target else "NOT met"
        print(
            f"{preset}: cache-cpu / pil-workers-0 = {ratio:.2f}x (target >= {target:g}x, {verdict})"
        )
    if cuda:
        for preset in ("train", "test"):
            ratio = results[preset]["cache-cuda"] / results[preset]["pil-workers-0"]
            print(f"{preset}: cache-cuda / pil-workers-0 = {ratio:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
