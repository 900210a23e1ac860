"""``lagnet train``: checked settings, the pieces of a training run, and the run itself.

``examples/train.py`` is the short, readable version of :func:`run_training`, built on the same
pieces (:func:`add_train_arguments`, :func:`config_from_args`, :func:`load_training_data`,
:func:`build_training`, :class:`~lagnet.runs.RunFolder` and :mod:`lagnet.engine`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lagnet._validation import (
    check_choice,
    check_float,
    check_nonnegative_int,
    check_positive_int,
)
from lagnet.backbones import BACKBONES
from lagnet.cli._common import (
    ALL_DATASETS,
    check_pattern,
    describe_missing,
    load_dataset,
    rank_metrics,
)
from lagnet.data import (
    DistributedPKSampler,
    ImageDataset,
    PKSampler,
    ReIDDataset,
    build_transforms,
    color_histogram_features,
    generate_synthetic_market,
)
from lagnet.evaluation import evaluate_features
from lagnet.losses import LAGNetLoss
from lagnet.model import VARIANTS, LAGNet, build_lagnet
from lagnet.presets import PRESETS, SYNTHETIC_SIZES
from lagnet.runs import RunFolder, resolve_device

if TYPE_CHECKING:
    from lagnet.engine import NonFiniteLossError

__all__ = [
    "FIXED_KEYS",
    "TrainConfig",
    "TrainingParts",
    "TrainingStopped",
    "add_train_arguments",
    "build_training",
    "checkpoint_of",
    "config_from_args",
    "histogram_baseline",
    "init_distributed",
    "is_main",
    "load_training_data",
    "plot_curves",
    "rank_metrics",
    "read_back_interval",
    "restore",
    "run_summary",
    "run_training",
    "summary_table",
]

FIXED_KEYS: tuple[str, ...] = (
    "dataset",
    "synthetic",
    "pattern",
    "camid_base",
    "seed",
    "variant",
    "backbone",
    "num_attentions",
    "height",
    "width",
    "P",
    "K",
    "lr",
    "weight_decay",
    "milestones",
    "warmup",
)
"""Settings a ``--resume`` may not change; the others (epochs, device, workers, amp, ...) may."""


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, checked; recorded as the run's ``config.json``."""

    preset: str
    dataset: str
    root: str
    pattern: str | None
    camid_base: int
    output: str
    epochs: int
    eval_every: int
    seed: int
    variant: str
    backbone: str
    backbone_weights: str | None
    num_attentions: int
    height: int
    width: int
    P: int
    K: int
    lr: float
    weight_decay: float
    milestones: list[int]
    warmup: int
    synthetic: str
    device: str
    workers: int
    progress: bool
    amp: str
    compile: bool
    channels_last: bool

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict."""
        return dataclasses.asdict(self)

    @property
    def amp_mode(self) -> Any:
        """``"bf16"``, ``"fp16"`` or ``None`` (the engine's ``amp`` argument)."""
        return None if self.amp == "off" else self.amp


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the training flags (shared by ``lagnet train`` and ``examples/train.py``)."""
    p = parser
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="demo",
        help="the settings every other flag overrides (default: demo)",
    )
    p.add_argument("--dataset", help=f"one of {', '.join(ALL_DATASETS)} (preset default)")
    p.add_argument("--root", help="dataset folder (synthetic: where to write it)")
    p.add_argument("--pattern", help="--dataset folder: regex with named groups pid and camid")
    p.add_argument(
        "--camid-base",
        type=int,
        default=1,
        help="--dataset folder: the camera number of the first camera (default 1)",
    )
    p.add_argument("--output", help="run folder (default runs/PRESET)")
    p.add_argument("--epochs", type=int, help="number of epochs (a resume may raise it)")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT/last.pth")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="move an earlier run's files aside into OUTPUT/previous-<time>/",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=list(VARIANTS), default="paper")
    p.add_argument("--backbone", help="torchvision ResNet name (preset default otherwise)")
    p.add_argument("--backbone-weights", help="local torchvision ImageNet state dict")
    p.add_argument("--num-attentions", type=int, help="attention maps K kept by the LAS")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--ids-per-batch", type=int, dest="P", help="identities per batch (P)")
    p.add_argument("--images-per-id", type=int, dest="K", help="images per identity (K)")
    p.add_argument("--lr", type=float, help="learning rate of Adam")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--amp",
        choices=["bf16", "fp16", "off"],
        help="mixed precision (default: bf16 on a capable GPU, off on the CPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on for CUDA)",
    )


def _cache_root(synthetic: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lagnet"
    return cache / f"synthetic-{synthetic}"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Fill the preset's defaults into ``args`` and check every value; reads and writes no file
    except to look at ``--root`` and ``--backbone-weights``.

    Raises:
        ValueError / TypeError: a value out of range, naming the flag and the value.
        FileNotFoundError: ``--root`` or ``--backbone-weights`` does not exist.
    """
    preset = PRESETS[check_choice(args.preset, "--preset", sorted(PRESETS))]

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return preset[name] if value is None else value

    height, width = args.input_size or (preset["height"], preset["width"])
    dataset = str(pick("dataset")).lower()
    check_choice(dataset, "--dataset", ALL_DATASETS)
    pattern = args.pattern
    if dataset == "folder":
        if pattern is None:
            raise ValueError("--dataset folder needs --pattern (named groups pid and camid)")
        check_pattern(pattern)
    elif pattern is not None:
        raise ValueError(f"--pattern is for --dataset folder only, not for --dataset {dataset}")
    root = args.root
    if root is None:
        if dataset != "synthetic":
            raise ValueError(f"--root is required for --dataset {dataset}")
        root = _cache_root(preset["synthetic"])
    root = Path(root).expanduser()
    if dataset != "synthetic" and not root.is_dir():
        raise FileNotFoundError(f"--root {str(root)!r} does not exist or is not a folder")
    weights = args.backbone_weights
    if weights is not None and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"--backbone-weights {weights!r}: no such file")
    device = resolve_device(args.device)
    channels_last = args.channels_last
    if channels_last is None:
        channels_last = device.type == "cuda"
    config = TrainConfig(
        preset=args.preset,
        dataset=dataset,
        root=str(root),
        pattern=pattern,
        camid_base=check_nonnegative_int(args.camid_base, "--camid-base"),
        output=str(Path(args.output or Path("runs") / args.preset).expanduser()),
        epochs=check_positive_int(pick("epochs"), "--epochs"),
        eval_every=check_positive_int(pick("eval_every"), "--eval-every"),
        seed=check_nonnegative_int(args.seed, "--seed"),
        variant=check_choice(args.variant, "--variant", VARIANTS),
        backbone=check_choice(pick("backbone"), "--backbone", BACKBONES),
        backbone_weights=weights,
        num_attentions=check_positive_int(pick("num_attentions"), "--num-attentions"),
        height=check_positive_int(height, "--input-size H"),
        width=check_positive_int(width, "--input-size W"),
        P=check_positive_int(pick("P"), "--ids-per-batch"),
        K=check_positive_int(pick("K"), "--images-per-id"),
        lr=check_float(pick("lr"), "--lr", low=0.0, low_open=True),
        weight_decay=check_float(preset["weight_decay"], "weight_decay", low=0.0),
        milestones=[check_positive_int(m, "milestone") for m in preset["milestones"]],
        warmup=check_nonnegative_int(preset["warmup"], "warmup"),
        synthetic=preset["synthetic"],
        device=str(device),
        workers=check_nonnegative_int(args.workers, "--workers"),
        progress=not args.no_progress,
        amp=args.amp or "off",
        compile=bool(args.compile),
        channels_last=bool(channels_last),
    )
    if config.K < 2:
        raise ValueError(
            f"--images-per-id must be >= 2 (the triplet loss needs a positive pair), got {config.K}"
        )
    if args.amp is None:  # last: the engine knows what this device supports
        config = dataclasses.replace(config, amp=_default_amp(device))
    return config


