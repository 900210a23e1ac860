"""Benchmark of k-reciprocal re-ranking from features at MSMT17 size (a script, not a test).

    python benchmarks/bench_rerank.py               # 11,659 x 82,161, 2,048-d (about 10 min)
    python benchmarks/bench_rerank.py --scale 0.1   # 1,166 x 8,216: a smoke run

1. Equality: on a 1,000 x 5,000 subsample (scaled down with --scale below 1), the dense method
   (`re_ranking` on the three `pairwise_distance` matrices) and `re_ranking_features` agree
   within 1e-5 (largest difference printed).
2. Scale: `evaluate_features(..., rerank=True)` on synthetic clustered 2,048-d features of
   MSMT17's size (times --scale), in a child process: wall time and peak RSS of the whole
   process. The dense method would need the (Q + G)^2 float32 matrix alone: 35 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from lagnet.evaluation import (
    evaluate_features,
    iter_re_ranking_features,
    pairwise_distance,
    re_ranking,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_eval import GIB, current_rss_bytes, peak_rss_bytes, reid_features

MSMT = (11_659, 82_161, 3_060, 2_048)  # queries, gallery, ids, dims


def equality(nq: int, ng: int, dim: int) -> None:
    qf, gf, *_ = reid_features(nq, ng, max(10, ng // 7), dim, 0, 0.33, seed=3)
    start = time.perf_counter()
    dense = re_ranking(
        pairwise_distance(qf, gf), pairwise_distance(qf, qf), pairwise_distance(gf, gf)
    )
    dense_s = time.perf_counter() - start
    start = time.perf_counter()
    chunks = torch.cat([block for _, block in iter_re_ranking_features(qf, gf)])
    ours_s = time.perf_counter() - start
    diff = (chunks - dense).abs().max().item()
    print(f"== equality, {nq} x {ng}, {dim}-d ==")
    print(f"  max |re_ranking_features - re_ranking| = {diff:.2e} (target <= 1e-5)")
    print(f"  dense {dense_s:.1f} s, from features {ours_s:.1f} s")


def child(args: argparse.Namespace) -> dict[str, Any]:
    qf, gf, q_pids, g_pids, q_cams, g_cams = reid_features(
        args.nq, args.ng, args.ids, args.dim, 0, 0.33, seed=1
    )
    rss_inputs = current_rss_bytes()
    start = time.perf_counter()
    plain = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=True)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "plain_s": plain_s,
        "peak_rss": peak_rss_bytes(),
        "rss_inputs": rss_inputs,
        "mAP": res.mAP,
        "rank1": res.rank1,
        "plain_mAP": plain.mAP,
        "plain_rank1": plain.rank1,
    }


def scale_run(nq: int, ng: int, ids: int, dim: int) -> None:
    print(f"== evaluate_features(rerank=True), {nq} x {ng}, {dim}-d float32 ({ids} ids) ==")
    cmd = [sys.executable, __file__, "--child", "--nq", str(nq), "--ng", str(ng)]
    cmd += ["--ids", str(ids), "--dim", str(dim)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        print(f"  failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return
    r = json.loads(lines[0][len("RESULT ") :])
    print(
        f"  without re-ranking: mAP={r['plain_mAP']:.4f} rank1={r['plain_rank1']:.4f} "
        f"({r['plain_s']:.1f} s)"
    )
    print(f"  with re-ranking:    mAP={r['mAP']:.4f} rank1={r['rank1']:.4f} ({r['wall_s']:.1f} s)")
    print(
        f"  peak RSS of the whole process {r['peak_rss'] / GIB:.2f} GiB (target < 8 GiB; "
        f"features loaded: {r['rss_inputs'] / GIB:.2f} GiB); re-ranked evaluation "
        f"{r['wall_s'] / 60:.1f} min (target < 10 min)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of MSMT17's size")
    parser.add_argument("--skip-equality", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("nq", "ng", "ids", "dim"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    nq, ng, ids, dim = MSMT
    small = min(1.0, args.scale)
    if not args.skip_equality:
        equality(max(20, round(1000 * small)), max(100, round(5000 * small)), dim)
    if not args.skip_scale:
        s = args.scale
        scale_run(max(20, round(nq * s)), max(100, round(ng * s)), max(10, round(ids * s)), dim)


if __name__ == "__main__":
    main()
