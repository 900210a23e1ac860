"""``lagnet index`` and ``lagnet search``: a faiss gallery index built from ``lagnet embed`` output.

``lagnet index`` reads the ``.npz`` of ``lagnet embed`` (``features`` and ``paths``) and writes a
:class:`lagnet.retrieval.GalleryIndex` file plus ``<index>.paths.txt`` (the gallery paths, one a
line, the index's ids being their line numbers). ``lagnet search`` ranks the embeddings of
another ``.npz`` against it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from lagnet._io import atomic_write
from lagnet._validation import check_positive_int
from lagnet.cli._common import new_output_path

__all__ = ["INDEX_EXAMPLES", "SEARCH_EXAMPLES", "add_index_command", "add_search_command"]

INDEX_EXAMPLES = """\
  lagnet embed --weights runs/m/best.pth --images gallery/ --output gallery.npz
  lagnet index --features gallery.npz --output gallery.lagidx
  lagnet index --features gallery.npz --output gallery.lagidx --kind ivfpq --pca-dim 256
"""

SEARCH_EXAMPLES = """\
  lagnet embed --weights runs/m/best.pth --images queries/ --output queries.npz
  lagnet search --index gallery.lagidx --queries queries.npz --k 5
  lagnet search --index gallery.lagidx --queries queries.npz --k 20 --json > results.json
"""

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")


PATHS_SUFFIX = ".paths.txt"


def paths_file(index: Path) -> Path:
    """The file next to an index that names its items: ``<index>.paths.txt``."""
    return index.with_name(index.name + PATHS_SUFFIX)


def read_embeddings(path: str, flag: str) -> tuple[npt.NDArray[np.float32], list[str]]:
    """``features`` (N, D) and ``paths`` (N,) of a ``lagnet embed`` file, checked."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{flag} {path!r}: no such file")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{flag} {path!r} is not a .npz file of lagnet embed ({err})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{flag} {path!r} holds a single array, not a .npz file of lagnet embed")
    with loaded as npz:
        missing = [k for k in ("features", "paths") if k not in npz.files]
        if missing:
            raise ValueError(
                f"{flag} {path!r} has no {' or '.join(missing)} array (it holds "
                f"{', '.join(npz.files) or 'nothing'}); write it with lagnet embed"
            )
        try:
            features = np.asarray(npz["features"], dtype=np.float32)
            names = [str(p) for p in npz["paths"].tolist()]
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{flag} {path!r}: cannot read its arrays ({err})") from None
    if features.ndim != 2 or features.shape[0] != len(names):
        raise ValueError(
            f"{flag} {path!r}: features must be (N, D) with one row per path, got "
            f"{features.shape} for {len(names)} paths"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{flag} {path!r} holds no embeddings")
    if not np.isfinite(features).all():
        raise ValueError(f"{flag} {path!r}: features contain NaN or infinite values")
    return features, names


def add_index_command(parser: argparse.ArgumentParser) -> None:
    """Add the ``lagnet index`` flags to ``parser``."""
    p = parser
    p.add_argument("--features", required=True, help="the .npz written by lagnet embed")
    p.add_argument("--output", required=True, help="the index file to write")
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="flat (exact), ivf, ivfpq, hnsw, or auto by size (default)",
    )
    p.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine")
    p.add_argument("--pca-dim", type=int, help="reduce the embeddings with PCA first")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run_index)


def run_index(args: argparse.Namespace) -> int:
    """Build and save the index; returns the exit status."""
    from lagnet.retrieval import GalleryIndex

    output = new_output_path(
        args.output, overwrite=args.overwrite, companions=(PATHS_SUFFIX,), named=False
    )
    names_out = paths_file(output)
    pca_dim = None if args.pca_dim is None else check_positive_int(args.pca_dim, "--pca-dim")
    features, names = read_embeddings(args.features, "--features")
    index = GalleryIndex.build(features, kind=args.kind, metric=args.metric, pca_dim=pca_dim)
    text = "".join(f"{name}\n" for name in names).encode()
    index.save(output)  # then its list of paths: a failure never leaves the list alone
    atomic_write(names_out, lambda f: f.write(text))
    print(f"wrote {output} ({index.kind}, {len(index)} items of size {index.dim}) and {names_out}")
    return 0


def add_search_command(parser: argparse.ArgumentParser) -> None:
    """Add the ``lagnet search`` flags to ``parser``."""
    p = parser
    p.add_argument("--index", required=True, help="an index written by lagnet index")
    p.add_argument("--queries", required=True, help="the .npz of lagnet embed for the queries")
    p.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    """Search and print the ranked gallery paths; returns the exit status."""
    from lagnet.retrieval import GalleryIndex

    k = check_positive_int(args.k, "--k")
    index_path = Path(args.index).expanduser()
    if not index_path.is_file():
        raise FileNotFoundError(f"--index {args.index!r}: no such file")
    names_path = paths_file(index_path)
    if not names_path.is_file():
        raise FileNotFoundError(
            f"--index {args.index!r}: its list of paths {str(names_path)!r} is missing"
        )
    gallery = names_path.read_text(encoding="utf-8").splitlines()
    queries, query_names = read_embeddings(args.queries, "--queries")
    index = GalleryIndex.load(index_path, dim=queries.shape[1])
    if len(gallery) != len(index):
        raise ValueError(
            f"{str(names_path)!r} names {len(gallery)} items but the index holds {len(index)}"
        )
    distances, ids = index.search(queries, min(k, len(index)))
    results: list[dict[str, Any]] = []
    for name, row_d, row_i in zip(query_names, distances.tolist(), ids.tolist(), strict=True):
        hits = [
            {"path": gallery[i], "distance": d} for d, i in zip(row_d, row_i, strict=True) if i >= 0
        ]
        results.append({"query": name, "results": hits})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for entry in results:
        print(entry["query"])
        for rank, hit in enumerate(entry["results"], start=1):
            distance = max(hit["distance"], 0.0)  # cosine rounding may dip below 0
            print(f"  {rank:3d}  {distance:.4f}  {hit['path']}")
    return 0
