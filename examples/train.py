"""Train LAG-Net in your own code: one loop, top to bottom, on lagnet's public API.

With no arguments it trains the demo: a synthetic Market-1501-format dataset (written once into
~/.cache/lagnet/), a small LAG-Net (ResNet-18 trunk, 64x32 input) on the CPU for 20 epochs,
then the colour-histogram baseline and the network's scores on the same test split.

    python examples/train.py                                    # the demo (CPU, minutes)
    python examples/train.py --dataset market1501 --root data/ --backbone resnet50 \\
        --input-size 384 128 --lr 2e-4 --epochs 600 --milestones 320 380 420 --warmup 0 \\
        --eval-every 50 --num-attentions 24 --backbone-weights imagenet --device cuda

`lagnet train` runs this same loop inside a run folder (checkpoints, exact --resume, torchrun,
curves); this file shows the pieces, to copy into your own code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lagnet import LAGNetLoss, build_lagnet
from lagnet.data import PKSampler, build_dataset, build_loader, generate_synthetic_market
from lagnet.data import color_histogram_features as histograms
from lagnet.engine import NonFiniteLossError, TrainStep, default_amp, evaluate, train_one_epoch
from lagnet.evaluation import RankResult, evaluate_features


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)  # a bad flag is one line, like every other user error


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic", help="synthetic, market1501, msmt17, ...")
    p.add_argument("--root", help="dataset folder (default: the demo's, in ~/.cache/lagnet)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--cache", default="auto", choices=["auto", "device", "host", "off"])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--backbone-weights", help="'imagenet' or a torchvision state dict file")
    p.add_argument("--input-size", type=positive, nargs=2, default=[64, 32], metavar=("H", "W"))
    p.add_argument("--num-attentions", type=positive, default=16)
    p.add_argument("--ids-per-batch", type=positive, default=8, help="P identities per batch")
    p.add_argument("--images-per-id", type=positive, default=4, help="K images per identity")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=positive, default=20)
    p.add_argument("--milestones", type=positive, nargs="*", default=[15], help="lr x 0.1 at")
    p.add_argument("--warmup", type=int, default=2, help="epochs of linear lr warm-up")
    p.add_argument("--eval-every", type=positive, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--output", help="save the trained weights (a state dict) to this file")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def scores(result: RankResult) -> dict[str, float]:
    cmc = result.cmc
    rank5 = float(cmc[min(4, len(cmc) - 1)])
    return {"mAP": result.mAP, "rank1": float(cmc[0]), "rank5": rank5, "mINP": result.mINP}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse(argv)
    device, show = torch.device(args.device), not args.no_progress
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    torch.manual_seed(args.seed)  # the model's initial weights and the augmentation draws

    # 1. Data. Each split is decoded once into a uint8 tensor (on the GPU, in RAM, or not at
    #    all when it does not fit: then a DataLoader decodes every batch); the training batches
    #    are flipped and erased where they are used. The PK sampler indexes the cache directly.
    if args.root is None and args.dataset != "synthetic":
        raise ValueError(f"--root is required for --dataset {args.dataset}")
    demo = Path.home() / ".cache" / "lagnet" / "synthetic-default"  # written once, then reused
    root = Path(args.root).expanduser() if args.root else generate_synthetic_market(demo, seed=0)
    data = build_dataset(args.dataset, root)
    print(data.summary())
    height, width = args.input_size
    P, K = args.ids_per_batch, args.images_per_id
    sampler = PKSampler([r.pid for r in data.train], P, K, seed=args.seed)
    train_loader = build_loader(data.train, height, width, train=True, batch_size=P * K,
                                sampler=sampler, cache=args.cache, device=device,
                                progress=show)  # fmt: skip
    query, gallery = (build_loader(split, height, width, train=False, batch_size=64,
                                   cache=args.cache, device=device, progress=show)
                      for split in (data.query, data.gallery))  # fmt: skip

    # 2. The network, the paper's loss (cross-entropy + 2 x triplet + attention centres), Adam
    #    with AMSGrad, warm-up then steps of x0.1; the engine's step adds autocast on a GPU.
    model = build_lagnet(data.num_train_pids, backbone=args.backbone,
                         num_attentions=args.num_attentions,
                         backbone_weights=args.backbone_weights).to(device)  # fmt: skip
    criterion = LAGNetLoss.from_spec("1*CrossEntropy+2*Triplet+1*L2", margin=1.2,
                                     num_classes=data.num_train_pids,
                                     attention_dim=model.attention_dim).to(device)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=5e-4, amsgrad=True)

    def lr_factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / args.warmup) if args.warmup > 0 else 1.0
        return warm * 0.1 ** sum(epoch >= m for m in args.milestones)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    amp = default_amp(device)  # bf16 on recent GPUs, float32 on the CPU
    step = TrainStep(model, criterion, optimizer, amp=amp, compile=args.compile,
                     channels_last=device.type == "cuda")  # fmt: skip

    def test() -> dict[str, float]:  # flip-TTA embeddings, Euclidean ranking, Market protocol
        return scores(evaluate(model, query, gallery, flip=True, amp=amp, device=device))

    results: dict[str, dict[str, float]] = {}
    if args.dataset == "synthetic":  # the demo's yardsticks: a colour-histogram matcher, and
        results["histogram"] = scores(evaluate_features(  # the network before training
            histograms(data.query), histograms(data.gallery),
            [r.pid for r in data.query], [r.pid for r in data.gallery],
            [r.camid for r in data.query], [r.camid for r in data.gallery],
        ))  # fmt: skip
        results["untrained"] = test()

    # 3. The epochs: one pass of the sampler each, scores now and then.
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a new identity order and draw every epoch
        losses = train_one_epoch(step, train_loader, epoch=epoch, progress=show,
                                 log_every=1 if device.type == "cpu" else 50)  # fmt: skip
        scheduler.step()
        line = f"epoch {epoch + 1}  " + "  ".join(f"{k} {v:.4g}" for k, v in losses.items())
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            results["trained"] = test()
            line += "  " + "  ".join(f"{k} {v:.4g}" for k, v in results["trained"].items())
        print(line, flush=True)
    if args.output:
        torch.save(model.state_dict(), args.output)  # build_lagnet(..., weights=) reads it

    print(f"\n{'':12s} {'mAP':>7s} {'rank-1':>7s} {'rank-5':>7s} {'mINP':>7s}")
    for name, m in results.items():
        print(f"{name:12s} " + " ".join(f"{v:7.3f}" for v in m.values()))
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, OSError, NonFiniteLossError) as err:
        print(f"train.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)  # 2: bad flags, files, data