def _default_amp(device: torch.device) -> str:
    from lagnet.engine import default_amp

    mode = default_amp(device)
    return "off" if mode is None else str(mode)


def is_main() -> bool:
    """True outside ``torch.distributed`` and on rank 0."""
    return not dist.is_initialized() or dist.get_rank() == 0


def load_training_data(config: TrainConfig, log: Callable[[str], None] = print) -> ReIDDataset:
    """The dataset of ``config`` (writing the synthetic one on first use), summarised in ``log``.

    Query identities without a gallery match are named in a warning.
    """
    if config.dataset == "synthetic" and is_main():
        start = time.perf_counter()
        sizes: dict[str, Any] = SYNTHETIC_SIZES[config.synthetic]
        generate_synthetic_market(config.root, seed=0, **sizes)
        log(f"synthetic dataset at {config.root} ({time.perf_counter() - start:.1f} s)")
    if dist.is_initialized():
        dist.barrier()
    data = load_dataset(
        config.dataset, config.root, pattern=config.pattern, camid_base=config.camid_base
    )
    log(data.summary())
    note = describe_missing(data)
    if note is not None and is_main():
        from lagnet.cli._common import warn

        warn(note)
    return data


@dataclass
class TrainingParts:
    """Everything a run trains and evaluates with (see :func:`build_training`)."""

    model: LAGNet
    criterion: LAGNetLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: Any
    sampler: PKSampler
    train_loader: DataLoader[Any]
    query_loader: DataLoader[Any]
    gallery_loader: DataLoader[Any]


