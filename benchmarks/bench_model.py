"""Training-step and eval throughput (images/s) of build_lagnet() at 384x128.

CPU always; CUDA too when present (the engine's default AMP, bf16 or fp16, + channels_last
there). Prints one line per setting and the eval/training ratio measured in the same run.

    python benchmarks/bench_model.py [--backbone resnet50] [--batch 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import time
from typing import Literal

import torch

from lagnet import LAGNetLoss, build_lagnet
from lagnet.engine import AmpMode, TrainStep, default_amp
from lagnet.evaluation.extract import autocast


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_rate(
    device: torch.device,
    *,
    backbone: str,
    height: int,
    width: int,
    P: int = 8,
    K: int = 4,
    num_attentions: int = 24,
    variant: str = "paper",
    num_classes: int = 751,
    lr: float = 2e-4,
    steps: int = 3,
    eval_too: bool = False,
    amp: AmpMode | Literal["default"] | None = "default",
    compile: bool = False,
) -> tuple[float, float]:
    """Best images/s of full :class:`~lagnet.engine.TrainStep` steps (and of eval forwards
    when ``eval_too``). ``amp="default"``: :func:`~lagnet.engine.default_amp` of the device;
    channels_last on CUDA."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    precision = default_amp(device) if amp == "default" else amp
    model = build_lagnet(
        num_classes, backbone=backbone, variant=variant, num_attentions=num_attentions
    ).to(device)
    loss_fn = LAGNetLoss(num_classes, model.attention_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True, fused=cuda)
    step = TrainStep(model, loss_fn, opt, amp=precision, channels_last=cuda, compile=compile)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    batch = P * K
    x = torch.randn(batch, 3, height, width, device=device).contiguous(memory_format=fmt)
    labels = torch.arange(P, device=device).repeat_interleave(K)

    def train_step() -> None:
        step(x, labels)

    def eval_step() -> None:
        with torch.inference_mode(), autocast(device, precision):
            model.embed(x)

    rates = []
    for mode, fn in (("train", train_step), ("eval", eval_step)):
        if mode == "eval" and not eval_too:
            rates.append(float("nan"))
            break
        model.train(mode == "train")
        fn()  # warm-up (and compilation)
        sync(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        rates.append(batch / min(times))
    return rates[0], rates[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--variant", default="paper", choices=["paper", "reference"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cpu-only", action="store_true")
    args = p.parse_args()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    print(
        f"build_lagnet(backbone={args.backbone!r}, variant={args.variant!r}), "
        f"batch {args.batch} at {args.height}x{args.width}"
    )
    for device in devices:
        train, evl = training_rate(
            device,
            backbone=args.backbone,
            variant=args.variant,
            height=args.height,
            width=args.width,
            P=args.batch // 4,
            steps=args.steps,
            eval_too=True,
        )
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        extra = " (AMP + channels_last)" if device.type == "cuda" else ""
        print(
            f"  {name}{extra}, {torch.get_num_threads()} threads: training {train:8.1f} img/s"
            f"   eval {evl:8.1f} img/s   eval/train {evl / train:.2f}x"
        )


if __name__ == "__main__":
    main()
