"""``lagnet evaluate``: CMC / mAP / mINP of a run checkpoint on a dataset's query and gallery."""

from __future__ import annotations

import argparse
import json
import os

from lagnet._validation import check_nonnegative_int, check_positive_int
from lagnet.cli._common import (
    ALL_DATASETS,
    WEIGHTS_HELP,
    add_cache_arguments,
    add_folder_dataset_arguments,
    add_precision_arguments,
    cache_log,
    describe_missing,
    forward_settings,
    load_dataset,
    load_run_model,
    missing_query_ids,
    warn,
)
from lagnet.data import build_loader
from lagnet.evaluation import evaluate_features, extract_features
from lagnet.evaluation._kreciprocal import check_rerank_params
from lagnet.runs import resolve_device

__all__ = ["EXAMPLES", "add_command"]

EXAMPLES = """\
  lagnet evaluate --weights runs/demo/best.pth --dataset synthetic \\
      --root ~/.cache/lagnet/synthetic-default
  lagnet evaluate --weights runs/m/best.pth --dataset market1501 --root data/ --rerank --json
  lagnet evaluate --weights runs/mine/best.pth --dataset folder --root crops/ \\
      --pattern '(?P<pid>\\d+)_c(?P<camid>\\d+)_.*'
"""


def add_command(parser: argparse.ArgumentParser) -> None:
    """Add the ``lagnet evaluate`` flags to ``parser``."""
    p = parser
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(ALL_DATASETS)}")
    p.add_argument("--root", required=True, help="the dataset folder")
    add_folder_dataset_arguments(p)
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument(
        "--k1",
        type=int,
        help="--rerank: neighbours of the k-reciprocal sets (default 20; at most the gallery size)",
    )
    p.add_argument("--k2", type=int, help="--rerank: neighbours of the query expansion (default 6)")
    p.add_argument(
        "--no-flip",
        action="store_true",
        help="no flip test-time augmentation (default: the embedding of the mirrored image is "
        "added, as lagnet embed does)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    add_cache_arguments(p)
    add_precision_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table (or JSON); returns the exit code."""
    batch_size = check_positive_int(args.batch_size, "--batch-size")
    workers = None if args.workers is None else check_nonnegative_int(args.workers, "--workers")
    device = resolve_device(args.device)
    given = [flag for flag, value in (("--k1", args.k1), ("--k2", args.k2)) if value is not None]
    if given and not args.rerank:
        raise ValueError(f"{' and '.join(given)} set the re-ranking: add --rerank")
    k1 = 20 if args.k1 is None else args.k1
    k2 = 6 if args.k2 is None else args.k2
    if not os.path.exists(os.path.expanduser(args.weights)):
        raise FileNotFoundError(f"--weights {args.weights!r}: no such file or folder")
    data = load_dataset(
        args.dataset,
        os.path.expanduser(args.root),
        pattern=args.pattern,
        camid_base=check_nonnegative_int(args.camid_base, "--camid-base"),
    )
    note = describe_missing(data)
    if note is not None:
        warn(note)
    if args.rerank:  # before the extractions: the gallery's size is known now
        try:
            check_rerank_params(k1, k2, 0.3, len(data.query), len(data.gallery))
        except ValueError as err:
            raise ValueError(
                f"--rerank: {err}; lower --k1 / --k2 (re-ranking with the default --k1 20 "
                "needs at least 20 gallery images) or leave out --rerank"
            ) from None
    model, meta = load_run_model(args.weights, device=device)
    show = not args.no_progress and not args.json
    precision = forward_settings(args, model, device)
    loaders = [
        build_loader(
            records,
            int(meta["height"]),
            int(meta["width"]),
            train=False,
            batch_size=batch_size,
            cache=args.cache,
            device=device,
            workers=workers,
            progress=show,
            cache_dir=args.cache_dir,
            log=cache_log,
        )
        for records in (data.query, data.gallery)
    ]  # both splits decoded (and every unreadable image named) before any embedding
    feats = [
        extract_features(
            model, loader, flip=not args.no_flip, device=device, progress=show, **precision
        )
        for loader in loaders
    ]
    q, g = feats
    result = evaluate_features(
        q.features, g.features, q.pids, g.pids, q.camids, g.camids,
        rerank=args.rerank, k1=k1, k2=k2,
    )  # fmt: skip
    cmc = result.cmc
    scores = {
        "mAP": result.mAP,
        "rank1": float(cmc[0]),
        "rank5": float(cmc[min(4, len(cmc) - 1)]),
        "rank10": float(cmc[min(9, len(cmc) - 1)]),
        "mINP": result.mINP,
    }
    if args.json:
        report = {
            **scores,
            "num_queries": len(data.query),
            "num_valid_queries": result.num_valid_queries,
            "num_gallery": len(data.gallery),
            "missing_query_ids": missing_query_ids(data),
            "rerank": bool(args.rerank),
            "flip": not args.no_flip,
            "weights": args.weights,
            "dataset": args.dataset,
        }
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{data.name}: {len(data.query)} queries, {len(data.gallery)} gallery images"
        f"{', re-ranked' if args.rerank else ''}"
    )
    print("  ".join(f"{name:>7s}" for name in ("mAP", "rank-1", "rank-5", "rank-10", "mINP")))
    print("  ".join(f"{value:7.4f}" for value in scores.values()))
    return 0
