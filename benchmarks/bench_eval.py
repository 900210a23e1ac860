"""Benchmarks of lagnet.evaluation (a script, not a test).

    python benchmarks/bench_eval.py            # full sizes (several minutes on 2 cores)
    python benchmarks/bench_eval.py --quick    # small sizes, a smoke run of every part

1. evaluate_rank at Market-1501 size (3,368 x 15,913, 751 ids + 2,652 pid-0 distractors,
   6 cameras) against the plain per-query protocol (lagnet.evaluation.protocol), on distances of
   clustered features ("typical": mAP ~0.84 / mINP ~0.44, like a plain ResNet-50 baseline;
   "hard": mAP ~0.47 / mINP ~0.08) and on unstructured random distances (the worst case for
   evaluate_rank, whose cost grows with how deep the last match of each query is).
2. evaluate_features at MSMT17 size (11,659 x 82,161, 2,048-d float32): wall time and peak RSS
   of the whole process (run in a child process so nothing else inflates it).
3. re_ranking at Market-1501 size against a dense NumPy formulation of the algorithm: time and
   peak RSS, each in its own child process, and the largest difference of their outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from lagnet.evaluation import evaluate_features, evaluate_rank, pairwise_distance, re_ranking
from lagnet.evaluation.protocol import evaluate_rank_reference

GIB = 1024**3


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------ data


def reid_features(
    nq: int, ng: int, n_ids: int, dim: int, n_distractors: int, scale: float, seed: int
) -> tuple[torch.Tensor, ...]:
    """Clustered float32 features: identity centre * scale + unit noise; distractors (pid 0)
    are pure noise. Generated block by block to avoid large temporaries."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_ids + 1, dim, generator=g) * scale
    q_pids = torch.randint(1, n_ids + 1, (nq,), generator=g)
    g_pids = torch.randint(1, n_ids + 1, (ng,), generator=g)
    g_pids[ng - n_distractors :] = 0
    q_cams = torch.randint(0, 6, (nq,), generator=g)
    g_cams = torch.randint(0, 6, (ng,), generator=g)
    feats = []
    for pids in (q_pids, g_pids):
        f = torch.empty(pids.shape[0], dim)
        for s in range(0, pids.shape[0], 4096):
            block = torch.randn(min(4096, pids.shape[0] - s), dim, generator=g)
            block += centres[pids[s : s + 4096]] * (pids[s : s + 4096] > 0)[:, None]
            f[s : s + 4096] = block
        feats.append(f)
    return feats[0], feats[1], q_pids, g_pids, q_cams, g_cams


# ------------------------------------------------------------------------------ baselines


def dense_re_ranking(
    q_g: npt.NDArray[Any],
    q_q: npt.NDArray[Any],
    g_g: npt.NDArray[Any],
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> npt.NDArray[np.float32]:
    """Dense NumPy k-reciprocal re-ranking with per-row loops, as commonly written: full
    (N, N) original distance, argsort, V and V_qe, inverted index. Stable argsort so exact ties
    are ordered like lagnet's."""
    nq = q_g.shape[0]
    full = np.concatenate(
        [np.concatenate([q_q, q_g], axis=1), np.concatenate([q_g.T, g_g], axis=1)], axis=0
    )
    original = np.square(full).astype(np.float32)
    del full
    original = np.transpose(original / np.max(original, axis=0))
    n = original.shape[0]
    ranking = np.argsort(original, axis=1, kind="stable").astype(np.int32)
    half = int(np.around(k1 / 2.0))
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        forward = ranking[i, : k1 + 1]
        recip = forward[np.any(ranking[forward, : k1 + 1] == i, axis=1)]
        expansion = recip
        for c in recip:
            c_forward = ranking[c, : half + 1]
            c_recip = c_forward[np.any(ranking[c_forward, : half + 1] == c, axis=1)]
            if len(np.intersect1d(c_recip, recip)) > 2.0 / 3.0 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    original = original[:nq]
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[ranking[i, :k2]], axis=0)
        v = v_qe
        del v_qe
    del ranking
    rows, cols = np.nonzero(v)
    by_col = np.argsort(cols, kind="stable")
    inverted = np.split(rows[by_col], np.cumsum(np.bincount(cols, minlength=n))[:-1])
    jaccard = np.zeros((nq, n), dtype=np.float32)
    for i in range(nq):
        overlap = np.zeros(n, dtype=np.float32)
        for col in np.flatnonzero(v[i]):
            members = inverted[col]
            overlap[members] += np.minimum(v[i, col], v[members, col])
        jaccard[i] = 1 - overlap / (2.0 - overlap)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:, nq:].astype(np.float32, copy=False)


# ------------------------------------------------------------------------------ children


def child_msmt(args: argparse.Namespace) -> dict[str, Any]:
    qf, gf, q_pids, g_pids, q_cams, g_cams = reid_features(
        args.nq, args.ng, args.ids, args.dim, 0, args.scale, seed=1
    )
    rss_inputs = current_rss_bytes()
    start = time.perf_counter()
    res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "peak_rss": peak_rss_bytes(),
        "rss_inputs": rss_inputs,
        "feature_bytes": (qf.numel() + gf.numel()) * 4,
        "mAP": res.mAP,
        "rank1": res.rank1,
        "mINP": res.mINP,
    }


