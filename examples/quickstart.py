"""Quickstart: build LAG-Net, embed a batch, rank a tiny gallery, print shapes and timing.

python examples/quickstart.py [--backbone resnet50] [--batch 8] [--height 384 --width 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lagnet import build_lagnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--variant", default="paper", choices=["paper", "reference"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_lagnet(751, backbone=args.backbone, variant=args.variant).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"LAG-Net ({args.variant}, {args.backbone}): {params:.1f} M parameters")

    images = torch.randn(args.batch, 3, args.height, args.width)
    with torch.inference_mode():
        model.embed(images[:1])  # warm-up
        start = time.perf_counter()
        emb = model.embed(images)
        elapsed = time.perf_counter() - start
        model.train()
        out = model.forward_train(images[: max(2, min(4, args.batch))])
        model.eval()
    print(
        f"eval embedding: {tuple(emb.shape)} in {elapsed * 1000:.0f} ms "
        f"({args.batch / elapsed:.1f} images/s on {torch.get_num_threads()} CPU threads)"
    )
    print("training outputs:")
    print(f"  logits: {', '.join(f'{k} {tuple(v.shape)}' for k, v in out.logits.items())}")
    print(
        f"  triplet features: "
        f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in out.triplet_features.items())}"
    )
    print(
        f"  attention features {tuple(out.attention_features.shape)}, "
        f"attention maps {tuple(out.attention_maps.shape)}"
    )

    feats = F.normalize(emb, dim=1)
    dist = torch.cdist(feats[:1], feats[1:])
    order = dist.argsort(dim=1)[0].tolist()
    print(f"gallery ranked for image 0: {[i + 1 for i in order]}")


if __name__ == "__main__":
    main()