def build_training(config: TrainConfig, data: ReIDDataset, device: torch.device) -> TrainingParts:
    """Data loaders, model, loss, Adam (AMSGrad), the learning-rate schedule and the engine step."""
    from lagnet.engine import TrainStep

    train_set = ImageDataset(data.train, build_transforms(config.height, config.width, train=True))
    pids = [r.pid for r in data.train]
    sampler = (
        DistributedPKSampler(pids, config.P, config.K, seed=config.seed)
        if dist.is_initialized()
        else PKSampler(pids, config.P, config.K, seed=config.seed)
    )
    cuda = device.type == "cuda"
    train_loader = DataLoader(
        train_set,
        config.P * config.K,
        sampler=sampler,
        num_workers=config.workers,
        drop_last=True,
        pin_memory=cuda,
    )
    test_tf = build_transforms(config.height, config.width, train=False)
    query_loader, gallery_loader = (
        DataLoader(ImageDataset(r, test_tf), batch_size=64, num_workers=config.workers)
        for r in (data.query, data.gallery)
    )
    model = build_lagnet(
        data.num_train_pids,
        backbone=config.backbone,
        variant=config.variant,
        num_attentions=config.num_attentions,
        backbone_weights=config.backbone_weights,
    ).to(device)
    criterion = LAGNetLoss.from_spec(
        "1*CrossEntropy+2*Triplet+1*L2",
        num_classes=data.num_train_pids,
        attention_dim=model.attention_dim,
        margin=1.2,
    ).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=(0.9, 0.999),
        amsgrad=True,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    net: torch.nn.Module = model
    if dist.is_initialized():
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if cuda else None,
            find_unused_parameters=config.variant == "reference",  # unused stripe reductions
        )
    step = TrainStep(
        net,
        criterion,
        optimizer,
        amp=config.amp_mode,
        channels_last=config.channels_last,
        compile=config.compile,
    )
    return TrainingParts(
        model,
        criterion,
        optimizer,
        scheduler,
        step,
        sampler,
        train_loader,
        query_loader,
        gallery_loader,
    )


def _lr_factor(config: TrainConfig) -> Callable[[int], float]:
    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / config.warmup) if config.warmup else 1.0
        return warm * 0.1 ** sum(epoch >= m for m in config.milestones)

    return factor


