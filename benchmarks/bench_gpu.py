"""Training and eval throughput of the engine on the GPU: fp32, bf16 + channels_last, compiled.

One run on whatever GPU is present prints, for four settings (eager float32 with TF32 off;
eager bfloat16 + channels_last; compiled bf16 + channels_last without CUDA graphs; the same
with CUDA graphs, as ``TrainStep(compile=True)`` runs on CUDA):

- training img/s of a full :class:`lagnet.engine.TrainStep` (forward, the LAG-Net losses,
  backward, Adam with AMSGrad) and eval img/s (embedding forward), with ratios to float32;
- peak GPU memory; the GPU-busy fraction of a training step: CUDA kernel time per step from
  ``torch.profiler`` over the time per step of the timed, unprofiled steps (the profiler
  itself slows the host down);
- the worst per-sample cosine similarity of the embeddings to eager float32 (same weights);
- the loss of 50 training steps on the embedded synthetic set, eager float32 against
  compiled bf16 + channels_last from the same weights and batches, in means of 10 steps.

``--cpu-smoke`` runs the same code tiny on the CPU (ResNet-18, 64x32, one timed step; the
compiled settings trace the same full graphs with the ``eager`` backend there, inductor's code
generation taking minutes on a small CPU), so CI checks the script. ``--json`` and
``--profile`` keep the figures and the profiles' top operators.

    python benchmarks/bench_gpu.py                 # ResNet-50 384x128, batch 32 (8x4), eval 128
    python benchmarks/bench_gpu.py --cpu-smoke     # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lagnet import LAGNet, LAGNetLoss, build_lagnet
from lagnet._validation import check_positive_int
from lagnet.engine import AmpMode, TrainStep
from lagnet.evaluation.extract import autocast
from lagnet.presets import SYNTHETIC_SIZES


@dataclass(frozen=True)
class Setting:
    name: str
    amp: AmpMode | None
    channels_last: bool
    compile: bool
    mode: str | None = None


SETTINGS = (
    Setting("eager fp32", None, False, False),
    Setting("eager bf16+CL", "bf16", True, False),
    Setting("compiled bf16+CL", "bf16", True, True, "default"),
    Setting("graphs bf16+CL", "bf16", True, True, "reduce-overhead"),
)
"""Compiled without CUDA graphs (``mode="default"``), then with them (``"reduce-overhead"``,
what ``TrainStep(compile=True)`` uses on CUDA)."""


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
    synthetic: str  # the size of the synthetic set of the loss curve (lagnet.presets)


FULL = Config("resnet50", 384, 128, 8, 4, 128, 24, 751, 20, 5, 5, {}, "default")
SMOKE = Config("resnet18", 64, 32, 2, 2, 4, 4, 8, 1, 0, 1, {"backend": "eager"}, "tiny")


def compile_options(setting: Setting, cfg: Config) -> dict[str, Any]:
    """``torch.compile`` keywords of ``setting`` (``cfg``'s win: the smoke run's eager backend
    takes no mode)."""
    if "backend" in cfg.compile_options:
        return dict(cfg.compile_options)
    return {**({"mode": setting.mode} if setting.mode else {}), **cfg.compile_options}


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


def kernel_seconds(
    fn: Any, device: torch.device, steps: int, table: str | None = None, heading: str = ""
) -> float | None:
    """CUDA kernel seconds per call over ``steps`` profiled calls (``None`` on the CPU).

    ``table``: a file to append the profile's top operators to (by host time, then by GPU
    time), under ``heading``.
    """
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

    averages = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA)
    if table is not None:
        with open(table, "a") as f:
            f.write(f"== {heading}: {steps} steps, wall {wall * 1e3:.1f} ms (profiled), ")
            f.write(f"kernels {kernel_us / 1e3:.1f} ms\n")
            f.write(averages.table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
            f.write(averages.table(sort_by="self_device_time_total", row_limit=40) + "\n")
    return float(kernel_us) / 1e6 / steps


def train_rate(
    setting: Setting,
    cfg: Config,
    device: torch.device,
    table: str | None = None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> tuple[float, float | None, float | None, list[float]]:
    """img/s of training steps, the GPU-busy fraction, peak GPU memory in GiB, and the loss
    of each of ``batches``, trained first from the initial weights (the loss curve; the
    compiled step is then timed without compiling again)."""
    model = fresh_model(cfg, device).train()
    criterion = LAGNetLoss(cfg.num_classes, model.attention_dim).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=2e-4, weight_decay=5e-4, amsgrad=True, fused=device.type == "cuda"
    )
    step = TrainStep(
        model, criterion, optimizer, amp=setting.amp, channels_last=setting.channels_last,
        compile=setting.compile, compile_options=compile_options(setting, cfg),
    )  # fmt: skip
    curve = [float(step(x, y).loss) for x, y in batches]
    batch = cfg.P * cfg.K
    x = torch.randn(batch, 3, cfg.height, cfg.width, device=device)
    labels = torch.arange(cfg.P, device=device).repeat_interleave(cfg.K)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: step(x, labels), device, cfg.warmup, cfg.steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    kernels = kernel_seconds(
        lambda: step(x, labels), device, cfg.profile_steps, table, setting.name
    )
    busy = None if kernels is None else kernels / seconds  # the profiler slows the host down
    return batch / seconds, busy, peak, curve


def eval_model(setting: Setting, cfg: Config, device: torch.device) -> Any:
    model = fresh_model(cfg, device).eval()
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.embed(x.contiguous(memory_format=fmt))

    if setting.compile:
        embed = torch.compile(embed, fullgraph=True, dynamic=False, **compile_options(setting, cfg))

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


def synthetic_batches(cfg: Config, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` PK batches of the embedded synthetic set, with the training augmentation,
    drawn once (both runs of the loss curve see the same images)."""
    import tempfile

    from torch.utils.data import DataLoader

    from lagnet.data import ImageDataset, PKSampler, build_transforms
    from lagnet.data.datasets import Market1501
    from lagnet.data.synthetic import generate_synthetic_market

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        generate_synthetic_market(root, seed=0, **SYNTHETIC_SIZES[cfg.synthetic])
        data = Market1501(root)
        pids = [r.pid for r in data.train]
        if max(pids) >= cfg.num_classes:
            raise ValueError(f"the synthetic set has {max(pids) + 1} ids > {cfg.num_classes}")
        train = ImageDataset(data.train, build_transforms(cfg.height, cfg.width, train=True))
        loader = DataLoader(
            train, cfg.P * cfg.K, sampler=PKSampler(pids, cfg.P, cfg.K, seed=0), drop_last=True
        )
        batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        while len(batches) < count:
            batches += [(b[0], b[1]) for b in loader][: count - len(batches)]
    return batches


