"""Eval embedding on the CPU: ONNX Runtime vs eager PyTorch, latency and throughput.

Exports the model with :func:`lagnet.export.to_onnx` (dynamic batch), checks that both give the
same embedding, then times batch 1 and batch 32 and prints the ratio (eager time / ONNX Runtime
time, so > 1 means ONNX Runtime is faster). Both use the same number of intra-op threads, and
ONNX Runtime's idle threads do not spin, so that neither side slows the other down.

    python benchmarks/bench_export.py                    # ResNet-50, 384 x 128
    python benchmarks/bench_export.py --quick            # ResNet-18, 128 x 64, fewer repeats
    python benchmarks/bench_export.py --backbone resnet18 --height 256 --width 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lagnet import build_lagnet
from lagnet.export import INPUT_NAME, OUTPUT_NAME, to_onnx


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--variant", default="paper", choices=["paper", "reference"])
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--num-attentions", type=int, default=24)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, help="timed runs per batch size (default 10/3)")
    parser.add_argument("--threads", type=int, help="intra-op threads for both (default: torch's)")
    parser.add_argument(
        "--quick", action="store_true", help="ResNet-18 at 128 x 64, 8 maps, fewer repeats"
    )
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.height, args.width, args.num_attentions = "resnet18", 128, 64, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_lagnet(
        751, backbone=args.backbone, variant=args.variant, num_attentions=args.num_attentions
    ).eval()
    size = (args.height, args.width)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = to_onnx(model, Path(tmp) / "lagnet.onnx", input_size=size)
        export_s = time.perf_counter() - start
        megabytes = path.stat().st_size / 2**20
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle ONNX Runtime workers must not spin while PyTorch is timed on the same cores
        # (with spinning on, eager batch-1 latency on a 2-core machine is ~20x worse)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    print(
        f"LAG-Net {args.variant}, {args.backbone}, {args.height}x{args.width}, "
        f"K={args.num_attentions}; {threads} threads; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}"
    )
    print(f"export {export_s:.1f} s, {megabytes:.0f} MiB")
    print(
        f"{'batch':>5}  {'eager ms':>9}  {'onnx ms':>9}  {'eager img/s':>11}  "
        f"{'onnx img/s':>10}  {'ratio':>6}  {'max rel diff':>12}"
    )
    for batch in args.batches:
        images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        feed = {INPUT_NAME: images.numpy()}
        with torch.inference_mode():
            expected = model(images)
        (got,) = session.run([OUTPUT_NAME], feed)
        assert isinstance(expected, torch.Tensor)
        ref = expected.numpy()
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        repeats = args.repeats or (10 if batch <= 4 else 3)
        if args.quick:
            repeats = max(2, repeats // 2)

        def eager(images: torch.Tensor = images) -> object:
            with torch.inference_mode():
                return model(images)

        def onnx(feed: dict[str, np.ndarray] = feed) -> object:
            return session.run([OUTPUT_NAME], feed)

        t_eager = median_seconds(eager, repeats, warmup=1)
        t_onnx = median_seconds(onnx, repeats, warmup=1)
        print(
            f"{batch:>5}  {1000 * t_eager:>9.1f}  {1000 * t_onnx:>9.1f}  "
            f"{batch / t_eager:>11.1f}  {batch / t_onnx:>10.1f}  "
            f"{t_eager / t_onnx:>5.2f}x  {rel:>12.1e}"
        )
    print("ratio = eager time / ONNX Runtime time (> 1: ONNX Runtime is faster)")


if __name__ == "__main__":
    main()
