"""Benchmark of lagnet.retrieval.GalleryIndex at city scale (a script, not a test).

    python benchmarks/bench_retrieval.py                 # 10 million 512-d embeddings
    python benchmarks/bench_retrieval.py --num 1000000   # 1 million

Synthetic re-ID-like embeddings (identity centres plus noise, L2-normalised, cosine metric) are
generated chunk by chunk: each chunk is added to an IVF-PQ index and, for the 1,000 queries,
merged into their exact top-k by brute force, so no chunk is kept. Printed: build and add time,
peak RSS of the whole process (target < 6 GiB), and per ``--nprobe`` value query throughput and
recall against exact search in two conventions: k-recall@k (the share of the exact k nearest
among the k returned, what `evaluate_index` reports) and 1-recall@k (the share of queries whose
exact nearest neighbour is among the k returned, faiss' "R@k"). Target: recall@10 >= 0.9.

The default index: 1,024 lists, 32 4-bit PQ codes (fast scan) that pick ``8 k`` candidates in
128 lists, re-ranked with a 6-bit scalar-quantised copy of each vector: about 416 bytes per item
with the ids. Measured at 10 million items (shared 2-core CPU, torch 2.14.1, faiss-cpu 1.15.1):
peak RSS 5.50 GiB, 1,182 queries/s, 10-recall@10 0.934, 1-recall@10 0.995 (nprobe 64: 1,860/s,
0.920; nprobe 32: 3,249/s, 0.885); train + add 210 s.

Why 6 bits: about 20 items of the query's identity surround it, and their similarities differ
by little (median gap between the exact 10th and 11th: 0.0008 in cosine similarity). The error
of the re-ranking copy on a similarity is about 0.007 at 4 bits, 0.0017 at 6 and 0.0005 at 8,
which caps the 10-recall@10 even of an exhaustive search at 0.80, 0.94 and 0.98 (measured on
200,000 items). 8 bits (512 bytes per item) do not fit 6 GiB at 10 million; PQ alone does not
get there either (an exhaustive search with 128 or 256 8-bit codes: 0.69 and 0.83). The PQ
stage only has to find the candidates: 32 codes do that as well as 64 here (10-recall@10 0.934
with either at 10 million, nprobe 128), with half the codes to store and scan.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from lagnet.retrieval import GalleryIndex

GIB = 1024**3


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def chunk_embeddings(centres: torch.Tensor, count: int, noise: float, seed: int) -> torch.Tensor:
    """``count`` unit embeddings: a random identity's centre plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    pids = torch.randint(0, centres.shape[0], (count,), generator=g)
    x = torch.randn(count, centres.shape[1], generator=g).mul_(noise)
    for s in range(0, count, 8192):  # in place, in slices: no chunk-sized temporaries
        x[s : s + 8192].add_(centres[pids[s : s + 8192]].float())
    return x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12))


