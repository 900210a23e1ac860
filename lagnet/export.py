"""Export the eval-mode embedding model: ONNX for deployment, ``torch.export`` for PyTorch runtimes.

:func:`to_onnx` writes a single ``.onnx`` file with one input, ``images`` ``(B, 3, H, W)``
float32, and one output, ``output`` ``(B, D)`` (``D = 3584`` for the default LAG-Net), the names
that re-ID feature extractors in multi-object trackers look for. The batch dimension is
dynamic by default; ``H`` and ``W`` are fixed at export time. With
``include_normalization=True`` the graph takes RGB images scaled to ``[0, 1]`` and applies the
ImageNet mean/std itself. The input and output stay float32 for a float16 or bfloat16 model: the
graph casts the images to the model's dtype and the embedding back to float32.

A model whose forward branches in Python on tensor values (``if x.sum() > 0:``) cannot become a
static graph; exporting it raises a ValueError that names the line.

:func:`export_program` returns the :class:`torch.export.ExportedProgram` of the same module.

The ONNX path uses the ``torch.export``-based exporter of :func:`torch.onnx.export`
(``dynamo=True``), which needs the ``onnx`` and ``onnxscript`` packages:
``pip install "lagnet[onnx]"``. They are imported only when :func:`to_onnx` runs.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lagnet._io import atomic_write
from lagnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lagnet.model import check_input_size

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
_MIN_TORCH_FOR_ONNX = (2, 6)  # torch.onnx.export(dynamo=True, external_data=, optimize=)


def _check_torch_for_onnx() -> None:
    """Raise a clear error on a torch whose ONNX exporter lacks what :func:`to_onnx` uses."""
    parts = torch.__version__.split("+")[0].split(".")
    version = tuple(int(p) if p.isdigit() else 0 for p in parts[:2])
    if version < _MIN_TORCH_FOR_ONNX:
        need = ".".join(map(str, _MIN_TORCH_FOR_ONNX))
        raise RuntimeError(
            f"to_onnx needs torch >= {need} (its torch.export-based ONNX exporter); this is "
            f"torch {torch.__version__}. Upgrade torch, or use export_program() for torch.export"
        )


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
        compute_dtype: the model's floating-point dtype when it is not float32 (a ``.half()``
            or ``.bfloat16()`` model): the module still takes float32 images, normalises them
            in float32, casts them to ``compute_dtype`` for the model, and returns a float32
            embedding. ``None`` leaves the dtypes alone.
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
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if compute_dtype is not None and not (
            isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        ):
            raise TypeError(
                f"compute_dtype must be a floating-point torch.dtype or None, got {compute_dtype!r}"
            )
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}")
        self.model = model
        self.include_normalization = bool(include_normalization)
        self.compute_dtype = compute_dtype
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        if self.include_normalization:
            images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if self.compute_dtype is not None:
            images = images.to(self.compute_dtype)
        out = self.model(images)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the model must return a (B, D) tensor in eval mode, got {type(out).__name__}"
            )
        return out if self.compute_dtype is None else out.float()

    def extra_repr(self) -> str:
        extra = "" if self.compute_dtype is None else f", compute_dtype={self.compute_dtype}"
        return f"include_normalization={self.include_normalization}{extra}"


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


def _prepare(
    model: nn.Module,
    input_size: object,
    dynamic_batch: bool,
    include_normalization: bool,
) -> tuple[EmbeddingExportModule, Tensor, int]:
    """Check everything, dry-run the model once; returns (module, example input, D)."""
    model = _check_model(model)
    height, width = check_input_size(input_size)
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {dynamic_batch!r}")
    if not isinstance(include_normalization, bool):
        raise TypeError(f"include_normalization must be a bool, got {include_normalization!r}")
    ref = _reference_tensor(model)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    module = EmbeddingExportModule(
        model,
        include_normalization=include_normalization,
        compute_dtype=None if dtype == torch.float32 else dtype,
    )
    module = module.to(device).eval()
    # float32 images whatever the model's dtype (the module casts them);
    # batch 2 for a dynamic batch: torch.export specialises sizes 0 and 1
    example = torch.rand(2 if dynamic_batch else 1, 3, height, width, device=device)
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


def _is_data_dependent(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return "datadependent" in text or "data-dependent" in text or "data dependent" in text


def _where(err: BaseException) -> str:
    """``File "...", line N, in forward: code`` of the call torch.export names, if any."""
    lines = str(err).splitlines()
    marker = "The following call raised this error:"
    if marker not in lines:
        return ""
    at = lines.index(marker)
    found = [line.strip() for line in lines[at + 1 : at + 3] if line.strip()]
    return f" (at {': '.join(found)})" if found else ""


def _export(
    module: EmbeddingExportModule, example: Tensor, dynamic_batch: bool
) -> torch.export.ExportedProgram:
    dynamic_shapes: dict[str, Any] | None = None
    if dynamic_batch:
        dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1)}}
    try:
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as err:
        if not _is_data_dependent(err):
            raise
        raise ValueError(
            "the model cannot be exported as one static graph: its forward takes a Python "
            f"branch on tensor values{_where(err)}, such as `if x.sum() > 0:`. Write the "
            "branch as a tensor operation (torch.where) or keep it out of the exported model"
        ) from err


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
        ValueError: the model is in training mode, cannot take ``input_size``, or branches in
            Python on tensor values.
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
    normalisation and embedding size. For a float16 / bfloat16 model the input and output are
    still float32; the graph casts to the model's dtype and back.

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
        RuntimeError: torch is older than 2.6 (its ONNX exporter lacks what is used here).
        ValueError: the model is in training mode, the input size is too small for the model,
            its forward branches on tensor values, or the opset is out of range.
        FileNotFoundError: the output folder does not exist.
    """
    out_path = _check_output_path(path)
    _check_torch_for_onnx()
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
