"""Export the eval-mode embedding model: ONNX for deployment, ``torch.export`` for PyTorch runtimes.

:func:`to_onnx` writes a single ``.onnx`` file with one input, ``images`` ``(B, 3, H, W)``
float32, and one output, ``output`` ``(B, D)`` (``D = 3584`` for the default LAG-Net), the names
that re-ID feature extractors in multi-object trackers look for. The batch dimension is
dynamic by default; ``H`` and ``W`` are fixed at export time. With
``include_normalization=True`` the graph takes RGB images scaled to ``[0, 1]`` and applies the
ImageNet mean/std itself.

:func:`export_program` returns the :class:`torch.export.ExportedProgram` of the same module.

The ONNX path uses the ``torch.export``-based exporter of :func:`torch.onnx.export`
(``dynamo=True``), which needs the ``onnx`` and ``onnxscript`` packages:
``pip install "lagnet[onnx]"``. They are imported only when :func:`to_onnx` runs.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lagnet._io import atomic_write
from lagnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lagnet.model import MIN_INPUT_SIZE

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "EmbeddingExportModule",
    "export_program",
    "to_onnx",
]

INPUT_NAME = "images"
"""Name of the ONNX graph input, ``(B, 3, H, W)``."""
OUTPUT_NAME = "output"
"""Name of the ONNX graph output, ``(B, D)``."""

_INSTALL_HINT = 'install the ONNX extra: pip install "lagnet[onnx]"'
_MIN_OPSET = 13


def _require(module: str, what: str) -> Any:
    """Import an optional dependency, or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the optional package {module!r}, which is not installed; {_INSTALL_HINT}"
        ) from err


