"""Settings of ``lagnet train`` and ``examples/train.py``: the flags, the checked configuration.

:func:`add_train_arguments` declares the flags; :func:`config_from_args` merges them over a
preset and checks every value before any work starts; :class:`TrainConfig` is what a run folder
records (``config.json``), and :data:`FIXED_KEYS` the settings a ``--resume`` may not change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lagnet._validation import (
    check_choice,
    check_float,
    check_nonnegative_int,
    check_positive_int,
)
from lagnet.backbones import BACKBONES, resolve_backbone_weights
from lagnet.cli._common import (
    ALL_DATASETS,
    add_cache_arguments,
    add_folder_dataset_arguments,
    check_pattern,
)
from lagnet.data import CACHE_MODES
from lagnet.model import MIN_INPUT_SIZE, VARIANTS
from lagnet.presets import PRESETS
from lagnet.runs import read_recorded_config, resolve_device

__all__ = [
    "FIXED_KEYS",
    "TrainConfig",
    "add_train_arguments",
    "check_input_size",
    "config_from_args",
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
    workers: int | None
    cache: str
    cache_dir: str | None
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
    add_folder_dataset_arguments(p)
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
    p.add_argument(
        "--backbone-weights",
        metavar="imagenet|ENUM_NAME|PATH|none",
        help="ImageNet weights of the trunk: imagenet (torchvision's IMAGENET1K_V1, downloaded "
        "once into the torch hub cache), a torchvision weights name (IMAGENET1K_V2), a local "
        "state dict, or none (preset default: imagenet for reference, none otherwise)",
    )
    p.add_argument("--num-attentions", type=int, help="attention maps K kept by the LAS")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--ids-per-batch", type=int, dest="P", help="identities per batch (P)")
    p.add_argument("--images-per-id", type=int, dest="K", help="images per identity (K)")
    p.add_argument("--lr", type=float, help="learning rate of Adam")
    add_cache_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--amp",
        choices=["bf16", "fp16", "off"],
        help="mixed precision (default: bf16 on a capable GPU, off on the CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step (CUDA graphs on a GPU)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on for CUDA)",
    )
    _stash_defaults(p)


_DEFAULTS = "train_flag_defaults"
_NOT_INHERITED = frozenset({"output", "resume", "overwrite", "no_progress", _DEFAULTS})
"""Flags a ``--resume`` never takes from the run's config.json (the folder itself, the mode,
and the display: bars do not change results)."""


def _stash_defaults(parser: argparse.ArgumentParser) -> None:
    """Every flag defaults to ``None`` (not given), its real default kept aside, so
    :func:`config_from_args` knows which flags were given explicitly."""
    defaults = {}
    for action in parser._actions:
        if action.dest not in ("help", _DEFAULTS) and action.default is not argparse.SUPPRESS:
            defaults[action.dest] = action.default
            action.default = None
    parser.set_defaults(**{_DEFAULTS: defaults})


def _recorded_flags(recorded: dict[str, Any]) -> dict[str, Any]:
    """A run's config.json as flag values (``dest`` names)."""
    flags = {k: v for k, v in recorded.items() if k not in ("height", "width")}
    if "height" in recorded and "width" in recorded:
        flags["input_size"] = [recorded["height"], recorded["width"]]
    if "backbone_weights" in recorded and recorded["backbone_weights"] is None:
        flags["backbone_weights"] = "none"
    return flags


def _fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every flag not given filled in: on ``--resume`` from the run's recorded
    config.json (so a resume continues the run as it was set up), else the flag's default."""
    defaults: dict[str, Any] | None = getattr(args, _DEFAULTS, None)
    if defaults is None:  # a namespace not made by add_train_arguments: as it is
        return args
    filled = argparse.Namespace(**vars(args))
    output = getattr(args, "output", None)
    if output is not None and not str(output).strip():
        raise ValueError("--output is empty (an unset shell variable?); give the run folder's path")
    recorded: dict[str, Any] = {}
    if getattr(args, "resume", None):
        preset = args.preset or defaults.get("preset") or "demo"
        folder = Path(output or Path("runs") / preset).expanduser()
        recorded = _recorded_flags(read_recorded_config(folder) or {})
    for name, default in defaults.items():
        if getattr(args, name, None) is not None:
            continue
        if name in recorded and name not in _NOT_INHERITED:
            setattr(filled, name, recorded[name])
        else:
            setattr(filled, name, default)
    return filled


def check_input_size(height: int, width: int) -> None:
    """Refuse an input smaller than the network takes: :data:`lagnet.model.MIN_INPUT_SIZE`,
    the total stride of the global branch (its map needs one whole cell; the same for every
    ResNet, tests/test_run_folder.py derives it from the network)."""
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise ValueError(
            f"--input-size {height} {width} is too small: the network needs at least "
            f"{MIN_INPUT_SIZE} {MIN_INPUT_SIZE} (its global branch downsamples by "
            f"{MIN_INPUT_SIZE})"
        )


def user_cache_dir() -> Path:
    """lagnet's folder in the user's cache: ``$XDG_CACHE_HOME/lagnet`` or ``~/.cache/lagnet``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lagnet"


def _cache_root(synthetic: str) -> Path:
    return user_cache_dir() / f"synthetic-{synthetic}"


def _backbone_weights(spec: str | None, backbone: str) -> str | None:
    """``--backbone-weights`` checked without touching the network: ``None`` for ``none``,
    a weights name as given, a local file as an expanded path that exists."""
    if spec is None or spec.lower() == "none":
        return None
    try:
        resolved = resolve_backbone_weights(backbone, spec)
    except ValueError as err:
        raise ValueError(str(err).replace("backbone_weights", "--backbone-weights", 1)) from None
    if not isinstance(resolved, Path):
        return spec
    if not resolved.expanduser().is_file():
        raise FileNotFoundError(
            f"--backbone-weights {spec!r}: no such file (or pass imagenet, a torchvision "
            "weights name such as IMAGENET1K_V2, or none)"
        )
    return str(resolved.expanduser())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Fill the preset's defaults into ``args`` and check every value; reads and writes no file
    except to look at ``--root`` and ``--backbone-weights``, and with ``--resume`` at the run's
    config.json: a resume takes every setting the run recorded unless its flag is given.

    Raises:
        ValueError / TypeError: a value out of range, naming the flag and the value.
        FileNotFoundError: ``--root`` or ``--backbone-weights`` does not exist.
    """
    args = _fill_defaults(args)
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
    weights = _backbone_weights(
        pick("backbone_weights"), check_choice(pick("backbone"), "--backbone", BACKBONES)
    )
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
        workers=None if args.workers is None else check_nonnegative_int(args.workers, "--workers"),
        cache=check_choice(args.cache, "--cache", CACHE_MODES),
        cache_dir=None if args.cache_dir is None else str(Path(args.cache_dir).expanduser()),
        progress=not args.no_progress,
        amp=args.amp or "off",
        compile=bool(args.compile),
        channels_last=bool(channels_last),
    )
    if config.K < 2:
        raise ValueError(
            f"--images-per-id must be >= 2 (the triplet loss needs a positive pair), got {config.K}"
        )
    check_input_size(config.height, config.width)
    if args.amp is None:  # last: the engine knows what this device supports
        config = dataclasses.replace(config, amp=_default_amp(device))
    return config


def _default_amp(device: torch.device) -> str:
    from lagnet.engine import default_amp

    mode = default_amp(device)
    return "off" if mode is None else str(mode)
