"""Training and eval throughput of the engine on the GPU: fp32, bf16 + channels_last, compiled.

One run on whatever GPU is present prints, for eager float32 (TF32 off), eager bfloat16 +
channels_last and compiled bfloat16 + channels_last: training img/s (a full
:class:`lagnet.engine.TrainStep`: forward, the LAG-Net losses, backward, Adam with AMSGrad),
eval img/s (embedding forward), peak GPU memory, the GPU-busy fraction of a training step
(``torch.profiler``: CUDA kernel time over the wall time of the profiled steps), the cosine
similarity of each setting's embeddings to eager float32 (same weights), and ratios to eager
float32. ``--cpu-smoke`` runs the same code tiny on the CPU (ResNet-18, 64x32, one timed step;
the compiled setting traces the same full graphs with the ``eager`` backend there, inductor's
code generation taking minutes on a small CPU), so CI checks the script.

    python benchmarks/bench_gpu.py                 # ResNet-50 384x128, batch 32 (8x4), eval 128
    python benchmarks/bench_gpu.py --cpu-smoke     # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lagnet import LAGNet, LAGNetLoss, build_lagnet
from lagnet._validation import check_positive_int
from lagnet.engine import AmpMode, TrainStep
from lagnet.evaluation.extract import autocast


@dataclass(frozen=True)
class Setting:
    name: str
    amp: AmpMode | None
    channels_last: bool
    compile: bool


SETTINGS = (
    Setting("eager fp32", None, False, False),
    Setting("eager bf16+CL", "bf16", True, False),
    Setting("compiled bf16+CL", "bf16", True, True),
)


@dataclass(frozen=True)
class Config:
    backbone: str
    height: int
    width: int
    P: int
    K: int
    eval_batch: int
    num_attentions: int
    num_classes: int
    steps: int
    warmup: int
    profile_steps: int
    compile_options: dict[str, Any]


FULL = Config("resnet50", 384, 128, 8, 4, 128, 24, 751, 20, 5, 5, {})
SMOKE = Config("resnet18", 64, 32, 2, 2, 4, 4, 5, 1, 0, 1, {"backend": "eager"})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_model(cfg: Config, device: torch.device) -> LAGNet:
    torch.manual_seed(0)
    return build_lagnet(
        cfg.num_classes, backbone=cfg.backbone, num_attentions=cfg.num_attentions
    ).to(device)


def timed(fn: Any, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call after ``warmup`` calls (one sync at the end of the timed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def busy_fraction(fn: Any, device: torch.device, steps: int) -> float | None:
    """CUDA kernel time / wall time over ``steps`` profiled calls (``None`` on the CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = time.perf_counter() - start
    from torch.autograd import DeviceType  # type: ignore[attr-defined]

    kernel_us = sum(
        e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA
    )
    return float(kernel_us) / 1e6 / wall


def train_rate(
    setting: Setting, cfg: Config, device: torch.device
) -> tuple[float, float | None, float | None]:
    """img/s of training steps, the GPU-busy fraction, peak GPU memory in GiB."""
    model = fresh_model(cfg, device).train()
    criterion = LAGNetLoss(cfg.num_classes, model.attention_dim).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=2e-4, weight_decay=5e-4, amsgrad=True, fused=device.type == "cuda"
    )
    step = TrainStep(
        model, criterion, optimizer, amp=setting.amp, channels_last=setting.channels_last,
        compile=setting.compile, compile_options=cfg.compile_options,
    )  # fmt: skip
    batch = cfg.P * cfg.K
    x = torch.randn(batch, 3, cfg.height, cfg.width, device=device)
    labels = torch.arange(cfg.P, device=device).repeat_interleave(cfg.K)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: step(x, labels), device, cfg.warmup, cfg.steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    busy = busy_fraction(lambda: step(x, labels), device, cfg.profile_steps)
    return batch / seconds, busy, peak


def eval_model(setting: Setting, cfg: Config, device: torch.device) -> Any:
    model = fresh_model(cfg, device).eval()
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.embed(x.contiguous(memory_format=fmt))

    if setting.compile:
        embed = torch.compile(embed, fullgraph=True, dynamic=False, **cfg.compile_options)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(device, setting.amp):
            return embed(x).float()

    return run


def eval_rate(
    setting: Setting, cfg: Config, device: torch.device, reference: torch.Tensor | None
) -> tuple[float, torch.Tensor, float | None]:
    """img/s of eval forwards, the embeddings, and their worst per-sample cosine to fp32."""
    run = eval_model(setting, cfg, device)
    x = torch.randn(
        cfg.eval_batch, 3, cfg.height, cfg.width, device=device,
        generator=torch.Generator(device).manual_seed(1),
    )  # fmt: skip
    seconds = timed(lambda: run(x), device, cfg.warmup, cfg.steps)
    emb = run(x)
    cosine = None
    if reference is not None:
        cosine = float(F.cosine_similarity(emb, reference, dim=1).min())
    return cfg.eval_batch / seconds, emb, cosine


@contextlib.contextmanager
def tf32(enabled: bool) -> Any:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU (for CI)")
    p.add_argument("--steps", type=int, help="timed steps per setting")
    p.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune")
    args = p.parse_args(argv)
    cfg = SMOKE if args.cpu_smoke else FULL
    if args.steps is not None:
        cfg = Config(**{**cfg.__dict__, "steps": check_positive_int(args.steps, "--steps")})
    if args.compile_mode:
        cfg = Config(**{**cfg.__dict__, "compile_options": {"mode": args.compile_mode}})
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        p.error("no CUDA GPU found; use --cpu-smoke to run the script tiny on the CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(
        f"{name}, torch {torch.__version__}: {cfg.backbone} {cfg.height}x{cfg.width}, train "
        f"batch {cfg.P * cfg.K} ({cfg.P}x{cfg.K}), eval batch {cfg.eval_batch}, "
        f"{cfg.steps} timed steps"
    )
    rows: dict[str, dict[str, float | None]] = {}
    reference: torch.Tensor | None = None
    for setting in SETTINGS:
        with tf32(False):
            train, busy, peak = train_rate(setting, cfg, device)
            evl, emb, cosine = eval_rate(setting, cfg, device, reference)
        if reference is None:
            reference = emb
        rows[setting.name] = {
            "train_img_s": train, "eval_img_s": evl, "busy": busy, "peak_gib": peak,
            "min_cosine": cosine,
        }  # fmt: skip
    base = rows[SETTINGS[0].name]
    header = (
        f"{'setting':18s} {'train img/s':>11s} {'x fp32':>7s} {'eval img/s':>11s} {'x fp32':>7s} "
        f"{'GPU busy':>8s} {'peak GiB':>8s} {'min cos':>8s}"
    )
    print(header)
    base_train, base_eval = base["train_img_s"], base["eval_img_s"]
    assert base_train is not None and base_eval is not None
    for setting_name, row in rows.items():
        t, e = row["train_img_s"], row["eval_img_s"]
        assert t is not None and e is not None
        busy, peak, cos = row["busy"], row["peak_gib"], row["min_cosine"]
        print(
            f"{setting_name:18s} {t:11.1f} {t / base_train:7.2f} {e:11.1f} {e / base_eval:7.2f} "
            f"{'n/a' if busy is None else f'{busy:.0%}':>8s} "
            f"{'n/a' if peak is None else f'{peak:.2f}':>8s} "
            f"{'(ref)' if cos is None else f'{cos:.5f}':>8s}"
        )
    return rows


if __name__ == "__main__":
    main()
