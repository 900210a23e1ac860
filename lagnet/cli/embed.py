"""``lagnet embed``: the embedding of every image under a folder, saved as ``.npz``."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np

from lagnet._io import atomic_write
from lagnet._validation import check_nonnegative_int, check_positive_int
from lagnet.cli._common import (
    WEIGHTS_HELP,
    add_cache_arguments,
    add_precision_arguments,
    cache_log,
    forward_settings,
    load_run_model,
    new_output_path,
)
from lagnet.data import IMAGE_EXTENSIONS, build_loader
from lagnet.evaluation import extract_features
from lagnet.runs import resolve_device

__all__ = ["EXAMPLES", "add_command", "find_images"]

EXAMPLES = """\
  lagnet embed --weights runs/demo/best.pth --images crops/ --output features.npz
  lagnet embed --weights runs/m/best.pth --images crops/ --output f.npz --batch-size 128
  lagnet embed --weights runs/m/best.pth --images crops/ --output f.npz --no-flip

The .npz holds `features` (N, D) float32, L2-normalised, and `paths` (N,) str, the image paths
relative to --images, sorted. As in lagnet evaluate, each embedding adds that of the mirrored
image (flip test-time augmentation) unless --no-flip is given, so both commands give the same
features for the same model.
"""


def add_command(parser: argparse.ArgumentParser) -> None:
    """Add the ``lagnet embed`` flags to ``parser``."""
    p = parser
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--images", required=True, help="folder searched recursively for images")
    p.add_argument("--output", required=True, help="the .npz file to write")
    p.add_argument(
        "--no-flip",
        action="store_true",
        help="no flip test-time augmentation (default: the embedding of the mirrored image is "
        "added, as lagnet evaluate does)",
    )
    p.add_argument("--flip", action="store_true", help=argparse.SUPPRESS)  # the default since 0.1
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    add_cache_arguments(p)
    add_precision_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def find_images(folder: str | os.PathLike[str]) -> list[str]:
    """Image paths under ``folder`` (recursive), relative, ``/``-separated, sorted.

    Raises:
        FileNotFoundError: ``folder`` is not a folder, or holds a dangling link.
        PermissionError: an image cannot be read.
        ValueError: no image at all.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--images {str(root)!r} does not exist or is not a folder")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            if not path.exists():
                raise FileNotFoundError(f"{str(path)!r} is a link to a missing file")
            if not os.access(path, os.R_OK):
                raise PermissionError(f"{str(path)!r} is not readable")
            found.append(path.relative_to(root).as_posix())
    if not found:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"--images {str(root)!r} holds no image files ({exts})")
    return sorted(found)


def run(args: argparse.Namespace) -> int:
    """Embed and write the ``.npz``; returns the exit code."""
    batch_size = check_positive_int(args.batch_size, "--batch-size")
    workers = None if args.workers is None else check_nonnegative_int(args.workers, "--workers")
    device = resolve_device(args.device)
    output = new_output_path(args.output, overwrite=args.overwrite)
    names = find_images(args.images)
    model, meta = load_run_model(args.weights, device=device)
    root = Path(args.images).expanduser()
    loader = build_loader(
        [(str(root / name), 0, 0) for name in names],
        int(meta["height"]),
        int(meta["width"]),
        train=False,
        batch_size=batch_size,
        cache=args.cache,
        device=device,
        workers=workers,
        progress=not args.no_progress,
        cache_dir=args.cache_dir,
        log=cache_log,
    )
    feats = extract_features(
        model,
        loader,
        flip=not args.no_flip,
        device=device,
        progress=not args.no_progress,
        **forward_settings(args, model, device),
    )
    buffer = io.BytesIO()
    np.savez(buffer, features=feats.features.numpy().astype(np.float32), paths=np.array(names))
    atomic_write(output, lambda f: f.write(buffer.getvalue()))
    print(f"wrote {output}: {len(names)} embeddings of size {feats.features.shape[1]}")
    return 0
