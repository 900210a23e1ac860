"""``lagnet train``: the pieces of a training run, and the run itself.

The flags and the checked configuration live in :mod:`lagnet.cli.train_config`.

``examples/train.py`` is the short, readable version of :func:`run_training`, built on the same
pieces (:func:`add_train_arguments`, :func:`config_from_args`, :func:`load_training_data`,
:func:`build_training`, :class:`~lagnet.runs.RunFolder` and :mod:`lagnet.engine`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lagnet.cli._common import (
    describe_missing,
    load_dataset,
    rank_metrics,
)
from lagnet.cli.train_config import (
    FIXED_KEYS,
    TrainConfig,
    add_train_arguments,
    config_from_args,
    user_cache_dir,
)
from lagnet.data import (
    CachedLoader,
    DistributedPKSampler,
    PKSampler,
    ReIDDataset,
    build_loader,
    color_histogram_features,
    generate_synthetic_market,
)
from lagnet.evaluation import evaluate_features
from lagnet.losses import LAGNetLoss
from lagnet.model import LAGNet, build_lagnet
from lagnet.presets import SYNTHETIC_SIZES
from lagnet.pretrained import RUN_PRETRAINED_DIR, save_pretrained
from lagnet.runs import RunFolder, entry_metrics

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
    "epoch_timing",
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
    "write_pretrained",
]


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss; the last good checkpoint is kept."""


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
    train_loader: CachedLoader | DataLoader[Any]
    query_loader: CachedLoader | DataLoader[Any]
    gallery_loader: CachedLoader | DataLoader[Any]


