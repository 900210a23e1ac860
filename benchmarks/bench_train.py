"""Images/s of the data pipeline alone and of full training steps.

Two configurations: the demo preset of ``lagnet train`` (ResNet-18 trunk, small input) and
the paper's ResNet-50 at 384x128; CPU, plus CUDA when present. The data pipeline is the
synthetic Market-format dataset read from disk through ``ImageDataset`` + the training
transforms + ``PKSampler`` (the demo's loader). The pipeline must outpace training.

    python benchmarks/bench_train.py [--root DIR] [--batches 10] [--steps 3]
    python benchmarks/bench_train.py --compare-compile   # eager vs torch.compile'd step (float32)

``--compare-compile`` times the demo preset's float32 :class:`~lagnet.engine.TrainStep` eager
and with ``compile=True`` (inductor) on each device, with the compilation time, so the default
(compile off on the CPU) can be checked against this machine.
"""

from __future__ import annotations

import argparse
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
from lagnet.presets import PRESETS


def presets() -> dict[str, dict[str, Any]]:
    return PRESETS


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


def compare_compile(cfg: dict[str, Any], steps: int) -> None:
    """Float32 training img/s of the eager and the compiled step, and the compile time."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    shape = dict(backbone=cfg["backbone"], height=cfg["height"], width=cfg["width"])
    print(f"demo preset {shape}, batch {cfg['P']}x{cfg['K']}, {torch.get_num_threads()} threads")
    for device in devices:
        rates = {}
        for compile in (False, True):
            start = time.perf_counter()
            rates[compile], _ = training_rate(
                device, **shape, P=cfg["P"], K=cfg["K"], num_attentions=cfg["num_attentions"],
                num_classes=100, lr=cfg["lr"], steps=steps, amp=None, compile=compile,
            )  # fmt: skip
            total = time.perf_counter() - start
            print(
                f"  {device.type} {'compiled' if compile else 'eager   '} fp32: "
                f"{rates[compile]:7.1f} img/s (whole run incl. warm-up/compile {total:.0f} s)"
            )
        print(f"  {device.type} compiled / eager: {rates[True] / rates[False]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="synthetic dataset folder (generated if missing)")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--skip-resnet50", action="store_true")
    p.add_argument("--compare-compile", action="store_true", help="eager vs compiled step only")
    args = p.parse_args()
    if args.compare_compile:
        compare_compile(presets()["demo"], args.steps)
        return
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
