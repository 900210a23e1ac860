"""Images/s of the data pipeline alone and of full training steps.

Two configurations: the demo preset of ``examples/train.py`` (ResNet-18 trunk, small input)
and the paper's ResNet-50 at 384x128; CPU, plus CUDA when present. The data pipeline is the
synthetic Market-format dataset read from disk through ``ImageDataset`` + the training
transforms + ``PKSampler`` (the demo's loader). The pipeline must outpace training.

    python benchmarks/bench_train.py [--root DIR] [--batches 10] [--steps 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_model import training_rate
from torch.utils.data import DataLoader

from lagnet.data import (
    ImageDataset,
    Market1501,
    PKSampler,
    build_transforms,
    generate_synthetic_market,
)

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"


def presets() -> dict[str, dict[str, Any]]:
    spec = importlib.util.spec_from_file_location("lagnet_example_train", TRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PRESETS  # type: ignore[no-any-return]


def pipeline_rate(root: Path, cfg: dict[str, Any], batches: int, workers: int) -> float:
    data = Market1501(root)
    tf = build_transforms(cfg["height"], cfg["width"], train=True)
    sampler = PKSampler([r.pid for r in data.train], cfg["P"], cfg["K"])
    loader = DataLoader(
        ImageDataset(data.train, tf), cfg["P"] * cfg["K"], sampler=sampler, num_workers=workers
    )
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            images, _, _ = next(it)
        except StopIteration:
            it = iter(loader)
            images, _, _ = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="synthetic dataset folder (generated if missing)")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--skip-resnet50", action="store_true")
    args = p.parse_args()
    root = Path(args.root or Path(tempfile.gettempdir()) / "lagnet-bench-synthetic")
    generate_synthetic_market(root)
    all_presets = presets()
    configs = {"demo": all_presets["demo"]}
    if not args.skip_resnet50:
        configs["resnet50 384x128"] = dict(all_presets["reference"], num_attentions=24)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"{torch.get_num_threads()} CPU threads, DataLoader workers: {args.workers}")
    for name, cfg in configs.items():
        data = pipeline_rate(root, cfg, args.batches, args.workers)
        line = f"{name:18s} data pipeline {data:8.1f} img/s"
        for device in devices:
            rate, _ = training_rate(
                device,
                backbone=cfg["backbone"],
                height=cfg["height"],
                width=cfg["width"],
                P=cfg["P"],
                K=cfg["K"],
                num_attentions=cfg["num_attentions"],
                num_classes=100,
                lr=cfg["lr"],
                steps=args.steps,
            )
            line += f" | training on {device.type} {rate:7.1f} img/s (pipeline {data / rate:.1f}x)"
        print(line)


if __name__ == "__main__":
    main()