def child_rerank(args: argparse.Namespace) -> dict[str, Any]:
    qf, gf, *_ = reid_features(args.nq, args.ng, 751, 128, args.ng // 6, 0.8, seed=2)
    q_g = pairwise_distance(qf, gf).numpy()
    q_q = pairwise_distance(qf, qf).numpy()
    g_g = pairwise_distance(gf, gf).numpy()
    del qf, gf
    rss_inputs = current_rss_bytes()
    start = time.perf_counter()
    if args.child == "rerank-lagnet":
        out = re_ranking(q_g, q_q, g_g)
    else:
        out = dense_re_ranking(q_g, q_q, g_g)
    wall = time.perf_counter() - start
    np.save(args.out, out)
    return {"wall_s": wall, "peak_rss": peak_rss_bytes(), "rss_inputs": rss_inputs}


def run_child(name: str, extra: list[str], timeout: float) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--child", name, *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  {name}: timed out after {timeout:.0f} s")
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    print(f"  {name} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return None


# ------------------------------------------------------------------------------ parts


def bench_market(nq: int, ng: int, repeats: int) -> None:
    print(f"== evaluate_rank, {nq} x {ng} (751 ids + distractors, 6 cameras) ==")
    cases: list[tuple[str, npt.NDArray[Any]]] = []
    for label, scale in (("typical", 1.0), ("hard", 0.8)):
        qf, gf, q_pids, g_pids, q_cams, g_cams = reid_features(nq, ng, 751, 128, ng // 6, scale, 0)
        cases.append((label, pairwise_distance(qf, gf).numpy()))
    rng = torch.Generator().manual_seed(1)
    cases.append(("unstructured", torch.rand(nq, ng, generator=rng).numpy()))
    ids = [x.numpy() for x in (q_pids, g_pids, q_cams, g_cams)]
    for label, dist in cases:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            res = evaluate_rank(dist, *ids)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = evaluate_rank_reference(dist, *ids)
        base = time.perf_counter() - t
        ours = min(times)
        print(f"  [{label}] mAP={res.mAP:.6f} rank1={res.rank1:.6f} mINP={res.mINP:.6f}")
        print(
            f"  [{label}] lagnet: best {ours:.3f} s, median {statistics.median(times):.3f} s "
            f"({repeats} runs); plain per-query protocol: {base:.2f} s; speed-up {base / ours:.1f}x"
        )
        same = (
            np.array_equal(res.cmc, ref.cmc)
            and np.array_equal(res.ap, ref.ap, equal_nan=True)
            and np.array_equal(res.inp, ref.inp, equal_nan=True)
            and (res.mAP, res.mINP) == (ref.mAP, ref.mINP)
        )
        print(f"  [{label}] identical to the protocol, bit for bit: {same}")
        assert same


def bench_msmt(nq: int, ng: int, ids: int, dim: int) -> None:
    print(f"== evaluate_features, {nq} x {ng}, {dim}-d float32 ({ids} ids) ==")
    extra = ["--nq", str(nq), "--ng", str(ng), "--ids", str(ids), "--dim", str(dim)]
    r = run_child("msmt", extra, timeout=3600)
    if r is None:
        return
    print(f"  mAP={r['mAP']:.4f} rank1={r['rank1']:.4f} mINP={r['mINP']:.4f}")
    print(f"  wall {r['wall_s']:.1f} s")
    print(
        f"  peak RSS {r['peak_rss'] / GIB:.2f} GiB (the whole process; RSS with inputs ready "
        f"{r['rss_inputs'] / GIB:.2f} GiB, so +{(r['peak_rss'] - r['rss_inputs']) / GIB:.2f} GiB "
        f"for the call; features alone {r['feature_bytes'] / GIB:.2f} GiB)"
    )


def bench_rerank(nq: int, ng: int, dense_timeout: float) -> None:
    print(f"== re_ranking, {nq} x {ng} (k1=20, k2=6, lambda=0.3), float32 inputs ==")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("rerank-lagnet", "rerank-dense"):
            out = os.path.join(tmp, f"{name}.npy")
            extra = ["--nq", str(nq), "--ng", str(ng), "--out", out]
            r = run_child(name, extra, timeout=dense_timeout if "dense" in name else 3600)
            if r is None:
                continue
            results[name] = np.load(out)
            print(
                f"  {name:14s} {r['wall_s']:7.1f} s; peak RSS {r['peak_rss'] / GIB:.2f} GiB "
                f"(inputs loaded: {r['rss_inputs'] / GIB:.2f} GiB, so "
                f"+{(r['peak_rss'] - r['rss_inputs']) / GIB:.2f} GiB for the call)"
            )
        if len(results) == 2:
            diff = np.abs(results["rerank-lagnet"] - results["rerank-dense"]).max()
            print(f"  max |lagnet - dense| = {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--skip", nargs="*", default=[], choices=["market", "msmt", "rerank"])
    parser.add_argument("--rerank-size", type=int, nargs=2, metavar=("Q", "G"))
    parser.add_argument("--dense-timeout", type=float, default=1800.0)
    # child-process options
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--nq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ng", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=0.33, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child_msmt(args) if args.child == "msmt" else child_rerank(args)
        print("RESULT " + json.dumps(result))
        return

    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}"
    )
    if args.quick:
        market, msmt, rerank, repeats = (600, 3000), (1000, 8000, 300, 256), (300, 1500), 2
    else:
        market, msmt, rerank, repeats = (3368, 15913), (11659, 82161, 3060, 2048), (3368, 15913), 5
    if args.rerank_size:
        rerank = tuple(args.rerank_size)
    if "market" not in args.skip:
        bench_market(*market, repeats=repeats)
    if "msmt" not in args.skip:
        bench_msmt(*msmt)
    if "rerank" not in args.skip:
        bench_rerank(*rerank, dense_timeout=args.dense_timeout)


if __name__ == "__main__":
    main()