def merge_top_k(
    best_sim: torch.Tensor,
    best_idx: torch.Tensor,
    queries: torch.Tensor,
    chunk: torch.Tensor,
    offset: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` (largest cosine similarity) of the queries over the items seen so far."""
    for s in range(0, chunk.shape[0], 16384):
        sim = queries @ chunk[s : s + 16384].T
        top = torch.topk(sim, min(k, sim.shape[1]), dim=1)
        cand_sim = torch.cat([best_sim, top.values], dim=1)
        cand_idx = torch.cat([best_idx, top.indices + offset + s], dim=1)
        keep = torch.topk(cand_sim, k, dim=1).indices
        best_sim, best_idx = cand_sim.gather(1, keep), cand_idx.gather(1, keep)
    return best_sim, best_idx


def first_chunk(num: int, largest: int = 100_000) -> int:
    """``num / 2^j``, the largest such whole number up to ``largest`` (else ``largest``).

    The re-ranking copy lives in one buffer that doubles when it is full and is copied then.
    It starts at the size of the first chunk; with ``num / 2^j`` items there, and later chunks
    that divide it, the last doubling lands exactly on ``num`` items, where other sizes can
    leave up to twice the final size resident during the last copy.
    """
    chunk = num
    while chunk > largest and chunk % 2 == 0:
        chunk //= 2
    return chunk if chunk <= largest else largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num", type=int, default=10_000_000, help="gallery embeddings")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ids", type=int, default=None, help="identities (default num / 20)")
    parser.add_argument("--noise", type=float, default=0.02, help="noise per dimension")
    parser.add_argument(
        "--first", type=int, default=None, help="training chunk (default num / 2^j <= 100,000)"
    )
    parser.add_argument(
        "--chunk", type=int, default=None, help="later chunks (default: divides --first, <= 16,384)"
    )
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--pq-m", type=int, default=32, help="PQ sub-quantisers")
    parser.add_argument("--pq-bits", type=int, default=4, help="bits per sub-quantiser")
    parser.add_argument("--refine", default="sq6", help="flat, sq8, sq6, sq4 or none")
    parser.add_argument("--k-factor", type=int, default=8)
    parser.add_argument(
        "--nprobe", type=int, nargs="+", default=[128], help="lists visited (one search each)"
    )
    parser.add_argument("--train", type=int, default=100_000, help="training sample size (at most)")
    args = parser.parse_args()
    args.first = min(args.num, args.first or first_chunk(args.num))
    args.chunk = args.chunk or next(d for d in range(16_384, 0, -1) if args.first % d == 0)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.num:,} x {args.dim}-d, "
        f"IVF{args.nlist},PQ{args.pq_m}x{args.pq_bits}, refine {args.refine} "
        f"(k_factor {args.k_factor}), noise {args.noise}, "
        f"chunks {args.first:,} then {args.chunk:,}"
    )
    num_ids = args.ids or max(1, args.num // 20)
    g = torch.Generator().manual_seed(0)
    # identity centres, generated in pieces and kept in float16 (half the memory: 0.5 GB at
    # 10M items; the rounding, about 1e-5 per value, is far below the noise)
    centres = torch.empty(num_ids, args.dim, dtype=torch.float16)
    for s in range(0, num_ids, 65536):
        piece = torch.randn(min(65536, num_ids - s), args.dim, generator=g)
        centres[s : s + piece.shape[0]] = piece.div_(args.dim**0.5)
    queries = chunk_embeddings(centres, args.queries, args.noise, seed=10**9)
    k = args.k
    best_sim = torch.full((args.queries, k), -float("inf"))
    best_idx = torch.full((args.queries, k), -1, dtype=torch.int64)

    start = time.perf_counter()
    first = chunk_embeddings(centres, args.first, args.noise, seed=0)
    index = GalleryIndex.build(
        first,
        kind="ivfpq",
        metric="cosine",
        nlist=args.nlist,
        pq_m=args.pq_m,
        pq_bits=args.pq_bits,
        refine=None if args.refine == "none" else args.refine,
        k_factor=args.k_factor,
        nprobe=args.nprobe[0],
        max_train=args.train,
    )
    build_s = time.perf_counter() - start
    best_sim, best_idx = merge_top_k(best_sim, best_idx, queries, first, 0, k)
    del first
    add_s = exact_s = 0.0
    for c, offset in enumerate(range(args.first, args.num, args.chunk), start=1):
        x = chunk_embeddings(centres, min(args.chunk, args.num - offset), args.noise, seed=c)
        t = time.perf_counter()
        index.add(x)
        add_s += time.perf_counter() - t
        t = time.perf_counter()
        best_sim, best_idx = merge_top_k(best_sim, best_idx, queries, x, offset, k)
        exact_s += time.perf_counter() - t
        del x
    assert len(index) == args.num
    print(
        f"  train + first chunk {build_s:.1f} s; adding the rest {add_s:.1f} s "
        f"({args.num / max(1e-9, build_s + add_s):,.0f} items/s overall)"
    )
    print(f"  exact search for the ground truth (brute force, chunked) {exact_s:.1f} s")

    exact = best_idx.numpy()
    index.search(queries[:10], k)  # warm-up
    for nprobe in args.nprobe:
        t = time.perf_counter()
        _, found = index.search(queries, k, nprobe=nprobe)
        search_s = time.perf_counter() - t
        overlap = np.mean(
            [np.intersect1d(a, b).size / k for a, b in zip(found, exact, strict=True)]
        )
        top1 = np.mean([exact[i, 0] in found[i] for i in range(args.queries)])
        print(
            f"  nprobe {nprobe}: {args.queries} queries in {search_s:.2f} s = "
            f"{args.queries / search_s:,.0f} queries/s (k={k}); "
            f"{k}-recall@{k} = {overlap:.4f}, 1-recall@{k} = {top1:.4f}"
        )
    print(f"  peak RSS of the whole process {peak_rss_bytes() / GIB:.2f} GiB (target < 6 GiB)")


if __name__ == "__main__":
    main()