def print_curves(curves: dict[str, list[float]], window: int) -> float:
    """Both curves in means of ``window`` steps; returns the largest relative gap of a window."""
    (base_name, base), (name, other) = curves.items()
    print(f"loss, mean of each {window} steps: {base_name} | {name}")
    worst = 0.0
    for start in range(0, len(base), window):
        a = sum(base[start : start + window]) / len(base[start : start + window])
        b = sum(other[start : start + window]) / len(other[start : start + window])
        worst = max(worst, abs(a - b) / abs(a))
        print(f"  steps {start:3d}-{start + window - 1:3d}: {a:8.4f} | {b:8.4f}")
    print(f"largest relative gap of a window: {worst:.2%}")
    return worst


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU (for CI)")
    p.add_argument("--steps", type=int, help="timed steps per setting")
    p.add_argument("--compile-mode", help="torch.compile mode of every compiled setting")
    p.add_argument(
        "--settings", nargs="+", choices=[s.name for s in SETTINGS], metavar="NAME",
        help="the settings to run (default: all; eager fp32 always runs, as the reference)",
    )  # fmt: skip
    p.add_argument(
        "--curve-steps", type=int,
        help="steps of the loss curve, eager fp32 against compiled bf16+CL on the synthetic "
        "set (default 50; 3 with --cpu-smoke; 0 skips it)",
    )  # fmt: skip
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--profile", help="append each setting's profile tables to this file")
    args = p.parse_args(argv)
    cfg = SMOKE if args.cpu_smoke else FULL
    if args.steps is not None:
        cfg = Config(**{**cfg.__dict__, "steps": check_positive_int(args.steps, "--steps")})
    if args.compile_mode:
        cfg = Config(**{**cfg.__dict__, "compile_options": {"mode": args.compile_mode}})
    curve_steps = (3 if args.cpu_smoke else 50) if args.curve_steps is None else args.curve_steps
    if curve_steps < 0:
        p.error(f"--curve-steps must be >= 0, got {curve_steps}")
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        p.error("no CUDA GPU found; use --cpu-smoke to run the script tiny on the CPU")
    chosen = [s for s in SETTINGS if args.settings is None or s.name in args.settings]
    if chosen[0] is not SETTINGS[0]:
        chosen.insert(0, SETTINGS[0])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(
        f"{name}, torch {torch.__version__}: {cfg.backbone} {cfg.height}x{cfg.width}, train "
        f"batch {cfg.P * cfg.K} ({cfg.P}x{cfg.K}), eval batch {cfg.eval_batch}, "
        f"{cfg.steps} timed steps",
        flush=True,
    )
    print(
        f"{'setting':18s} {'train img/s':>11s} {'x fp32':>7s} {'eval img/s':>11s} {'x fp32':>7s} "
        f"{'GPU busy':>8s} {'peak GiB':>8s} {'min cos':>8s}",
        flush=True,
    )
    rows: dict[str, dict[str, float | None]] = {}
    curves: dict[str, list[float]] = {}
    pair = (SETTINGS[0], SETTINGS[2])  # the loss curve: eager fp32 against compiled bf16+CL
    batches = synthetic_batches(cfg, curve_steps) if curve_steps and SETTINGS[2] in chosen else []
    reference: torch.Tensor | None = None
    base_train = base_eval = 1.0
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "rows": rows}
    failed: list[str] = []

    def save() -> None:  # after every setting, so a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**result, "failed": failed}, f, indent=1)

    for setting in chosen:
        try:
            with tf32(False):
                t, busy, peak, curve = train_rate(
                    setting, cfg, device, args.profile, batches if setting in pair else []
                )
                e, emb, cos = eval_rate(setting, cfg, device, reference)
        except Exception as exc:  # report, and go on with the other settings
            if reference is None:
                raise
            traceback.print_exc()
            print(f"{setting.name:18s} FAILED: {type(exc).__name__}: {exc}"[:300], flush=True)
            failed.append(setting.name)
            save()
            continue
        if curve:
            curves[setting.name] = curve
        if reference is None:
            reference, base_train, base_eval = emb, t, e
        rows[setting.name] = {
            "train_img_s": t, "eval_img_s": e, "busy": busy, "peak_gib": peak, "min_cosine": cos,
        }  # fmt: skip
        print(
            f"{setting.name:18s} {t:11.1f} {t / base_train:7.2f} {e:11.1f} {e / base_eval:7.2f} "
            f"{'n/a' if busy is None else f'{busy:.0%}':>8s} "
            f"{'n/a' if peak is None else f'{peak:.2f}':>8s} "
            f"{'(ref)' if cos is None else f'{cos:.5f}':>8s}",
            flush=True,
        )
        if len(curves) == 2 and "curves" not in result:  # printed as soon as both ran
            result["curves"] = curves
            result["curve_gap"] = print_curves(curves, window=max(1, min(10, curve_steps)))
        save()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return rows


if __name__ == "__main__":
    main()