class EmbeddingExportModule(nn.Module):
    """The module that is exported: ``images (B, 3, H, W) -> embedding (B, D)``.

    Wraps an eval-mode embedding model (a :class:`~lagnet.model.LAGNet`, or any module whose
    eval forward returns a ``(B, D)`` tensor). With ``include_normalization=True`` it takes RGB
    images in ``[0, 1]`` and applies ``(x - mean) / std`` first.

    Args:
        model: the embedding model.
        include_normalization: normalise inside the module.
        mean: per-channel mean (RGB) used when normalising.
        std: per-channel standard deviation (RGB) used when normalising.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        include_normalization: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}")
        self.model = model
        self.include_normalization = bool(include_normalization)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        if self.include_normalization:
            images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        out = self.model(images)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the model must return a (B, D) tensor in eval mode, got {type(out).__name__}"
            )
        return out

    def extra_repr(self) -> str:
        return f"include_normalization={self.include_normalization}"


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    in_training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if in_training:
        shown = ", ".join(in_training[:3]) + (", ..." if len(in_training) > 3 else "")
        raise ValueError(
            "the model is in training mode (modules in training mode: "
            f"{shown}); call model.eval() before exporting: the exported graph is the "
            "eval-mode embedding model (batch norm statistics fixed, no attention drop)"
        )
    return model


def _check_input_size(input_size: object) -> tuple[int, int]:
    if (
        not isinstance(input_size, Sequence)
        or isinstance(input_size, str)
        or len(input_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in input_size)
    ):
        raise TypeError(f"input_size must be a (height, width) pair of ints, got {input_size!r}")
    height, width = int(input_size[0]), int(input_size[1])
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise ValueError(
            f"input_size {height}x{width} is too small: LAG-Net needs images of at least "
            f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (the global branch downsamples by 32)"
        )
    return height, width


def _check_output_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.name:
        raise ValueError(f"path must name a file, got {str(p)!r}")
    if not p.parent.is_dir():
        raise FileNotFoundError(
            f"output folder {str(p.parent)!r} does not exist (path {str(p)!r}); create it first"
        )
    if p.is_dir():
        raise IsADirectoryError(f"path {str(p)!r} is a folder; give the .onnx file name")
    return p


def _reference_tensor(model: nn.Module) -> Tensor | None:
    """The first parameter (or floating-point buffer): where and in which dtype to export."""
    tensors: list[Tensor] = [*model.parameters(), *model.buffers()]
    return next((t for t in tensors if t.is_floating_point()), None)


# ---------------------------------------------------------------------------------------------
# export-friendly adaptive max pooling
# ---------------------------------------------------------------------------------------------


def _window(index: int, size_in: int, size_out: int) -> tuple[int, int]:
    """Rows (or columns) ``[start, stop)`` pooled into output cell ``index`` (adaptive pooling)."""
    start = (index * size_in) // size_out
    stop = -((-(index + 1) * size_in) // size_out)
    return start, stop


def _adaptive_max_pool2d(x: Tensor, output_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``aten.adaptive_max_pool2d`` as slices and reductions (static ``H``, ``W``).

    The ONNX exporter has no translation for adaptive max pooling when the output size does
    not divide the input size (LAG-Net's 3 stripes of a height-8 map, or the reference
    variant's stripes of a 1x1 map), and torch's own decomposition does not cover that case.
    """
    h_in, w_in = int(x.shape[-2]), int(x.shape[-1])
    h_out, w_out = int(output_size[0]), int(output_size[1])
    rows_v: list[Tensor] = []
    rows_i: list[Tensor] = []
    for i in range(h_out):
        h0, h1 = _window(i, h_in, h_out)
        cols_v: list[Tensor] = []
        cols_i: list[Tensor] = []
        for j in range(w_out):
            w0, w1 = _window(j, w_in, w_out)
            values, arg = x[..., h0:h1, w0:w1].flatten(-2).max(dim=-1)
            width = w1 - w0
            cols_v.append(values)
            cols_i.append((arg // width + h0) * w_in + arg % width + w0)
        rows_v.append(torch.stack(cols_v, dim=-1))
        rows_i.append(torch.stack(cols_i, dim=-1))
    return torch.stack(rows_v, dim=-2), torch.stack(rows_i, dim=-2)


def _output_size(x: Tensor, output_size: object) -> tuple[int, int]:
    sizes = (output_size, output_size) if isinstance(output_size, int) else output_size
    if not isinstance(sizes, Sequence) or len(sizes) != 2:
        raise ValueError(f"adaptive_max_pool2d output_size must be 2 ints, got {output_size!r}")
    h = int(x.shape[-2]) if sizes[0] is None else int(sizes[0])
    w = int(x.shape[-1]) if sizes[1] is None else int(sizes[1])
    return h, w


class _PortablePooling(TorchFunctionMode):
    """While exporting, compute adaptive max pooling as slices and reductions.

    The graph then holds no ``adaptive_max_pool2d`` (which the ONNX exporter cannot translate
    when the output size does not divide the input size); the values are the same.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _ADAPTIVE_MAX_POOL and args and isinstance(args[0], Tensor):
            x = args[0]
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            if len(args) > 2:
                with_indices = bool(args[2])
            elif func is _ADAPTIVE_MAX_POOL[0]:
                with_indices = bool(kwargs.get("return_indices", False))
            else:
                with_indices = True
            values, indices = _adaptive_max_pool2d(x, _output_size(x, size))
            return (values, indices) if with_indices else values
        return func(*args, **kwargs)


_ADAPTIVE_MAX_POOL: tuple[Callable[..., Any], ...] = (
    torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.adaptive_max_pool2d_with_indices,
    torch._C._nn.adaptive_max_pool2d,
)


def _prepare(
    model: nn.Module,
    input_size: object,
    dynamic_batch: bool,
    include_normalization: bool,
) -> tuple[EmbeddingExportModule, Tensor, int]:
    """Check everything, dry-run the model once; returns (module, example input, D)."""
    model = _check_model(model)
    height, width = _check_input_size(input_size)
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {dynamic_batch!r}")
    if not isinstance(include_normalization, bool):
        raise TypeError(f"include_normalization must be a bool, got {include_normalization!r}")
    ref = _reference_tensor(model)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    module = EmbeddingExportModule(model, include_normalization=include_normalization)
    module = module.to(device).eval()
    # batch 2 for a dynamic batch: torch.export specialises sizes 0 and 1
    example = torch.rand(2 if dynamic_batch else 1, 3, height, width, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            out = module(example)
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"the model cannot take input_size {height}x{width}: {str(err).splitlines()[0]}"
        ) from err
    if out.ndim != 2 or out.shape[0] != example.shape[0]:
        raise ValueError(
            f"the model must map (B, 3, H, W) images to a (B, D) embedding, got output shape "
            f"{tuple(out.shape)} for input shape {tuple(example.shape)}"
        )
    return module, example, int(out.shape[1])


def _export(
    module: EmbeddingExportModule, example: Tensor, dynamic_batch: bool
) -> torch.export.ExportedProgram:
    dynamic_shapes: dict[str, Any] | None = None
    if dynamic_batch:
        dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1)}}
    with _PortablePooling():
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)


def export_program(
    model: nn.Module,
    *,
    input_size: tuple[int, int] = (384, 128),
    dynamic_batch: bool = True,
    include_normalization: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` the eval-mode embedding model.

    Args:
        model: an eval-mode :class:`~lagnet.model.LAGNet` (or any module whose eval forward
            maps ``(B, 3, H, W)`` to ``(B, D)``).
        input_size: ``(H, W)`` of the images; at least 32 x 32.
        dynamic_batch: keep the batch dimension symbolic (``B >= 1``); otherwise ``B = 1``.
        include_normalization: the program takes ``[0, 1]`` RGB images and normalises them
            with the ImageNet mean/std.

    Returns:
        a :class:`torch.export.ExportedProgram`; ``program.module()(images)`` gives the
        ``(B, D)`` embedding.

    Raises:
        ValueError: the model is in training mode, or cannot take ``input_size``.
        TypeError: arguments of the wrong type.
    """
    module, example, _ = _prepare(model, input_size, dynamic_batch, include_normalization)
    return _export(module, example, dynamic_batch)


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------


_REDUCE_OPS = frozenset(
    {
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSumSquare",
    }
)


def _drop_reduce_attribute(graph: Any) -> None:
    """Remove ``noop_with_empty_axes`` (opset 18) from reductions converted to opset < 18.

    ``onnx.version_converter`` moves the axes input back to an attribute but keeps this
    attribute, which the older reductions (all but ReduceSum) do not define.
    """
    for node in graph.node:
        if node.op_type not in _REDUCE_OPS:
            continue
        for attr in list(node.attribute):
            if attr.name == "noop_with_empty_axes":
                if attr.i != 0:  # pragma: no cover - the exporter always reduces over axes
                    raise RuntimeError(
                        f"cannot convert {node.op_type} node {node.name!r} to an opset before "
                        "18 (noop_with_empty_axes=1); export with opset=18"
                    )
                node.attribute.remove(attr)


def _name_batch_dim(graph_values: Any, dynamic_batch: bool) -> None:
    for value in graph_values:
        dim = value.type.tensor_type.shape.dim[0]
        if dynamic_batch:
            dim.dim_param = "batch"
        else:
            dim.dim_value = 1


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_size: tuple[int, int] = (384, 128),
    dynamic_batch: bool = True,
    include_normalization: bool = False,
    opset: int = 17,
) -> Path:
    """Export the eval-mode embedding model to an ONNX file.

    The graph has one input, ``images`` ``(B, 3, H, W)`` float32, and one output, ``output``
    ``(B, D)`` (the un-normalised embedding, ``D = 3584`` for the default LAG-Net; L2-normalise
    it before comparing, and sum it with the embedding of the flipped image if you evaluate as
    the reference does). The file is written atomically (temporary file, then rename) and
    checked with ``onnx.checker``. Model properties record the lagnet version, input size,
    normalisation and embedding size.

    Args:
        model: an eval-mode :class:`~lagnet.model.LAGNet` (or any module whose eval forward
            maps ``(B, 3, H, W)`` to ``(B, D)``).
        path: the ``.onnx`` file to write; its folder must exist.
        input_size: ``(H, W)`` fixed in the graph; at least 32 x 32 (default 384 x 128).
        dynamic_batch: symbolic batch dimension ``"batch"``; otherwise ``B = 1``.
        include_normalization: the graph takes RGB images in ``[0, 1]`` and applies the
            ImageNet mean/std itself.
        opset: ONNX opset of the file (13 or newer). The exporter works at its own opset and
            the model is converted with ``onnx.version_converter`` when they differ.

    Returns:
        the path written.

    Raises:
        ImportError: ``onnx``/``onnxscript`` are missing (``pip install "lagnet[onnx]"``).
        ValueError: the model is in training mode, the input size is too small for the model,
            or the opset is out of range.
        FileNotFoundError: the output folder does not exist.
    """
    out_path = _check_output_path(path)
    onnx = _require("onnx", "to_onnx")
    _require("onnxscript", "to_onnx")
    from onnx import version_converter

    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {opset!r}")
    latest = int(onnx.defs.onnx_opset_version())
    if not _MIN_OPSET <= opset <= latest:
        raise ValueError(
            f"opset must be between {_MIN_OPSET} and {latest} (the newest this onnx knows), "
            f"got {opset}"
        )
    module, example, dim = _prepare(model, input_size, dynamic_batch, include_normalization)
    program = _export(module, example, dynamic_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
        onnx_program = torch.onnx.export(
            program,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    if onnx_program is None:  # pragma: no cover - the dynamo exporter always returns one
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    proto = onnx_program.model_proto
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if current != opset:
        proto = version_converter.convert_version(proto, opset)
        if opset < 18:
            _drop_reduce_attribute(proto.graph)
    _name_batch_dim(proto.graph.input, dynamic_batch)
    _name_batch_dim(proto.graph.output, dynamic_batch)
    height, width = example.shape[2], example.shape[3]
    import lagnet

    onnx.helper.set_model_props(
        proto,
        {
            "lagnet_version": lagnet.__version__,
            "input_size": f"{height}x{width}",
            "input_layout": "NCHW, RGB",
            "input_range": "[0, 1]" if include_normalization else "ImageNet-normalised",
            "mean": ",".join(str(v) for v in IMAGENET_MEAN),
            "std": ",".join(str(v) for v in IMAGENET_STD),
            "embedding_dim": str(dim),
        },
    )
    proto.doc_string = (
        f"lagnet embedding model: {INPUT_NAME} (B, 3, {height}, {width}) -> "
        f"{OUTPUT_NAME} (B, {dim})"
    )
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    atomic_write(out_path, lambda f: f.write(data))
    return out_path
