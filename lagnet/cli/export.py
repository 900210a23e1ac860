"""``lagnet export``: a model as an ONNX embedding graph, or as a pretrained folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lagnet._validation import check_positive_int
from lagnet.cli._common import WEIGHTS_HELP, load_run_model, new_output_path

__all__ = ["EXAMPLES", "add_command"]

EXAMPLES = """\
  lagnet export --weights runs/demo/best.pth --output model.onnx
  lagnet export --weights runs/m/best.pth --output model.onnx --input-size 256 128 --normalize
  lagnet export --weights runs/m/best.pth --format safetensors --output market-resnet50/

--format safetensors writes a pretrained folder (model.safetensors + config.json, the
lagnet[hub] extra) that lagnet.from_pretrained and every --weights load.
"""


def add_command(parser: argparse.ArgumentParser) -> None:
    """Add the ``lagnet export`` flags to ``parser``."""
    p = parser
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument(
        "--output", required=True, help="the .onnx file, or the folder of --format safetensors"
    )
    p.add_argument(
        "--format",
        choices=["onnx", "safetensors"],
        default="onnx",
        help="onnx (default), or safetensors: a pretrained folder (model.safetensors + "
        "config.json)",
    )
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="image size of the graph, or recorded in the folder (default: the size the run "
        "trained at)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="the graph takes RGB in [0, 1] and applies the ImageNet mean/std itself",
    )
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)


def _export_folder(args: argparse.Namespace) -> Path:
    """The checked ``--output`` folder of ``--format safetensors``."""
    from lagnet.pretrained import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(args.output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--output {str(folder)!r} exists and is not a folder")
    written = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if (folder / n).exists()]
    if written and not args.overwrite:
        raise FileExistsError(
            f"--output {str(folder)!r} already holds {' and '.join(written)}; pass --overwrite "
            "to replace them"
        )
    if not folder.parent.is_dir():
        raise FileNotFoundError(
            f"--output {str(folder)!r}: folder {str(folder.parent)!r} does not exist"
        )
    if args.normalize:
        raise ValueError("--normalize is for --format onnx (a pretrained folder records mean/std)")
    return folder


def run(args: argparse.Namespace) -> int:
    """Write the ONNX file or the pretrained folder; returns the exit code."""
    if args.format == "safetensors":
        from lagnet.pretrained import require_hub_extra, save_pretrained

        require_hub_extra("lagnet export --format safetensors")
        folder = _export_folder(args)
    else:
        output = new_output_path(args.output, overwrite=args.overwrite)
    model, meta = load_run_model(args.weights)
    if args.input_size is None:
        size = (int(meta["height"]), int(meta["width"]))
    else:
        size = (
            check_positive_int(args.input_size[0], "--input-size H"),
            check_positive_int(args.input_size[1], "--input-size W"),
        )
    if args.format == "safetensors":
        save_pretrained(model, folder, metrics=meta["metrics"], input_size=size)
        print(f"wrote {folder}/ (model.safetensors + config.json, input {size[0]}x{size[1]})")
        return 0
    from lagnet.export import to_onnx

    path = to_onnx(
        model, output, input_size=size, include_normalization=args.normalize, opset=args.opset
    )
    print(
        f"wrote {path} (input {size[0]}x{size[1]}, "
        f"{'normalisation inside' if args.normalize else 'ImageNet-normalised input'})"
    )
    return 0
