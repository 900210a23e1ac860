"""Train and evaluate LAG-Net: the short, readable version of ``lagnet train``.

With no arguments it is the demo: it writes the embedded synthetic dataset once, trains a small
LAG-Net on the CPU, and prints a colour-histogram baseline, the untrained network and the
trained network on the same test split (also written to ``OUTPUT/summary.json``).

    python examples/train.py                                   # the demo (CPU, minutes)
    python examples/train.py --preset tiny --output /tmp/run   # seconds, for tests
    python examples/train.py --preset reference --dataset market1501 --root data/ \\
        --backbone-weights resnet50.pth --device cuda           # the paper's recipe
    torchrun --nproc_per_node 2 examples/train.py --preset tiny # data-parallel (gloo on CPU)

Every flag is checked before anything is written; an existing run folder is only continued
(``--resume``) or moved aside (``--overwrite``), never overwritten. The pieces used here are the
ones ``lagnet train`` runs (lagnet/cli/train.py, lagnet/runs.py, lagnet/engine.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from lagnet.cli import user_error
from lagnet.cli.train import (
    FIXED_KEYS,
    add_train_arguments,
    build_training,
    config_from_args,
    histogram_baseline,
    init_distributed,
    is_main,
    load_training_data,
    non_finite_message,
    rank_metrics,
    read_back_interval,
    record_epoch,
    restore,
    run_summary,
    summary_table,
)
from lagnet.engine import NonFiniteLossError, evaluate, train_one_epoch
from lagnet.runs import RunFolder


def log(message: str) -> None:
    if is_main():
        print(message, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # 1. Settings: the preset fills what the command line leaves out; every value is checked.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    device = init_distributed(config)  # joins the process group when started by torchrun

    # 2. The run folder: new, resumed (same recorded settings) or refused; nothing written yet.
    run = RunFolder.open(
        config.output,
        config.to_dict(),
        resume=args.resume,
        overwrite=args.overwrite,
        fixed_keys=FIXED_KEYS,
    )
    for note in run.notes:
        log(note)
    if run.finished:
        assert run.checkpoint is not None
        return run_summary(run.checkpoint["state"])

    # 3. Data, model, loss, optimizer, schedule and the engine's training step.
    torch.manual_seed(config.seed)
    data = load_training_data(config, log)
    parts = build_training(config, data, device)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_mAP": -1.0, "summary": {}}
    if run.checkpoint is not None:
        state = restore(parts, run.checkpoint, device)
    if is_main():
        run.create()  # the folder and config.json, now that everything is known to be good

    def test() -> dict[str, float]:  # flip-TTA features, Euclidean ranking, Market protocol
        return rank_metrics(
            evaluate(
                parts.model,
                parts.query_loader,
                parts.gallery_loader,
                flip=True,
                amp=config.amp_mode,
                device=device,
                progress=config.progress,
            )
        )

    if run.checkpoint is None and config.dataset == "synthetic" and is_main():
        state["summary"]["histogram"] = histogram_baseline(data)  # what the net has to beat
        state["summary"]["untrained"] = test()

    # 4. The epochs: train, evaluate now and then, checkpoint every epoch.
    start = time.perf_counter()
    for epoch in range(run.start_epoch, config.epochs):
        parts.sampler.set_epoch(epoch)
        lr = parts.optimizer.param_groups[0]["lr"]
        try:
            losses = train_one_epoch(
                parts.step,
                parts.train_loader,
                epoch=epoch,
                log_every=read_back_interval(device),
                device=device,
                progress=config.progress and is_main(),
            )
        except NonFiniteLossError as err:
            raise SystemExit(non_finite_message(err, run)) from None
        parts.scheduler.step()
        entry: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **losses}
        if is_main() and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            entry.update(test())
        log(
            "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
            )
        )
        record_epoch(run, parts, state, entry, config, device)  # best.pth only if better, last.pth
        if dist.is_initialized():
            dist.barrier()
    elapsed = time.perf_counter() - start

    # 5. The summary: baselines and the trained network on the same test split.
    summary = run_summary(state)
    if is_main():
        run.save_json("summary.json", summary)
        log(
            f"\ntrained {config.epochs - run.start_epoch} epochs in {elapsed:.0f} s; "
            "results on the test split:"
        )
        log(summary_table(summary))
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    try:
        main()
    except Exception as err:
        message = user_error(err)  # bad flags, files or data: one line; bugs keep the traceback
        if message is None:
            raise
        sys.exit(f"train.py: error: {message}")
