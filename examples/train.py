"""Train and evaluate LAG-Net: the reference training loop, built from lagnet's pieces.

With no arguments it is the demo: it writes the embedded synthetic dataset once, trains a small
LAG-Net on the CPU, and prints a colour-histogram baseline, the untrained network and the
trained network on the same test split (also written to ``OUTPUT/summary.json``).

    python examples/train.py                                   # the demo (CPU, minutes)
    python examples/train.py --preset tiny --output /tmp/run   # seconds, for tests
    python examples/train.py --preset reference --dataset market1501 --root data/ \\
        --backbone-weights resnet50.pth --device cuda           # the paper's recipe
    torchrun --nproc_per_node 2 examples/train.py --preset tiny # data-parallel (gloo on CPU)
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lagnet import LAGNet, LAGNetLoss, LAGNetOutput, build_lagnet
from lagnet.checkpoint import load_checkpoint, save_checkpoint, save_json
from lagnet.data import (
    DistributedPKSampler,
    ImageDataset,
    PKSampler,
    ReIDDataset,
    build_dataset,
    build_transforms,
    color_histogram_features,
    generate_synthetic_market,
)
from lagnet.evaluation import evaluate_features, extract_features

SYNTHETIC = {
    "default": {},
    "tiny": dict(
        num_train_ids=8,
        num_test_ids=8,
        images_per_id_per_cam=2,
        num_cameras=2,
        num_distractors=4,
        num_junk=2,
    ),
}
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(backbone="resnet18", height=64, width=32, epochs=20, P=8, K=4, lr=1e-3,
                 weight_decay=5e-4, milestones=(15,), warmup=2, eval_every=10,
                 num_attentions=16, synthetic="default", dataset="synthetic"),
    "tiny": dict(backbone="resnet18", height=64, width=32, epochs=2, P=2, K=2, lr=1e-3,
                 weight_decay=5e-4, milestones=(), warmup=0, eval_every=1,
                 num_attentions=4, synthetic="tiny", dataset="synthetic"),
    "reference": dict(backbone="resnet50", height=384, width=128, epochs=600, P=8, K=4,
                      lr=2e-4, weight_decay=5e-4, milestones=(320, 380, 420), warmup=0,
                      eval_every=50, num_attentions=24, synthetic="default",
                      dataset="market1501"),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--dataset", help="synthetic, market1501, dukemtmcreid, cuhk03np-detected, ...")
    p.add_argument("--root", help="dataset folder (synthetic: where to write it)")
    p.add_argument("--output", help="run folder (default runs/PRESET)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pth")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=["paper", "reference"], default="paper")
    p.add_argument("--backbone", help="torchvision ResNet name (preset default otherwise)")
    p.add_argument("--backbone-weights", help="local torchvision ImageNet state dict")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.output = Path(args.output or Path("runs") / args.preset)
    if args.root is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lagnet"
        args.root = cache / f"synthetic-{args.synthetic}" if args.dataset == "synthetic" else None
    if args.root is None:
        p.error(f"--root is required for --dataset {args.dataset}")
    return args


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    if is_main():
        print(msg, flush=True)


def progress(iterable: Any, enabled: bool, **kw: Any) -> Any:
    if not enabled or not is_main():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kw)


def load_data(args: argparse.Namespace) -> ReIDDataset:
    if args.dataset == "synthetic" and is_main():
        start = time.perf_counter()
        generate_synthetic_market(args.root, seed=0, **SYNTHETIC[args.synthetic])
        log(f"synthetic dataset at {args.root} ({time.perf_counter() - start:.1f} s)")
    if dist.is_initialized():
        dist.barrier()
    data = build_dataset(args.dataset, args.root)
    log(data.summary())
    return data


def test_loaders(data: ReIDDataset, args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    tf = build_transforms(args.height, args.width, train=False)
    return tuple(  # type: ignore[return-value]
        DataLoader(ImageDataset(r, tf), batch_size=64, num_workers=args.workers)
        for r in (data.query, data.gallery)
    )


def evaluate(model: torch.nn.Module, loaders: tuple[DataLoader, DataLoader], args: Any) -> dict:
    """Flip-TTA features, Euclidean ranking, Market-1501 protocol."""
    show = not args.no_progress
    q = extract_features(model, loaders[0], device=args.device, progress=show)
    g = extract_features(model, loaders[1], device=args.device, progress=show)
    return metrics(q.features, g.features, (q.pids, g.pids, q.camids, g.camids))


def histogram_baseline(data: ReIDDataset) -> dict:
    """The colour-only matcher the network has to beat."""
    q, g = color_histogram_features(data.query), color_histogram_features(data.gallery)
    ids = [[r.pid for r in data.query], [r.pid for r in data.gallery]]
    cams = [[r.camid for r in data.query], [r.camid for r in data.gallery]]
    return metrics(q, g, (ids[0], ids[1], cams[0], cams[1]))


def metrics(q: torch.Tensor, g: torch.Tensor, labels: tuple[Any, Any, Any, Any]) -> dict:
    r = evaluate_features(q, g, *labels)
    return {"mAP": r.mAP, "rank1": float(r.cmc[0]), "rank5": float(r.cmc[4]), "mINP": r.mINP}


def lr_factor(args: argparse.Namespace) -> Any:
    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / args.warmup) if args.warmup else 1.0
        return warm * 0.1 ** sum(epoch >= m for m in args.milestones)

    return factor


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    data = load_data(args)

    train_set = ImageDataset(data.train, build_transforms(args.height, args.width, train=True))
    pids = [r.pid for r in data.train]
    sampler: PKSampler = (
        DistributedPKSampler(pids, args.P, args.K, seed=args.seed)
        if dist.is_initialized()
        else PKSampler(pids, args.P, args.K, seed=args.seed)
    )
    train_loader = DataLoader(
        train_set,
        args.P * args.K,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,
        pin_memory=cuda,
    )
    loaders = test_loaders(data, args)

    model: LAGNet = build_lagnet(
        data.num_train_pids,
        backbone=args.backbone,
        variant=args.variant,
        num_attentions=args.num_attentions,
        backbone_weights=args.backbone_weights,
    ).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    criterion = LAGNetLoss.from_spec(
        "1*CrossEntropy+2*Triplet+1*L2",
        num_classes=data.num_train_pids,
        attention_dim=model.attention_dim,
        margin=1.2,
    ).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=args.lr,
        weight_decay=args.weight_decay,
        betas=(0.9, 0.999),
        amsgrad=True,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    net: torch.nn.Module = model
    if dist.is_initialized():
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if cuda else None,
            find_unused_parameters=args.variant == "reference",  # unused stripe reductions
        )

    state: dict[str, Any] = {"epoch": 0, "history": [], "best_mAP": -1.0, "summary": {}}
    last = args.output / "last.pth"
    if args.resume and last.is_file():
        ckpt = load_checkpoint(last, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        criterion.load_state_dict(ckpt["criterion"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if cuda and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        state = ckpt["state"]
        log(f"resumed from {last} at epoch {state['epoch']}")
    elif args.dataset == "synthetic" and is_main():  # the demo's comparison table
        state["summary"]["histogram"] = histogram_baseline(data)
        state["summary"]["untrained"] = evaluate(model, loaders, args)

    def checkpoint(path: Path) -> None:
        ckpt = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "criterion": criterion.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "state": state,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        if cuda:
            ckpt["rng_cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(ckpt, path)

    start_time = time.perf_counter()
    for epoch in range(state["epoch"], args.epochs):
        net.train()
        sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        lr = optimizer.param_groups[0]["lr"]
        bar = progress(
            train_loader,
            not args.no_progress,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            leave=False,
            unit="batch",
        )
        for images, labels, _ in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=cuda):
                out: LAGNetOutput = net(images)
                loss, parts = criterion(out, labels)
            if not math.isfinite(loss.item()):
                raise SystemExit(
                    f"loss became {loss.item()} at epoch {epoch + 1}; stopping. The last good "
                    f"checkpoint is kept at {last} (resume with --resume, maybe with a lower lr)"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        scheduler.step()
        entry: dict[str, float] = {"epoch": epoch + 1, "lr": lr}
        entry.update({k: v / max(1, len(train_loader)) for k, v in sums.items()})
        evaluate_now = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
        if is_main() and evaluate_now:
            entry.update(evaluate(model, loaders, args))
        state["epoch"] = epoch + 1
        state["history"].append(entry)
        log(
            "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
            )
        )
        if is_main() and entry.get("mAP", -1.0) > state["best_mAP"]:
            state["best_mAP"] = entry["mAP"]
            checkpoint(args.output / "best.pth")
        if is_main():
            checkpoint(last)
            save_json(state["history"], args.output / "log.json")
            plot(state["history"], args.output)
        if dist.is_initialized():
            dist.barrier()
    elapsed = time.perf_counter() - start_time

    summary = dict(state["summary"])
    if is_main():
        if state["history"] and "mAP" in state["history"][-1]:
            summary["trained"] = {
                k: state["history"][-1][k] for k in ("mAP", "rank1", "rank5", "mINP")
            }
        save_json(summary, args.output / "summary.json")
        log(f"\ntrained {args.epochs} epochs in {elapsed:.0f} s; results on the test split:")
        log(f"{'':12s} {'mAP':>7s} {'rank-1':>7s} {'rank-5':>7s} {'mINP':>7s}")
        for name, m in summary.items():
            log(f"{name:12s} {m['mAP']:7.3f} {m['rank1']:7.3f} {m['rank5']:7.3f} {m['mINP']:7.3f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def plot(history: list[dict[str, float]], output: Path) -> None:
    from lagnet.viz import plot_training_curves, save_figure

    try:
        fig = plot_training_curves(history, metric_keys=("mAP", "rank1", "rank5", "mINP"))
    except ImportError:  # matplotlib is an optional extra: no plot, the JSON log has it all
        return
    save_figure(fig, output / "curves.png")


if __name__ == "__main__":
    main()
