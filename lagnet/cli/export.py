"""``lagnet export``: a run checkpoint as an ONNX embedding model."""

from __future__ import annotations

import argparse

from lagnet._validation import check_positive_int
from lagnet.cli._common import load_run_model, new_output_path

__all__ = ["EXAMPLES", "add_command"]

EXAMPLES = """\
  lagnet export --weights runs/demo/best.pth --output model.onnx
  lagnet export --weights runs/m/best.pth --output model.onnx --input-size 256 128 --normalize
"""


def add_command(parser: argparse.ArgumentParser) -> None:
    """Add the ``lagnet export`` flags to ``parser``."""
    p = parser
    p.add_argument("--weights", required=True, help="a run checkpoint (best.pth or last.pth)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="image size of the graph (default: the size the run trained at)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="the graph takes RGB in [0, 1] and applies the ImageNet mean/std itself",
    )
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the ONNX file; returns the exit code."""
    from lagnet.export import to_onnx

    output = new_output_path(args.output, overwrite=args.overwrite)
    model, meta = load_run_model(args.weights)
    if args.input_size is None:
        size = (int(meta["height"]), int(meta["width"]))
    else:
        size = (
            check_positive_int(args.input_size[0], "--input-size H"),
            check_positive_int(args.input_size[1], "--input-size W"),
        )
    path = to_onnx(
        model, output, input_size=size, include_normalization=args.normalize, opset=args.opset
    )
    print(
        f"wrote {path} (input {size[0]}x{size[1]}, "
        f"{'normalisation inside' if args.normalize else 'ImageNet-normalised input'})"
    )
    return 0
