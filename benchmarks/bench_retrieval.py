"""Benchmark of lagnet.retrieval.GalleryIndex at city scale (a script, not a test).

    python benchmarks/bench_retrieval.py                 # 10 million 512-d embeddings
    python benchmarks/bench_retrieval.py --num 1000000   # 1 million

Synthetic re-ID-like embeddings (identity centres plus noise, L2-normalised, cosine metric) are
generated chunk by chunk: each chunk is added to an IVF-PQ index and, for the 1,000 queries,
merged into their exact top-k by brute force, so no chunk is kept. Printed: build and add time,
peak RSS of the whole process (target < 6 GiB), query throughput, and recall against exact
search in two conventions: k-recall@k (the share of the exact k nearest among the k returned,
what `evaluate_index` reports) and 1-recall@k (the share of queries whose exact nearest
neighbour is among the k returned, faiss' "R@k"). Target: recall@10 >= 0.9. The default index:
IVF-PQ with 64 4-bit codes (fast scan), re-ranked with a 4-bit scalar-quantised copy of each
vector (about 300 bytes per item).
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
    x = centres[pids] + noise * torch.randn(count, centres.shape[1], generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def merge_top_k(
    best_sim: torch.Tensor,
    best_idx: torch.Tensor,
    queries: torch.Tensor,
    chunk: torch.Tensor,
    offset: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` (largest cosine similarity) of the queries over the items seen so far."""
    for s in range(0, chunk.shape[0], 65536):
        sim = queries @ chunk[s : s + 65536].T
        top = torch.topk(sim, min(k, sim.shape[1]), dim=1)
        cand_sim = torch.cat([best_sim, top.values], dim=1)
        cand_idx = torch.cat([best_idx, top.indices + offset + s], dim=1)
        keep = torch.topk(cand_sim, k, dim=1).indices
        best_sim, best_idx = cand_sim.gather(1, keep), cand_idx.gather(1, keep)
    return best_sim, best_idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num", type=int, default=10_000_000, help="gallery embeddings")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ids", type=int, default=None, help="identities (default num / 20)")
    parser.add_argument("--noise", type=float, default=0.02, help="noise per dimension")
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--pq-m", type=int, default=64, help="PQ sub-quantisers")
    parser.add_argument("--pq-bits", type=int, default=4, help="bits per sub-quantiser")
    parser.add_argument("--refine", default="sq4", help="flat, sq8, sq6, sq4 or none")
    parser.add_argument("--k-factor", type=int, default=8)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--train", type=int, default=65_536, help="training sample size")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.num:,} x {args.dim}-d, "
        f"IVF{args.nlist},PQ{args.pq_m}x{args.pq_bits}, refine {args.refine} "
        f"(k_factor {args.k_factor}), nprobe {args.nprobe}, noise {args.noise}"
    )
    num_ids = args.ids or max(1, args.num // 20)
    g = torch.Generator().manual_seed(0)
    # identity centres, generated in pieces (num_ids x dim floats)
    centres = torch.randn(num_ids, args.dim, generator=g) / args.dim**0.5
    queries = chunk_embeddings(centres, args.queries, args.noise, seed=10**9)
    k = args.k
    best_sim = torch.full((args.queries, k), -float("inf"))
    best_idx = torch.full((args.queries, k), -1, dtype=torch.int64)

    start = time.perf_counter()
    first = chunk_embeddings(centres, min(args.chunk, args.num), args.noise, seed=0)
    index = GalleryIndex.build(
        first,
        kind="ivfpq",
        metric="cosine",
        nlist=args.nlist,
        pq_m=args.pq_m,
        pq_bits=args.pq_bits,
        refine=None if args.refine == "none" else args.refine,
        k_factor=args.k_factor,
        nprobe=args.nprobe,
        max_train=args.train,
    )
    build_s = time.perf_counter() - start
    best_sim, best_idx = merge_top_k(best_sim, best_idx, queries, first, 0, k)
    del first
    add_s = exact_s = 0.0
    for c, offset in enumerate(range(args.chunk, args.num, args.chunk), start=1):
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

    t = time.perf_counter()
    _, found = index.search(queries, k)
    search_s = time.perf_counter() - t
    exact = best_idx.numpy()
    overlap = np.mean([np.intersect1d(a, b).size / k for a, b in zip(found, exact, strict=True)])
    top1 = np.mean([exact[i, 0] in found[i] for i in range(args.queries)])
    print(
        f"  search: {args.queries} queries in {search_s:.2f} s = "
        f"{args.queries / search_s:,.0f} queries/s (k={k})"
    )
    print(f"  {k}-recall@{k} (overlap with the exact top {k}) = {overlap:.4f}")
    print(f"  1-recall@{k} (exact nearest neighbour found in the top {k}) = {top1:.4f}")
    print(f"  peak RSS of the whole process {peak_rss_bytes() / GIB:.2f} GiB (target < 6 GiB)")


if __name__ == "__main__":
    main()