def checkpoint_of(
    parts: TrainingParts, state: dict[str, Any], config: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """The checkpoint of a run: weights, optimizer, schedule, loss, engine and RNG state, the
    run state, the configuration, and what :func:`lagnet.cli.evaluate` needs to rebuild it."""
    from lagnet import __version__

    ckpt: dict[str, Any] = {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "criterion": parts.criterion.state_dict(),
        "step": parts.step.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "state": state,
        "config": config.to_dict(),
        "model_config": {
            "num_classes": parts.model.num_classes,
            "backbone": config.backbone,
            "variant": config.variant,
            "num_attentions": config.num_attentions,
            "height": config.height,
            "width": config.width,
        },
        "lagnet_version": __version__,
    }
    if device.type == "cuda":
        ckpt["rng_cuda"] = torch.cuda.get_rng_state(device)
    return ckpt


def restore(parts: TrainingParts, ckpt: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Load a run checkpoint into ``parts``; returns its run state."""
    from lagnet.model import load_checked

    load_checked(parts.model, ckpt["model"], source="last.pth")
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    parts.criterion.load_state_dict(ckpt["criterion"])
    parts.step.load_state_dict(ckpt["step"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    state: dict[str, Any] = ckpt["state"]
    return state


def histogram_baseline(data: ReIDDataset) -> dict[str, float]:
    """The colour-histogram matcher the network has to beat (mAP, rank-1, rank-5, mINP)."""
    q, g = color_histogram_features(data.query), color_histogram_features(data.gallery)
    result = evaluate_features(
        q,
        g,
        [r.pid for r in data.query],
        [r.pid for r in data.gallery],
        [r.camid for r in data.query],
        [r.camid for r in data.gallery],
    )
    return rank_metrics(result)


def _evaluate(parts: TrainingParts, config: TrainConfig, device: torch.device) -> dict[str, float]:
    from lagnet.engine import evaluate

    result = evaluate(
        parts.model,
        parts.query_loader,
        parts.gallery_loader,
        flip=True,
        amp=config.amp_mode,
        device=device,
        progress=config.progress,
    )
    return rank_metrics(result)


def run_summary(state: dict[str, Any]) -> dict[str, Any]:
    """The run's summary: the baselines of the demo and the last evaluated ``"trained"`` scores."""
    summary = dict(state.get("summary", {}))
    last = state["history"][-1] if state.get("history") else {}
    if "mAP" in last:
        summary["trained"] = {k: last[k] for k in ("mAP", "rank1", "rank5", "mINP")}
    return summary


def read_back_interval(device: torch.device) -> int:
    """Batches between the engine's read-backs of the loss: 1 on the CPU, where reading costs
    no device sync and a non-finite loss then stops the run at its own batch; 50 on a GPU."""
    return 1 if device.type == "cpu" else 50


def _format_entry(entry: dict[str, Any]) -> str:
    return "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
    )


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    """The mAP / rank-1 / rank-5 / mINP table printed at the end of a run."""
    lines = [f"{'':12s} {'mAP':>7s} {'rank-1':>7s} {'rank-5':>7s} {'mINP':>7s}"]
    for name, m in summary.items():
        lines.append(
            f"{name:12s} {m['mAP']:7.3f} {m['rank1']:7.3f} {m['rank5']:7.3f} {m['mINP']:7.3f}"
        )
    return "\n".join(lines)


def init_distributed(config: TrainConfig) -> torch.device:
    """Join the process group when started by torchrun; returns this process's device."""
    device = torch.device(config.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return device


def non_finite_message(err: NonFiniteLossError, run: RunFolder) -> str:
    """The one line a run prints when its loss stops being finite."""
    return (
        f"loss became {err.value} at epoch {err.epoch + 1}, batch {err.batch + 1}; stopping. "
        f"The last good checkpoint is kept at {run.path / 'last.pth'} "
        "(continue with --resume, maybe with a lower --lr)"
    )


def record_epoch(
    run: RunFolder,
    parts: TrainingParts,
    state: dict[str, Any],
    entry: dict[str, Any],
    config: TrainConfig,
    device: torch.device,
) -> None:
    """Append ``entry`` to the history and write the run's files (main process only).

    ``best.pth`` only when ``entry`` has a strictly better mAP, then ``last.pth``, ``log.json``
    and ``curves.png``.
    """
    state["epoch"] = entry["epoch"]
    state["history"].append(entry)
    if not is_main():
        return
    better = "mAP" in entry and entry["mAP"] > run.best_metric
    if better:
        state["best_mAP"] = entry["mAP"]
    ckpt = checkpoint_of(parts, state, config, device)
    if better:
        run.save_best(ckpt, entry["mAP"])  # only ever a strictly better model
    run.save_last(ckpt)
    run.save_json("log.json", state["history"])
    plot_curves(run, state["history"])


def plot_curves(run: RunFolder, history: list[dict[str, Any]]) -> None:
    """Write ``curves.png`` when matplotlib is installed (the JSON log has it all otherwise)."""
    try:
        from lagnet.viz import plot_training_curves, save_figure

        fig = plot_training_curves(history, metric_keys=("mAP", "rank1", "rank5", "mINP"))
    except ImportError:
        return
    save_figure(fig, run.path / "curves.png")


def run_training(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or resume, or extend) the run of ``config``; returns the summary of the run.

    Nothing is written before the run folder, the data and the model are known good. A
    finished run (``--resume`` with ``--epochs`` at or below the epochs done) writes nothing.

    Raises:
        RunFolderError: see :meth:`lagnet.runs.RunFolder.open`.
        TrainingStopped: the loss became NaN or infinite; ``last.pth`` keeps the last good epoch.
    """
    from lagnet.engine import NonFiniteLossError, train_one_epoch

    def say(message: str) -> None:
        if is_main():
            log(message)

    device = init_distributed(config)
    try:
        run = RunFolder.open(
            config.output,
            config.to_dict(),
            resume=resume,
            overwrite=overwrite,
            fixed_keys=FIXED_KEYS,
        )
        for note in run.notes:
            say(note)
        if run.finished:
            assert run.checkpoint is not None
            return run_summary(run.checkpoint["state"])
        torch.manual_seed(config.seed)
        data = load_training_data(config, say)
        parts = build_training(config, data, device)
        state: dict[str, Any] = {"epoch": 0, "history": [], "best_mAP": -1.0, "summary": {}}
        if run.checkpoint is not None:
            state = restore(parts, run.checkpoint, device)
        if is_main():
            run.create()
        if dist.is_initialized():
            dist.barrier()
        if run.checkpoint is None and config.dataset == "synthetic" and is_main():
            state["summary"]["histogram"] = histogram_baseline(data)  # the demo's comparison
            state["summary"]["untrained"] = _evaluate(parts, config, device)

        start = time.perf_counter()
        for epoch in range(run.start_epoch, config.epochs):
            parts.sampler.set_epoch(epoch)
            lr = parts.optimizer.param_groups[0]["lr"]
            try:
                means = train_one_epoch(
                    parts.step,
                    parts.train_loader,
                    epoch=epoch,
                    log_every=read_back_interval(device),
                    device=device,
                    progress=config.progress and is_main(),
                )
            except NonFiniteLossError as err:
                raise TrainingStopped(non_finite_message(err, run)) from None
            parts.scheduler.step()
            entry: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **means}
            due = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
            if due and is_main():
                entry.update(_evaluate(parts, config, device))
            say(_format_entry(entry))
            record_epoch(run, parts, state, entry, config, device)
            if dist.is_initialized():
                dist.barrier()
        elapsed = time.perf_counter() - start

        summary = run_summary(state)
        if is_main():
            run.save_json("summary.json", summary)
            trained = config.epochs - run.start_epoch
            say(f"\ntrained {trained} epochs in {elapsed:.0f} s; results on the test split:")
            say(summary_table(summary))
        return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


EXAMPLES = """\
  lagnet train                                      # the CPU demo on the synthetic dataset
  lagnet train --preset tiny --output /tmp/run      # seconds
  lagnet train --preset tiny --output /tmp/run --resume --epochs 4   # extend a run
  lagnet train --preset reference --dataset market1501 --root data/ \\
      --backbone-weights resnet50.pth --device cuda  # the paper's recipe
  lagnet train --dataset folder --root crops/ --pattern '(?P<pid>\\d+)_c(?P<camid>\\d+)_.*' \\
      --output runs/mine                             # your own crops (train/ query/ gallery/)
"""


def add_command(parser: argparse.ArgumentParser) -> None:
    """Add the ``lagnet train`` flags to ``parser``."""
    add_train_arguments(parser)
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_training(config, resume=args.resume, overwrite=args.overwrite)
    return 0
