"""End-to-end img/s of ``lagnet train`` and ``lagnet evaluate``, beside bench_gpu.py's rates.

Writes a Market-format folder of real-size crops (the synthetic generator at 128x64, the size
of Market-1501's crops), then runs, in this process and through ``lagnet.cli.main`` exactly as a
user would:

- ``lagnet train --preset reference --dataset market1501 --device cuda --compile`` (ResNet-50,
  384x128, batch 32 = 8x4, bf16 + channels_last, the image cache on the GPU) for 3 epochs: the
  first compiles; the img/s of the epoch loop (data path included, the loss read back at its
  end) is the mean of epochs 2 and 3;
- ``lagnet evaluate`` of the run's ``last.pth`` on the same folder: the img/s of the embedding
  of query + gallery, the cache already built (the whole command's wall time is printed too).

With ``--gpu-json`` (bench_gpu.py's ``--json``) the ratios to the compiled step
(``graphs bf16+CL``) and to its forward are printed: the issue-15 targets are >= 90 % for
training and >= 50 % for evaluation. ``--cpu-smoke`` runs the same code tiny on the CPU
(ResNet-18, 64x32, no compile). ``--json FILE`` writes the figures.

    python benchmarks/bench_e2e.py --gpu-json /tmp/lagnet-gpu-checks/bench_gpu.json
    python benchmarks/bench_e2e.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import lagnet.cli.evaluate as cli_evaluate
import lagnet.engine as engine
from lagnet.cli import main as lagnet
from lagnet.data import generate_synthetic_market

TARGETS = {"train": 0.9, "evaluate": 0.5}  # of the compiled step / forward, issue 15


def timed(original: Any, log: list[tuple[float, int]]) -> Any:
    """``original(model_or_step, loader, ...)`` timed, counting the images of its batches."""

    def wrapper(first: Any, loader: Any, *args: Any, **kwargs: Any) -> Any:
        count = 0

        def counting() -> Iterator[Any]:
            nonlocal count
            for batch in loader:
                count += int(batch[0].shape[0])
                yield batch

        start = time.perf_counter()
        result = original(first, counting(), *args, **kwargs)  # both end with a read-back
        log.append((time.perf_counter() - start, count))
        return result

    return wrapper


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU (for CI)")
    p.add_argument("--gpu-json", help="bench_gpu.py's --json output, for the ratios")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU found; use --cpu-smoke to run the script tiny on the CPU")
    work = Path(tempfile.mkdtemp(prefix="lagnet-e2e-"))
    sizes = (
        dict(num_train_ids=8, num_test_ids=8, images_per_id_per_cam=2, num_cameras=2,
             num_distractors=4, num_junk=0)
        if smoke
        else dict(num_train_ids=300, num_test_ids=100, images_per_id_per_cam=2, num_cameras=4,
                  num_distractors=100, num_junk=0)
    )  # fmt: skip
    start = time.perf_counter()
    root = generate_synthetic_market(work / "crops", seed=0, height=128, width=64, **sizes)
    print(f"crops: {root} written in {time.perf_counter() - start:.1f} s", flush=True)
    data = ["--dataset", "market1501", "--root", str(root), "--no-progress"]
    run = work / "run"
    train_args = (
        ["train", "--preset", "tiny", "--epochs", "3", "--device", "cpu"]
        if smoke
        else ["train", "--preset", "reference", "--epochs", "3", "--device", "cuda", "--compile"]
    )
    epochs: list[tuple[float, int]] = []
    extracts: list[tuple[float, int]] = []
    original_epoch, original_extract = engine.train_one_epoch, cli_evaluate.extract_features
    engine.train_one_epoch = timed(original_epoch, epochs)  # type: ignore[assignment]
    cli_evaluate.extract_features = timed(original_extract, extracts)  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        code = lagnet([*train_args, *data, "--eval-every", "1000", "--output", str(run)])
        train_wall = time.perf_counter() - start
        if code != 0 or len(epochs) != 3:
            raise SystemExit(f"lagnet train failed (exit {code}, {len(epochs)} epochs timed)")
        device = "cpu" if smoke else "cuda"
        start = time.perf_counter()
        precision = [] if smoke else ["--amp", "auto", "--channels-last"]  # as the step trains
        code = lagnet(
            ["evaluate", "--weights", str(run / "last.pth"), *data, "--device", device, *precision]
        )
        eval_wall = time.perf_counter() - start
        if code != 0 or len(extracts) != 2:
            raise SystemExit(f"lagnet evaluate failed (exit {code}, {len(extracts)} splits timed)")
    finally:
        engine.train_one_epoch, cli_evaluate.extract_features = original_epoch, original_extract
        shutil.rmtree(work, ignore_errors=True)  # the crops and the run's checkpoints
    steady = epochs[1:]
    train_rate = sum(n for _, n in steady) / sum(s for s, _ in steady)
    eval_images = sum(n for _, n in extracts)
    eval_rate = eval_images / sum(s for s, _ in extracts)
    result: dict[str, Any] = {
        "train_img_s": train_rate,
        "train_epoch_s": [s for s, _ in epochs],
        "train_images_per_epoch": epochs[-1][1],
        "train_wall_s": train_wall,
        "evaluate_img_s": eval_rate,
        "evaluate_images": eval_images,
        "evaluate_wall_s": eval_wall,
    }
    print(
        f"\nlagnet train ({'smoke' if smoke else 'ResNet-50 384x128, batch 32, --compile'}): "
        f"epochs {', '.join(f'{s:.1f}' for s, _ in epochs)} s for {epochs[-1][1]} images each; "
        f"{train_rate:.1f} img/s after the first (whole command {train_wall:.0f} s)"
    )
    print(
        f"lagnet evaluate: {eval_images} images embedded at {eval_rate:.1f} img/s, cache built "
        f"(whole command {eval_wall:.1f} s)"
    )
    if args.gpu_json and not Path(args.gpu_json).is_file():
        print(f"no {args.gpu_json} (bench_gpu.py did not run): no ratios")
    elif args.gpu_json:
        rows = json.loads(Path(args.gpu_json).read_text()).get("rows", {})
        for name in ("graphs bf16+CL", "eager fp32"):
            row = rows.get(name)
            if not row:
                print(f"bench_gpu.py {name}: not in {args.gpu_json}")
                continue
            ratios = {
                "train": train_rate / row["train_img_s"],
                "evaluate": eval_rate / row["eval_img_s"],
            }
            result[f"ratios to {name}"] = ratios
            print(
                f"bench_gpu.py {name}: step {row['train_img_s']:.1f} img/s, forward "
                f"{row['eval_img_s']:.1f} img/s; end to end: train {ratios['train']:.0%} of the "
                f"step, evaluate {ratios['evaluate']:.0%} of the forward"
                + (
                    f" (targets {TARGETS['train']:.0%} and {TARGETS['evaluate']:.0%})"
                    if name == "graphs bf16+CL"
                    else ""
                )
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
