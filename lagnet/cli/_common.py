"""Pieces shared by the ``lagnet`` subcommands: datasets by name, models from run checkpoints."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from lagnet.data import DATASET_NAMES, ReIDDataset, ReIDFolder, build_dataset
from lagnet.evaluation import RankResult
from lagnet.model import LAGNet
from lagnet.pretrained import load_weights, model_from_weights

__all__ = [
    "ALL_DATASETS",
    "MODEL_KEYS",
    "WEIGHTS_HELP",
    "check_pattern",
    "load_dataset",
    "load_run_model",
    "missing_query_ids",
    "rank_metrics",
    "warn",
]

ALL_DATASETS: tuple[str, ...] = (*DATASET_NAMES, "folder")
"""Dataset names the commands accept (``folder``: train/query/gallery with ``--pattern``)."""

MODEL_KEYS: tuple[str, ...] = (
    "num_classes",
    "backbone",
    "variant",
    "num_attentions",
    "height",
    "width",
)
"""What a run checkpoint records (under ``"model_config"``) to rebuild its model."""


WEIGHTS_HELP = (
    "a run checkpoint (best.pth or last.pth), a pretrained folder (model.safetensors + "
    "config.json; a run folder stands for its pretrained/), or a .safetensors file with its "
    "config.json"
)
"""The help of ``--weights`` (``lagnet evaluate``, ``embed``, ``export``): what loads."""


def warn(message: str) -> None:
    """Print one ``lagnet: warning: ...`` line on stderr."""
    print(f"lagnet: warning: {message}", file=sys.stderr, flush=True)


def new_output_path(
    value: str, *, overwrite: bool, companions: tuple[str, ...] = (), named: bool = True
) -> Path:
    """``--output`` as a path whose folder exists and that is not replaced unless ``overwrite``.

    ``companions`` are suffixes of files written beside it (e.g. ``".paths.txt"``), checked
    too; ``named`` prefixes the "exists" message of the output itself with ``--output``.
    """
    output = Path(value).expanduser()
    prefix = "--output " if named else ""
    targets = [(output, prefix)] + [(output.with_name(output.name + s), "") for s in companions]
    for target, label in targets:
        if target.is_dir():  # even with --overwrite: a folder is never replaced by a file
            flag = "--output " if target == output else ""
            raise IsADirectoryError(
                f"{flag}{str(target)!r} is a folder; give the path of a file to write"
            )
        if target.exists() and not overwrite:
            raise FileExistsError(f"{label}{str(target)!r} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise FileNotFoundError(
            f"--output {str(output)!r}: folder {str(output.parent)!r} does not exist"
        )
    return output


def check_pattern(pattern: object, flag: str = "--pattern") -> str:
    """Check that ``pattern`` is a regular expression with named groups ``pid`` and ``camid``."""
    if not isinstance(pattern, str):
        raise TypeError(f"{flag} must be a string, got {type(pattern).__name__}")
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{flag} {pattern!r} is not a regular expression: {err}") from None
    missing = [g for g in ("pid", "camid") if g not in regex.groupindex]
    if missing:
        raise ValueError(
            f"{flag} {pattern!r} lacks the named group(s) {', '.join(missing)}; "
            r"write e.g. '(?P<pid>\d+)_c(?P<camid>\d+)_.*\.jpg'"
        )
    return pattern


def add_folder_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--pattern`` and ``--camid-base``, the options of ``--dataset folder``
    (:func:`load_dataset`)."""
    parser.add_argument("--pattern", help="--dataset folder: regex with named groups pid and camid")
    parser.add_argument(
        "--camid-base",
        type=int,
        default=1,
        help="--dataset folder: the camera number of the first camera (default 1)",
    )


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--amp`` and ``--channels-last``: how ``lagnet evaluate`` and ``lagnet embed`` run
    the forward (float32 by default, so the scores are those of the plain model)."""
    parser.add_argument(
        "--amp",
        choices=["none", "auto", "bf16", "fp16"],
        default="none",
        help="autocast the forward: auto picks what lagnet train uses (bf16 on recent GPUs, "
        "fp16 on older ones, float32 on the CPU); default none (float32). On a GPU, bf16 "
        "embeddings differ from float32 ones in the 5th decimal of their cosine",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="run the model in channels_last memory format (faster with --amp on a GPU)",
    )


def forward_settings(
    args: argparse.Namespace, model: torch.nn.Module, device: torch.device
) -> dict[str, Any]:
    """The ``extract_features`` keywords of ``--amp`` / ``--channels-last`` (the model is moved
    to channels_last in place when asked)."""
    from lagnet.engine import default_amp

    amp = default_amp(device) if args.amp == "auto" else None if args.amp == "none" else args.amp
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return {"amp": amp, "channels_last": bool(args.channels_last)}


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--cache``, ``--cache-dir`` and ``--workers``: how images reach the network
    (:func:`lagnet.data.build_loader`)."""
    parser.add_argument(
        "--cache",
        choices=["auto", "device", "host", "off"],
        default="auto",
        help="decode the images once and keep them on the device, in host memory, or not at "
        "all (off: DataLoader workers); auto: the device if they fit half its free memory, "
        "else host if they fit half the available RAM, else off (default auto)",
    )
    parser.add_argument(
        "--cache-dir",
        help="keep the decoded images in this folder and reuse them on later runs "
        "(default: decode every run; under torchrun ~/.cache/lagnet/images, shared by the ranks)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="DataLoader worker processes with --cache off (default: from the usable cores on "
        "CUDA, 0 on the CPU)",
    )


def cache_log(message: str) -> None:
    """Print a cache line (its size, a fallback notice) on stderr, keeping stdout for results."""
    print(message, file=sys.stderr, flush=True)


def load_dataset(
    name: str,
    root: str | os.PathLike[str],
    *,
    pattern: str | None = None,
    camid_base: int = 1,
) -> ReIDDataset:
    """A dataset by name; ``"folder"`` reads ``root/{train,query,gallery}`` with ``pattern``."""
    key = name.lower()
    if key == "folder":
        if pattern is None:
            raise ValueError(
                "--dataset folder needs --pattern, a regular expression with named groups "
                r"pid and camid matching whole file names, e.g. '(?P<pid>\d+)_c(?P<camid>\d+)_.*'"
            )
        return ReIDFolder(
            root,
            train_dir="train",
            query_dir="query",
            gallery_dir="gallery",
            pattern=check_pattern(pattern),
            camid_base=camid_base,
            name=f"folder {os.fspath(root)!r}",
        )
    if pattern is not None:
        raise ValueError(f"--pattern is for --dataset folder only, not for --dataset {name}")
    return build_dataset(key, root)


def missing_query_ids(data: ReIDDataset) -> list[int]:
    """Query identities that have no gallery image in another camera (they cannot be scored)."""
    gallery: dict[int, set[int]] = {}
    for record in data.gallery:
        gallery.setdefault(record.pid, set()).add(record.camid)
    missing = {r.pid for r in data.query if not (gallery.get(r.pid, set()) - {r.camid})}
    return sorted(missing)


def describe_missing(data: ReIDDataset) -> str | None:
    """A sentence naming the query identities that cannot be scored, or ``None``."""
    missing = missing_query_ids(data)
    if not missing:
        return None
    total = len({r.pid for r in data.query})
    shown = ", ".join(str(p) for p in missing[:10]) + (" ..." if len(missing) > 10 else "")
    if len(missing) == total:
        raise ValueError(
            f"{data.name}: none of the {total} query identities has a gallery image from "
            f"another camera ({shown}), so nothing can be evaluated; check the gallery folder "
            "and the pid/camid groups of the pattern"
        )
    return (
        f"{data.name}: {len(missing)} of {total} query identities have no gallery image from "
        f"another camera and are left out of the scores: {shown}"
    )


def rank_metrics(result: RankResult) -> dict[str, float]:
    """mAP, rank-1, rank-5 and mINP of a :class:`~lagnet.evaluation.RankResult`."""
    cmc = result.cmc
    return {
        "mAP": float(result.mAP),
        "rank1": float(cmc[0]),
        "rank5": float(cmc[min(4, len(cmc) - 1)]),
        "mINP": float(result.mINP),
    }


def load_run_model(
    path: str | os.PathLike[str], *, device: torch.device | str = "cpu"
) -> tuple[LAGNet, dict[str, Any]]:
    """Rebuild the eval-mode model of ``--weights``: a run checkpoint (``best.pth`` /
    ``last.pth``), a pretrained folder, or a ``.safetensors`` file with its ``config.json``.

    Returns the model on ``device`` and its recorded configuration: the ``MODEL_KEYS``, the
    other recorded model arguments, and ``"metrics"`` (or ``None``).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: the weights record no model configuration (a bare state dict).
    """
    loaded = load_weights(Path(path).expanduser())
    if loaded.model_args is None or loaded.input_size is None:
        raise ValueError(
            f"--weights {os.fspath(path)!r} is not a checkpoint of `lagnet train` (best.pth), a "
            "pretrained folder (model.safetensors + config.json) or a .safetensors file with "
            "its config.json: it records no model configuration; for other weights use "
            "lagnet.build_lagnet(..., weights=)"
        )
    model = model_from_weights(loaded)
    height, width = loaded.input_size
    meta = {**loaded.model_args, "height": height, "width": width, "metrics": loaded.metrics}
    return model.to(device).eval(), meta