def build_training(
    config: TrainConfig,
    data: ReIDDataset,
    device: torch.device,
    log: Callable[[str], object] | None = print,
) -> TrainingParts:
    """Data loaders, model, loss, Adam (AMSGrad), the learning-rate schedule and the engine step.

    The splits are read as ``config.cache`` says (:func:`lagnet.data.build_loader`): every image
    is decoded here, so an unreadable one stops the run before any training. Under torchrun the
    training split is decoded once per host into ``config.cache_dir`` (default
    ``~/.cache/lagnet/images``) and memory-mapped by the other ranks; only rank 0 evaluates, so
    only it caches the query and gallery splits.
    """
    from lagnet.engine import TrainStep

    pids = [r.pid for r in data.train]
    sampler = (
        DistributedPKSampler(pids, config.P, config.K, seed=config.seed)
        if dist.is_initialized()
        else PKSampler(pids, config.P, config.K, seed=config.seed)
    )
    cuda = device.type == "cuda"
    shared = dist.is_initialized()
    cache_dir = config.cache_dir
    if shared and cache_dir is None:
        cache_dir = str(user_cache_dir() / "images")

    def loader(records: Any, train: bool, cache: str, batch_size: int) -> Any:
        return build_loader(
            records,
            config.height,
            config.width,
            train=train,
            batch_size=batch_size,
            sampler=sampler if train else None,
            cache=cache,
            device=device,
            workers=config.workers,
            progress=config.progress and is_main(),
            cache_dir=cache_dir if train else config.cache_dir,
            pin_cache=not shared,
            log=log if is_main() else None,
        )

    if shared and not is_main():
        dist.barrier()  # rank 0 decodes the training split into cache_dir first
    train_loader = loader(data.train, True, config.cache, config.P * config.K)
    if shared and is_main():
        dist.barrier()
    test_cache = config.cache if is_main() else "off"  # other ranks never iterate them
    query_loader, gallery_loader = (
        loader(records, False, test_cache, 64) for records in (data.query, data.gallery)
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

    ``last.pth`` first (the full resumable state), then ``best.pth`` (the deployable model)
    only when ``entry`` has a strictly better mAP, then ``log.json`` and ``curves.png``: a
    process killed at any moment leaves a resumable folder, and ``--resume`` completes the rest.
    """
    state["epoch"] = entry["epoch"]
    state["history"].append(entry)
    if not is_main():
        return
    better = "mAP" in entry and entry["mAP"] > run.best_metric
    if better:
        state["best_mAP"] = entry["mAP"]
        state["best_epoch"] = entry["epoch"]
    ckpt = checkpoint_of(parts, state, config, device)
    run.save_last(ckpt)
    if better:  # only ever a strictly better model
        run.save_best(ckpt, entry["mAP"], metrics=entry_metrics(entry), epoch=entry["epoch"])
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


def write_pretrained(run: RunFolder, log: Callable[[str], None] = print) -> Path | None:
    """Write ``<run>/pretrained/`` from the run's ``best.pth``: the folder to share or load
    with :func:`lagnet.from_pretrained`. Without safetensors (``lagnet[hub]``) a warning says
    so and nothing is written. Returns the folder, or ``None``."""
    from lagnet.cli._common import load_run_model, warn

    best = run.path / "best.pth"
    if not best.is_file():
        return None
    try:
        importlib.import_module("safetensors")
    except ImportError:
        warn(
            f"no {RUN_PRETRAINED_DIR}/ folder written (it needs safetensors): "
            'pip install "lagnet[hub]", then lagnet export --format safetensors '
            f"--weights {best} --output {run.path / RUN_PRETRAINED_DIR}"
        )
        return None
    model, meta = load_run_model(best)
    folder = save_pretrained(
        model,
        run.path / RUN_PRETRAINED_DIR,
        metrics=meta["metrics"],
        input_size=(int(meta["height"]), int(meta["width"])),
    )
    log(f"pretrained folder of the best model: {folder} (lagnet.from_pretrained loads it)")
    return folder


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
    run: RunFolder | None = None
    try:
        run = RunFolder.open(
            config.output,
            config.to_dict(),
            resume=resume,
            overwrite=overwrite,
            fixed_keys=FIXED_KEYS,
        )
        say(f"run folder: {run.path.absolute()}")
        for note in run.notes:
            say(note)
        if is_main():
            for note in run.lock():  # an existing folder: refuse a second training at once
                say(note)
        if run.finished:
            assert run.checkpoint is not None
            summary = run_summary(run.checkpoint["state"])
            if is_main():
                for note in run.complete():  # what a kill after the last epoch cut short
                    say(note)
                if not (run.path / "summary.json").is_file():
                    run.save_json("summary.json", summary)
                if not (run.path / RUN_PRETRAINED_DIR / "config.json").is_file():
                    write_pretrained(run, say)
            return summary
        torch.manual_seed(config.seed)
        data = load_training_data(config, say)
        parts = build_training(config, data, device)
        state: dict[str, Any] = {"epoch": 0, "history": [], "best_mAP": -1.0, "summary": {}}
        if run.checkpoint is not None:
            state = restore(parts, run.checkpoint, device)
        if is_main():
            for note in run.create():
                say(note)
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
            record_epoch(run, parts, state, entry, config, device)
            done = epoch + 1 - run.start_epoch
            say(_format_entry(entry) + epoch_timing(time.perf_counter() - start, done,
                                                    config.epochs - epoch - 1))  # fmt: skip
            if dist.is_initialized():
                dist.barrier()
        elapsed = time.perf_counter() - start

        summary = run_summary(state)
        if is_main():
            run.save_json("summary.json", summary)
            write_pretrained(run, say)
            trained = config.epochs - run.start_epoch
            say(f"\ntrained {trained} epochs in {elapsed:.0f} s; results on the test split:")
            say(summary_table(summary))
            say(f"run folder: {run.path.absolute()} (best.pth: the best model; last.pth: resume)")
        return summary
    finally:
        if run is not None:
            run.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def epoch_timing(elapsed: float, done: int, left: int) -> str:
    """``"  (12.3 s/epoch, about 4 min 06 s left)"``: the mean time of the ``done`` epochs of
    this start (training, evaluation and checkpoints) and the estimate for the ``left`` ones.
    Printed on each epoch line; never recorded in ``log.json``, which stays deterministic."""
    per = elapsed / max(done, 1)
    rest = f"about {_duration(per * left)} left" if left else "done"
    return f"  ({per:.1f} s/epoch, {rest})"


EXAMPLES = """\
  lagnet train                                      # the CPU demo on the synthetic dataset
  lagnet train --preset tiny --output /tmp/run      # seconds
  lagnet train --preset tiny --output /tmp/run --resume --epochs 4   # extend a run
  lagnet train --preset reference --dataset market1501 --root data/ \\
      --device cuda                                  # the paper's recipe (ImageNet trunk)
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
