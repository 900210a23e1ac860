"""Forward+backward of LAS + BA-DropBlock + heads: lagnet vs per-sample/per-map Python loops.

The baseline is written the way the released code is: the attention maps are selected per
sample, each part feature is pooled from its own ``(C, H, W)`` sum in a loop over samples and
maps, and the drop mask is built per sample. Both sides share the same attention convolution
and heads (same weights), so the difference is the LAS pooling and the drop block.

Each side runs in its own subprocess so that its peak RSS can be reported.

    python benchmarks/bench_layers.py [--batch 32 --channels 2048 --height 24 --width 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import Tensor, nn

from lagnet.layers import (
    BatchAttentionDropBlock,
    EmbeddingHead,
    LocalAttentionSystem,
    ReductionHead,
    global_pool,
)


class Heads(nn.Module):
    def __init__(self, c: int, num_classes: int) -> None:
        super().__init__()
        self.la_head = EmbeddingHead(c, num_classes=num_classes, embed_dim=512)
        self.la_reduction = ReductionHead(c, 256)
        self.drop_head = EmbeddingHead(c, num_classes=num_classes, embed_dim=512)
        self.drop_reduction = ReductionHead(c, 256)

    def forward(self, g_la: Tensor, g_d: Tensor) -> Tensor:
        a, b = self.la_head(g_la), self.drop_head(g_d)
        return (
            a.logits.logsumexp(1).sum()
            + b.logits.logsumexp(1).sum()
            + self.la_reduction(g_la).sum()
            + self.drop_reduction(g_d).sum()
        )


def ours(las: LocalAttentionSystem, heads: Heads, x: Tensor) -> Tensor:
    out = las(x)
    d = BatchAttentionDropBlock()(x, out.attention_maps)
    return heads(out.global_feature, global_pool(d, "max+avg")) + out.attention_features.sum()


def ours_dense(las: LocalAttentionSystem, heads: Heads, x: Tensor) -> Tensor:
    """Ours, but with the attention convolution's ordinary (dense) backward."""
    las.conv.sparse_backward = False
    return ours(las, heads, x)


def loops(las: LocalAttentionSystem, heads: Heads, x: Tensor) -> Tensor:
    b, _c, _, _ = x.shape
    k = las.num_attentions
    att = torch.relu(las.bn(las.conv(x)))
    g_la, feats, drops = [], [], []
    for i in range(b):
        order = att[i].sum(dim=(1, 2)).argsort(descending=True)[:k]
        maps = att[i][order]
        parts = []
        for j in range(k):
            s = x[i] + maps[j]
            parts.append(s.amax(dim=(1, 2)) + s.mean(dim=(1, 2)))
        v = torch.stack(parts, dim=1)  # (C, K)
        g_la.append(v.amax(dim=1) + v.mean(dim=1))
        f = v.t().reshape(-1)
        f = torch.sign(f) * torch.sqrt(f.abs() + 1e-12)
        feats.append(f / f.norm())
        with torch.no_grad():
            w = torch.sqrt(maps.sum(dim=(1, 2)) + 1e-12)
            pick = int(torch.multinomial(w / w.sum(), 1).item())
            chosen = maps[pick]
            mask = (chosen < 0.5 * chosen.max()).to(x.dtype)
        drops.append(x[i] * mask)
    d = torch.stack(drops)
    attention_features = torch.stack(feats)
    return heads(torch.stack(g_la), global_pool(d, "max+avg")) + attention_features.sum()


def run_side(side: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    las = LocalAttentionSystem(args.channels, args.attentions)
    heads = Heads(args.channels, 751)
    x = torch.rand(args.batch, args.channels, args.height, args.width, requires_grad=True)
    fn = {"ours": ours, "ours-dense": ours_dense, "loops": loops}[side]
    times = []
    for i in range(args.warmup + args.repeat):
        start = time.perf_counter()
        loss = fn(las, heads, x)
        loss.backward()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        x.grad = None
        las.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    return {"seconds": min(times), "median": sorted(times)[len(times) // 2], "peak_rss_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--attentions", type=int, default=24)
    p.add_argument("--height", type=int, default=24)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--side", choices=["ours", "ours-dense", "loops"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return
    results = {}
    for side in ("ours", "ours-dense", "loops"):
        cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    o, b = results["ours"], results["loops"]
    print(
        f"LAS + BA-DropBlock + heads, forward+backward, B={args.batch} C={args.channels} "
        f"K={args.attentions} {args.height}x{args.width}, {torch.get_num_threads()} CPU threads"
    )
    rows = (
        ("lagnet", o),
        ("lagnet, dense conv backward", results["ours-dense"]),
        ("per-sample/per-map loops", b),
    )
    for name, r in rows:
        print(
            f"  {name:28s} best {r['seconds'] * 1000:8.1f} ms  median {r['median'] * 1000:8.1f} ms"
            f"  peak RSS {r['peak_rss_mib']:7.0f} MiB"
        )
    print(f"speed-up over the loops (best): {b['seconds'] / o['seconds']:.2f}x")
    dense = results["ours-dense"]["seconds"]
    print(f"  of which the channel-sparse conv backward: {dense / o['seconds']:.2f}x")
    print(f"peak RSS ratio (ours / loops): {o['peak_rss_mib'] / b['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
