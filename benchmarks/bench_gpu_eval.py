"""Evaluation on the GPU at Market-1501 size, with and without re-ranking (a script, not a test).

    python benchmarks/bench_gpu_eval.py              # 3,368 x 15,913, 2,048-d, on CUDA
    python benchmarks/bench_gpu_eval.py --cpu-smoke  # small, on the CPU (for CI)

``evaluate_features`` on clustered float32 features that are already on the GPU (as
``extract_features`` leaves them), end to end: distances, k-reciprocal re-ranking (neighbour
search and sparse steps on the GPU), ranking and metrics, until the numbers are on the host.
Median of ``--repeats`` runs after a warm-up. The same call on the CPU gives the reference
numbers; the largest metric gap is printed (a GPU's matrix product rounds the last bit of some
distances differently, which can swap near-tied gallery items: 7.5e-9 in mAP on an H200).
Target: re-ranked Market-size evaluation in < 1 s on the GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from lagnet.evaluation import RankResult, evaluate_features

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_eval import reid_features

MARKET = (3368, 15913, 751, 2048, 2652)  # queries, gallery, ids, dims, distractors
SMOKE = (60, 300, 20, 32, 30)


def timed(args: tuple[torch.Tensor, ...], rerank: bool, repeats: int) -> tuple[float, RankResult]:
    """Median seconds of ``evaluate_features`` (results are host numbers: the device is done)."""
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = evaluate_features(*args, rerank=rerank)
        times.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="small sizes, CPU only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-cpu", action="store_true", help="no CPU reference run")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, sizes = torch.device("cpu"), SMOKE
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), MARKET
    else:
        p.error("no CUDA GPU found; use --cpu-smoke to run the script small on the CPU")
    nq, ng, ids, dim, distractors = sizes
    qf, gf, q_pids, g_pids, q_cams, g_cams = reid_features(nq, ng, ids, dim, distractors, 0.33, 1)
    on_host = (qf, gf, q_pids, g_pids, q_cams, g_cams)
    on_device = (qf.to(device), gf.to(device), q_pids, g_pids, q_cams, g_cams)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"{name}, torch {torch.__version__}: {nq} x {ng}, {dim}-d, {os.cpu_count()} CPUs")
    wq, wg = max(30, nq // 10), max(60, ng // 10)
    warm = (
        on_device[0][:wq],
        on_device[1][:wg],
        q_pids[:wq],
        g_pids[:wg],
        q_cams[:wq],
        g_cams[:wg],
    )
    evaluate_features(*warm, rerank=True)  # warm-up: CUDA context, cuBLAS, allocator
    print(f"{'':10s} {'device s':>9s} {'CPU s':>8s} {'mAP':>8s} {'mINP':>8s}  vs CPU")
    for rerank in (False, True):
        seconds, got = timed(on_device, rerank, args.repeats)
        label = "re-ranked" if rerank else "plain"
        if args.skip_cpu:
            print(f"{label:10s} {seconds:9.3f} {'-':>8s} {got.mAP:8.5f} {got.mINP:8.5f}")
            continue
        cpu_seconds, want = timed(on_host, rerank, 1)
        same = got.mAP == want.mAP and got.mINP == want.mINP and list(got.cmc) == list(want.cmc)
        gap = max(abs(got.mAP - want.mAP), abs(got.mINP - want.mINP))
        print(
            f"{label:10s} {seconds:9.3f} {cpu_seconds:8.3f} {got.mAP:8.5f} {got.mINP:8.5f}  "
            f"{'identical' if same else f'largest metric gap {gap:.2e}'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
