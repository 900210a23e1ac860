"""Galleries beyond exact search: a faiss index of embeddings (optional extra ``lagnet[faiss]``).

:class:`GalleryIndex` wraps a faiss index (exact ``"flat"``, ``"ivf"``, ``"ivfpq"`` or
``"hnsw"``) with what a re-ID gallery needs around it: the metric of the embeddings (cosine
embeddings are L2-normalised before they go in), an optional PCA to fewer dimensions, the ids of
the items, and a file format that records the embedding model's metadata and is written
atomically and checked when read. :func:`evaluate_index` measures what the approximation costs:
recall@k against exact search, and mAP / rank-1 of the retrieved lists.

faiss is imported only when an index is built or loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from lagnet._io import atomic_write
from lagnet._validation import check_choice, check_positive_int

__all__ = ["GalleryIndex", "IndexEvaluation", "evaluate_index"]

IndexKind: TypeAlias = Literal["auto", "flat", "ivf", "ivfpq", "hnsw"]
IndexMetric: TypeAlias = Literal["cosine", "euclidean"]
ArrayLike: TypeAlias = "torch.Tensor | npt.NDArray[Any]"
IdsLike: TypeAlias = "torch.Tensor | npt.NDArray[Any] | Sequence[int]"

_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
_METRICS = ("cosine", "euclidean")
_MAGIC = b"LAGNIDX1"
_END = b"LAGNEND1"
_FORMAT = 1
# "auto": exact search up to this many items, IVF up to _AUTO_IVF_MAX, IVF-PQ beyond.
_AUTO_FLAT_MAX = 100_000
_AUTO_IVF_MAX = 2_000_000
_IO_CHUNK = 1 << 20


def _faiss() -> ModuleType:
    """The faiss module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("faiss")
    except ImportError as error:
        raise ImportError(
            'GalleryIndex needs faiss: pip install "lagnet[faiss]" (or faiss-cpu / faiss-gpu)'
        ) from error


def _as_matrix(x: object, name: str, dim: int | None = None) -> npt.NDArray[np.float32]:
    """``x`` ``(N, D)`` as a C-contiguous float32 array with finite values."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
        arr: npt.NDArray[Any] = x.detach().float().cpu().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
        arr = x
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(arr.shape)}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(
            f"{name} has {arr.shape[1]} dimensions, the index holds {dim}-d embeddings"
        )
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if out.size and not np.isfinite(out).all():
        row = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or inf (first in row {row})")
    return out


def _as_ids(ids: object, count: int) -> npt.NDArray[np.int64]:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.shape != (count,):
        raise ValueError(f"ids must have shape ({count},) like the embeddings, got {arr.shape}")
    return arr.astype(np.int64)


def _check_training_size(
    count: int,
    total: int,
    limit: int,
    *,
    kind: str,
    nlist: int | None,
    pq_bits: int | None,
    pca_dim: int | None,
) -> None:
    """Refuse, before faiss sees them, too few training embeddings for the index's k-means and
    PCA: ``nlist`` inverted lists need ``nlist`` points, ``b``-bit PQ codes ``2**b``, a PCA to
    ``d`` dimensions ``d``."""
    needs: list[tuple[int, str, str]] = []
    if nlist is not None:
        needs.append((nlist, f"kind {kind!r}", f"its {nlist} inverted lists (nlist)"))
    if pq_bits is not None:
        why = f"the {2**pq_bits} centroids of its {pq_bits}-bit PQ codes"
        needs.append((2**pq_bits, f"kind {kind!r}", why))
    if pca_dim is not None:
        needs.append((pca_dim, f"pca_dim={pca_dim}", "the PCA"))
    short = [need for need in needs if count < need[0]]
    if not short:
        return
    need, subject, why = max(short)
    sample = (
        "" if count == total else f" (an evenly spaced sample of the {total}, max_train={limit})"
    )
    hint = "; kind 'flat' is exact and right for small galleries" if kind != "flat" else ""
    raise ValueError(
        f"{subject} needs at least {need} embeddings to train {why}, got {count}{sample}{hint}"
    )


def _default_nlist(num_items: int) -> int:
    """About 4 sqrt(N) lists, a power of two, with at least 39 training points per list."""
    target = 1 << max(4, round(math.log2(max(16.0, 4.0 * math.sqrt(num_items)))))
    return max(1, min(target, num_items // 39, 65536))


def _default_pq_m(dim: int) -> int:
    """Sub-quantisers for PQ: the largest divisor of ``dim`` up to ``dim // 8`` (8 dims each)."""
    for m in range(max(1, dim // 8), 0, -1):
        if dim % m == 0:
            return m
    return 1


@dataclass(frozen=True)
class _Meta:
    dim: int
    metric: IndexMetric
    kind: str
    factory: str
    pca_dim: int | None
    normalize: bool
    lagnet_version: str
    nprobe: int
    ef_search: int
    k_factor: int


class GalleryIndex:
    """A searchable gallery of embeddings (faiss inside).

    Build one with :meth:`build`, grow it with :meth:`add`, query it with :meth:`search`, store
    it with :meth:`save` / :meth:`load`. Distances follow lagnet's convention, smaller is more
    similar: ``1 - cosine similarity`` for ``metric="cosine"`` and the Euclidean distance for
    ``metric="euclidean"`` (approximate for the compressed kinds and after PCA).
    """

    def __init__(self, index: Any, meta: _Meta, ids: npt.NDArray[np.int64]) -> None:
        self._index = index
        self._meta = meta
        self._ids = ids

    # ------------------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        embeddings: ArrayLike,
        *,
        ids: IdsLike | None = None,
        kind: IndexKind = "auto",
        metric: IndexMetric = "cosine",
        pca_dim: int | None = None,
        nlist: int | None = None,
        pq_m: int | None = None,
        pq_bits: int = 8,
        hnsw_m: int = 32,
        nprobe: int | None = None,
        ef_search: int = 128,
        refine: Literal["flat", "sq8", "sq6", "sq4"] | None = None,
        k_factor: int = 8,
        max_train: int = 262_144,
        seed: int = 0,
    ) -> GalleryIndex:
        """Train an index on ``embeddings`` ``(N, D)`` and add them.

        Args:
            embeddings: ``(N, D)`` float tensor or array (any device; copied to the host).
            ids: ``(N,)`` integer ids returned by :meth:`search` (default ``0 .. N - 1``).
            kind: ``"flat"`` (exact), ``"ivf"`` (inverted lists of full vectors), ``"ivfpq"``
                (inverted lists of product-quantised codes: about ``pq_m`` bytes per item),
                ``"hnsw"`` (graph) or ``"auto"``: flat up to 100,000 items, IVF up to 2 million,
                IVF-PQ beyond.
            metric: ``"cosine"`` (vectors L2-normalised, inner product) or ``"euclidean"``.
            pca_dim: reduce the embeddings to this many dimensions with PCA first (trained
                on the training sample); ``None`` keeps them.
            nlist: inverted lists of the IVF kinds (default about ``4 sqrt(N)``).
            pq_m, pq_bits: sub-quantisers and bits per code of IVF-PQ (default ``D' / 8``
                sub-quantisers of 8 bits, ``D'`` the indexed dimension).
            hnsw_m: graph degree of HNSW.
            nprobe: lists visited per query by the IVF kinds (default ``nlist / 16``, at
                least 8); can be changed per search.
            ef_search: HNSW search depth; can be changed per search.
            refine: re-rank ``k_factor * k`` candidates with a finer copy of each vector:
                ``"flat"`` (exact, ``4 D'`` bytes per item), ``"sq8"`` / ``"sq6"`` / ``"sq4"``
                (scalar-quantised, ``D'``, ``3 D' / 4``, ``D' / 2`` bytes); for the compressed
                kinds, where it recovers most of the recall PQ loses.
            k_factor: candidates per result re-ranked by ``refine``.
            max_train: training sample size (an evenly spaced subset of ``embeddings``).
            seed: seed of the k-means / PQ training.

        Returns:
            the trained index holding ``embeddings``.

        Raises:
            ImportError: faiss is not installed.
            TypeError / ValueError: bad embeddings, ids or options, or too few embeddings to
                train the kind (checked before faiss runs): IVF needs ``nlist``, IVF-PQ
                ``2 ** pq_bits``, a PCA ``pca_dim``.
        """
        faiss = _faiss()
        x = _as_matrix(embeddings, "embeddings")
        if x.shape[0] == 0:
            raise ValueError("embeddings is empty: an index needs at least one item to train on")
        dim = x.shape[1]
        kind_name = check_choice(kind, "kind", _KINDS)
        metric_name = check_choice(metric, "metric", _METRICS)
        if kind_name == "auto":
            n = x.shape[0]
            kind_name = "flat" if n <= _AUTO_FLAT_MAX else "ivf" if n <= _AUTO_IVF_MAX else "ivfpq"
        indexed_dim = dim
        steps: list[str] = []
        if pca_dim is not None:
            indexed_dim = check_positive_int(pca_dim, "pca_dim")
            if indexed_dim >= dim:
                raise ValueError(
                    f"pca_dim must be smaller than the embedding size {dim}, got {pca_dim}"
                )
            steps.append(f"PCA{indexed_dim}")
            if metric_name == "cosine":
                steps.append("L2norm")
        lists = _default_nlist(x.shape[0]) if nlist is None else check_positive_int(nlist, "nlist")
        if kind_name in ("ivf", "ivfpq") and lists > x.shape[0]:
            raise ValueError(f"nlist={lists} is larger than the {x.shape[0]} training embeddings")
        if kind_name == "flat":
            steps.append("Flat")
        elif kind_name == "ivf":
            steps.append(f"IVF{lists},Flat")
        elif kind_name == "ivfpq":
            m = _default_pq_m(indexed_dim) if pq_m is None else check_positive_int(pq_m, "pq_m")
            if indexed_dim % m:
                raise ValueError(f"pq_m={m} must divide the indexed dimension {indexed_dim}")
            bits = check_positive_int(pq_bits, "pq_bits")
            fast_scan = "fs" if bits == 4 else ""  # SIMD scanning of 4-bit codes
            steps.append(f"IVF{lists},PQ{m}x{bits}{fast_scan}")
        else:
            steps.append(f"HNSW{check_positive_int(hnsw_m, 'hnsw_m')}")
        if refine is not None:
            name = check_choice(refine, "refine", ("flat", "sq8", "sq6", "sq4"))
            steps.append("RFlat" if name == "flat" else f"Refine(SQ{name[2:]})")
        factory = ",".join(steps)
        train_step = max(1, -(-x.shape[0] // check_positive_int(max_train, "max_train")))
        _check_training_size(
            -(-x.shape[0] // train_step),
            x.shape[0],
            max_train,
            kind=kind_name,
            nlist=lists if kind_name in ("ivf", "ivfpq") else None,
            pq_bits=check_positive_int(pq_bits, "pq_bits") if kind_name == "ivfpq" else None,
            pca_dim=None if pca_dim is None else indexed_dim,
        )
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric_name == "cosine" else faiss.METRIC_L2
        index = faiss.index_factory(dim, factory, faiss_metric)
        probes = max(8, lists // 16) if nprobe is None else check_positive_int(nprobe, "nprobe")
        meta = _Meta(
            dim=dim,
            metric="cosine" if metric_name == "cosine" else "euclidean",
            kind=kind_name,
            factory=factory,
            pca_dim=None if pca_dim is None else indexed_dim,
            normalize=metric_name == "cosine",
            lagnet_version=_lagnet_version(),
            nprobe=min(probes, lists),
            ef_search=check_positive_int(ef_search, "ef_search"),
            k_factor=check_positive_int(k_factor, "k_factor"),
        )
        gallery = cls(index, meta, np.zeros(0, dtype=np.int64))
        x = gallery._prepare(x)
        if not index.is_trained:
            _set_seed(index, seed)
            index.train(x[::train_step])
        gallery._add_prepared(x, None if ids is None else _as_ids(ids, x.shape[0]))
        return gallery

    def _prepare(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self._meta.normalize:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.maximum(norms, np.float32(1e-12))
        return np.ascontiguousarray(x, dtype=np.float32)

    def _add_prepared(self, x: npt.NDArray[np.float32], ids: npt.NDArray[np.int64] | None) -> None:
        start = len(self._ids)
        if ids is None:
            ids = np.arange(start, start + x.shape[0], dtype=np.int64)
        self._index.add(x)
        self._ids = np.concatenate([self._ids, ids])

    def add(self, embeddings: ArrayLike, ids: IdsLike | None = None) -> None:
        """Add ``embeddings`` ``(M, D)`` with ``ids`` ``(M,)`` (default: the next positions)."""
        x = _as_matrix(embeddings, "embeddings", self._meta.dim)
        self._add_prepared(self._prepare(x), None if ids is None else _as_ids(ids, x.shape[0]))

    # ------------------------------------------------------------------------------ search

    def search(
        self,
        queries: ArrayLike,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The ``k`` nearest items of each query.

        Args:
            queries: ``(Q, D)`` embeddings of the model the index was built for.
            k: results per query.
            nprobe, ef_search: override the index's search depth for this call.

        Returns:
            ``(distances, ids)``, both ``(Q, k)``: float32 distances in increasing order and
            int64 ids; where fewer than ``k`` items were found, the id is -1 and the distance
            inf.
        """
        distances, positions = self.search_positions(queries, k, nprobe=nprobe, ef_search=ef_search)
        found = positions >= 0
        ids = np.full(positions.shape, -1, dtype=np.int64)
        ids[found] = self._ids[positions[found]]
        return distances, ids

    def search_positions(
        self,
        queries: ArrayLike,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """:meth:`search`, returning positions in insertion order (``0 .. len - 1``) instead of
        ids."""
        faiss = _faiss()
        k = check_positive_int(k, "k")
        q = self._prepare(_as_matrix(queries, "queries", self._meta.dim))
        params = faiss.ParameterSpace()
        if self._meta.kind in ("ivf", "ivfpq"):
            probes = self._meta.nprobe if nprobe is None else check_positive_int(nprobe, "nprobe")
            params.set_index_parameter(self._index, "nprobe", probes)
        if self._meta.kind == "hnsw":
            ef = self._meta.ef_search if ef_search is None else ef_search
            params.set_index_parameter(self._index, "efSearch", check_positive_int(ef, "ef_search"))
        if "Refine" in self._meta.factory or "RFlat" in self._meta.factory:
            inner = faiss.downcast_index(self._index)
            if isinstance(inner, faiss.IndexPreTransform):
                inner = faiss.downcast_index(inner.index)
            inner.k_factor = self._meta.k_factor
        raw, positions = self._index.search(q, k)
        distances = np.asarray(raw, dtype=np.float32)
        missing = positions < 0
        if self._meta.metric == "cosine":
            distances = np.float32(1.0) - distances
        else:
            distances = np.sqrt(np.maximum(distances, np.float32(0.0)))
        distances[missing] = np.inf
        return distances, positions.astype(np.int64)

    # ------------------------------------------------------------------------------ facts

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        """``(N,)`` ids of the items, in insertion order (a read-only view)."""
        view: npt.NDArray[np.int64] = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def dim(self) -> int:
        """Size of the embeddings the index takes."""
        return self._meta.dim

    @property
    def metric(self) -> IndexMetric:
        """``"cosine"`` or ``"euclidean"``."""
        return self._meta.metric

    @property
    def kind(self) -> str:
        """``"flat"``, ``"ivf"``, ``"ivfpq"`` or ``"hnsw"``."""
        return self._meta.kind

    @property
    def metadata(self) -> dict[str, Any]:
        """What :meth:`save` records: embedding size, metric, normalisation, kind, faiss
        factory string, PCA size, search depths and the lagnet version that built it."""
        return dict(self._meta.__dict__)

    def __len__(self) -> int:
        return int(self._ids.size)

    def __repr__(self) -> str:
        return (
            f"GalleryIndex(kind={self.kind!r}, metric={self.metric!r}, dim={self.dim}, "
            f"items={len(self)}, factory={self._meta.factory!r})"
        )

    # ------------------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to ``path`` atomically (an existing file is replaced only once the
        new one is complete). The file holds the metadata, the ids, the faiss index and a
        SHA-256 checksum that :meth:`load` verifies."""
        faiss = _faiss()
        header = json.dumps(
            {"format": _FORMAT, "ntotal": len(self), **self.metadata}, sort_keys=True
        ).encode()

        def write(f: IO[bytes]) -> None:
            digest = hashlib.sha256()

            def put(data: bytes) -> None:
                digest.update(data)
                f.write(data)

            put(_MAGIC + struct.pack("<Q", len(header)) + header)
            put(self._ids.astype("<i8").tobytes())
            written = 0

            def put_index(data: bytes) -> int:
                nonlocal written
                written += len(data)
                put(bytes(data))
                return len(data)

            faiss.write_index(self._index, faiss.PyCallbackIOWriter(put_index))
            f.write(struct.pack("<Q", written) + digest.digest() + _END)

        return atomic_write(path, write)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        dim: int | None = None,
        metric: IndexMetric | None = None,
    ) -> GalleryIndex:
        """Read an index written by :meth:`save`.

        Args:
            path: the file.
            dim, metric: when given, the index must have been built for embeddings of this
                size / metric (the model you will query it with).

        Raises:
            ImportError: faiss is not installed.
            FileNotFoundError: no such file.
            ValueError: not a lagnet index file, truncated or corrupt (checksum mismatch),
                internally inconsistent, or built for another ``dim`` / ``metric``.
        """
        faiss = _faiss()
        target = Path(path)
        size = target.stat().st_size
        trailer = 8 + 32 + len(_END)
        with target.open("rb") as f:
            start = f.read(len(_MAGIC) + 8)
            if len(start) < len(_MAGIC) + 8 or start[: len(_MAGIC)] != _MAGIC:
                raise ValueError(f"{str(target)!r} is not a lagnet gallery index file")
            if size < len(start) + trailer:
                raise ValueError(f"{str(target)!r} is truncated ({size} bytes)")
            f.seek(size - trailer)
            end = f.read(trailer)
            if end[-len(_END) :] != _END:
                raise ValueError(f"{str(target)!r} is truncated or corrupt (no end marker)")
            (index_bytes,) = struct.unpack("<Q", end[:8])
            expected = end[8:40]
            digest = hashlib.sha256()
            f.seek(0)
            remaining = size - trailer
            while remaining:
                chunk = f.read(min(_IO_CHUNK, remaining))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
            if digest.digest() != expected:
                raise ValueError(f"{str(target)!r} is corrupt: checksum mismatch")
            f.seek(len(_MAGIC))
            (header_len,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(header_len))
                ntotal = int(header.pop("ntotal"))
                file_format = header.pop("format")
                meta = _Meta(**header)
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{str(target)!r} has an unreadable header: {error}") from error
            if file_format != _FORMAT:
                raise ValueError(
                    f"{str(target)!r} has index format {file_format}, expected {_FORMAT}"
                )
            if len(_MAGIC) + 8 + header_len + 8 * ntotal + index_bytes + trailer != size:
                raise ValueError(f"{str(target)!r} is inconsistent: section sizes do not add up")
            ids = np.frombuffer(f.read(8 * ntotal), dtype="<i8").astype(np.int64)
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        if index.d != meta.dim or index.ntotal != ntotal:
            raise ValueError(
                f"{str(target)!r} is inconsistent: the faiss index holds {index.ntotal} "
                f"{index.d}-d items, the header says {ntotal} {meta.dim}-d"
            )
        if dim is not None and meta.dim != dim:
            raise ValueError(
                f"{str(target)!r} was built for {meta.dim}-d embeddings, expected {dim}-d"
            )
        if metric is not None and meta.metric != metric:
            raise ValueError(
                f"{str(target)!r} was built for the {meta.metric} metric, expected {metric}"
            )
        return cls(index, meta, ids)


def _lagnet_version() -> str:
    import lagnet

    return str(lagnet.__version__)


def _set_seed(index: Any, seed: int) -> None:
    """Seed the k-means of an IVF index (through a pre-transform too)."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed


# ---------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class IndexEvaluation:
    """Result of :func:`evaluate_index`.

    Attributes:
        k: length of the retrieved lists.
        recall_at_k: mean over queries of the share of the exact ``k`` nearest gallery items
            (brute force on ``gallery_features``) that the index returned; None without
            ``gallery_features``.
        mAP, rank1: of the index's top-``k`` lists (same-id same-camera items removed, matches
            beyond rank ``k`` count as missed: mAP@k over all of each query's matches).
        exact_mAP, exact_rank1: the same of the exact top-``k`` lists (None without
            ``gallery_features``): the difference is what the index (and its PCA) costs.
        num_valid_queries: queries with a match in the gallery.
    """

    k: int
    recall_at_k: float | None
    mAP: float
    rank1: float
    exact_mAP: float | None
    exact_rank1: float | None
    num_valid_queries: int


def _map_rank1_at_k(
    positions: npt.NDArray[np.int64],
    q_pids: npt.NDArray[np.int64],
    q_camids: npt.NDArray[np.int64],
    g_pids: npt.NDArray[np.int64],
    g_camids: npt.NDArray[np.int64],
    num_matches: npt.NDArray[np.int64],
) -> tuple[float, float]:
    """mAP@k and rank-1 of ranked lists ``positions`` ``(Q, k)`` (-1: nothing found)."""
    found = positions >= 0
    safe = np.where(found, positions, 0)
    same_pid = found & (g_pids[safe] == q_pids[:, None])
    kept = found & ~(same_pid & (g_camids[safe] == q_camids[:, None]))
    hits = same_pid & kept
    rank = np.cumsum(kept, axis=1)
    precision = np.where(hits, np.cumsum(hits, axis=1) / np.maximum(rank, 1), 0.0)
    valid = num_matches > 0
    ap = precision.sum(axis=1)[valid] / num_matches[valid]
    first_kept = np.argmax(kept, axis=1)
    top_is_match = kept.any(axis=1) & hits[np.arange(hits.shape[0]), first_kept]
    return float(ap.mean()), float(top_is_match[valid].mean())


def _count_matches(
    q_pids: npt.NDArray[np.int64],
    q_camids: npt.NDArray[np.int64],
    g_pids: npt.NDArray[np.int64],
    g_camids: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """``(Q,)`` gallery items with the query's id from another camera (its valid matches)."""
    pids, pid_index = np.unique(np.concatenate([q_pids, g_pids]), return_inverse=True)
    cams, cam_index = np.unique(np.concatenate([q_camids, g_camids]), return_inverse=True)
    num_q = q_pids.size
    pair = pid_index * cams.size + cam_index  # one key per (id, camera)
    same_pid = np.bincount(pid_index[num_q:], minlength=pids.size)[pid_index[:num_q]]
    same_pair = np.bincount(pair[num_q:], minlength=pids.size * cams.size)[pair[:num_q]]
    out: npt.NDArray[np.int64] = (same_pid - same_pair).astype(np.int64)
    return out


def evaluate_index(
    index: GalleryIndex,
    query_features: ArrayLike,
    q_pids: IdsLike,
    q_camids: IdsLike,
    g_pids: IdsLike,
    g_camids: IdsLike,
    *,
    k: int = 100,
    gallery_features: ArrayLike | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> IndexEvaluation:
    """How well ``index`` retrieves: recall@k against exact search, mAP@k and rank-1.

    Args:
        index: a :class:`GalleryIndex` holding the gallery, in the order of ``g_pids``.
        query_features: ``(Q, D)`` query embeddings.
        q_pids, q_camids: ``(Q,)`` integer ids / cameras of the queries.
        g_pids, g_camids: ``(G,)`` of the gallery items, in the index's insertion order.
        k: length of the retrieved lists.
        gallery_features: ``(G, D)`` the original gallery embeddings, for the exact search
            (recall and the exact mAP / rank-1); memory ``G x D`` floats.
        nprobe, ef_search: search depth overrides, see :meth:`GalleryIndex.search`.

    Returns:
        an :class:`IndexEvaluation`.
    """
    qf = _as_matrix(query_features, "query_features", index.dim)
    num_gallery = len(index)
    qp, qc = _as_ids(q_pids, qf.shape[0]), _as_ids(q_camids, qf.shape[0])
    gp, gc = _as_ids(g_pids, num_gallery), _as_ids(g_camids, num_gallery)
    k = min(check_positive_int(k, "k"), num_gallery)
    num_matches = _count_matches(qp, qc, gp, gc)
    if not (num_matches > 0).any():
        raise ValueError("no query has a valid match in the gallery")
    _, found = index.search_positions(qf, k, nprobe=nprobe, ef_search=ef_search)
    mean_ap, rank1 = _map_rank1_at_k(found, qp, qc, gp, gc, num_matches)
    recall = exact_map = exact_rank1 = None
    if gallery_features is not None:
        exact = _exact_top_k(
            index, qf, _as_matrix(gallery_features, "gallery_features", index.dim), k
        )
        hits = [np.intersect1d(a[a >= 0], b).size for a, b in zip(found, exact, strict=True)]
        recall = float(np.mean(hits) / k)
        exact_map, exact_rank1 = _map_rank1_at_k(exact, qp, qc, gp, gc, num_matches)
    return IndexEvaluation(
        k=k,
        recall_at_k=recall,
        mAP=mean_ap,
        rank1=rank1,
        exact_mAP=exact_map,
        exact_rank1=exact_rank1,
        num_valid_queries=int((num_matches > 0).sum()),
    )


def _exact_top_k(
    index: GalleryIndex,
    queries: npt.NDArray[np.float32],
    gallery: npt.NDArray[np.float32],
    k: int,
) -> npt.NDArray[np.int64]:
    """Positions of the exact ``k`` nearest gallery items (the index's metric, no PCA)."""
    if gallery.shape[0] != len(index):
        raise ValueError(
            f"gallery_features has {gallery.shape[0]} rows, the index holds {len(index)} items"
        )
    exact = GalleryIndex.build(gallery[:1], kind="flat", metric=index.metric)
    exact.add(gallery[1:])
    return exact.search_positions(queries, k)[1]
