"""Pieces shared by the evaluation modules: input checks, block sizes and the CUHK03 draws.

Internal: the names here are public to the ``lagnet.evaluation`` modules, not to users.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from lagnet._validation import check_choice, check_positive_int

__all__ = [
    "BLOCK_ELEMENTS",
    "ArrayOrTensor",
    "BoolArray",
    "CmcMode",
    "FloatArray",
    "IdsLike",
    "IntArray",
    "as_ids",
    "check_cmc_options",
    "check_distmat",
    "check_generator",
    "cuhk03_draws",
    "first_nan_message",
    "rows_as_numpy",
    "splitmix64",
]

ArrayOrTensor: TypeAlias = "npt.NDArray[Any] | torch.Tensor"
IdsLike: TypeAlias = "npt.NDArray[Any] | torch.Tensor | Sequence[int]"
CmcMode: TypeAlias = Literal["market", "cuhk03"]

IntArray: TypeAlias = "npt.NDArray[np.int64]"
FloatArray: TypeAlias = "npt.NDArray[np.float64]"
BoolArray: TypeAlias = "npt.NDArray[np.bool_]"

# Work on blocks of at most this many distance entries at a time (about 16 MiB of float32);
# the temporaries of one block are a few times that.
BLOCK_ELEMENTS = 1 << 22


def as_ids(values: IdsLike, name: str, length: int | None = None) -> IntArray:
    """``values`` as a 1-D int64 NumPy array ``(length,)``, with clear errors for bad input."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {values.dtype}")
        arr: npt.NDArray[Any] = values.detach().cpu().numpy()
    else:
        arr = np.asarray(values)
        if arr.size == 0 and arr.dtype.kind == "f":  # e.g. an empty Python list
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has length {arr.shape[0]}, expected {length}")
    return arr.astype(np.int64, copy=False)


def check_distmat(distmat: object) -> tuple[int, int]:
    """Check type, rank, dtype and size of a ``(Q, G)`` distance matrix; return ``(Q, G)``."""
    if isinstance(distmat, torch.Tensor):
        if distmat.dtype == torch.bool or distmat.is_complex():
            raise TypeError(f"distmat must be real-valued, got dtype {distmat.dtype}")
        shape = tuple(distmat.shape)
    elif isinstance(distmat, np.ndarray):
        if distmat.dtype.kind not in "iuf":
            raise TypeError(f"distmat must be real-valued, got dtype {distmat.dtype}")
        shape = tuple(distmat.shape)
    else:
        raise TypeError(f"distmat must be a numpy array or torch tensor, got {type(distmat)}")
    if len(shape) != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"empty query set: distmat has shape {shape}")
    if shape[1] == 0:
        raise ValueError(f"empty gallery: distmat has shape {shape}")
    return int(shape[0]), int(shape[1])


def check_cmc_options(cmc_mode: object, num_repeats: object) -> tuple[CmcMode, int]:
    """Validate ``cmc_mode`` and ``num_repeats``."""
    mode = check_choice(cmc_mode, "cmc_mode", ("market", "cuhk03"))
    repeats = check_positive_int(num_repeats, "num_repeats")
    return ("cuhk03" if mode == "cuhk03" else "market"), repeats


def check_generator(generator: object) -> torch.Generator | None:
    """``generator`` if it is None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def rows_as_numpy(distmat: ArrayOrTensor, start: int, stop: int) -> npt.NDArray[Any]:
    """Rows ``start:stop`` of ``distmat`` as a C-contiguous CPU NumPy array (float16/bfloat16
    are widened to float32, which keeps order and ties)."""
    if isinstance(distmat, torch.Tensor):
        block = distmat[start:stop].detach()
        if block.dtype in (torch.float16, torch.bfloat16):
            block = block.float()
        out: npt.NDArray[Any] = block.cpu().contiguous().numpy()
    else:
        out = distmat[start:stop]
        if out.dtype == np.float16:
            out = out.astype(np.float32)
    return np.ascontiguousarray(out)


def first_nan_message(row: int, col: int) -> str:
    """The error message for a NaN distance at ``(row, col)``."""
    return (
        f"distmat contains NaN (first at query {row}, gallery {col}); NaN distances come from "
        "NaN features or from inf - inf in the distance of infinite features"
    )


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(seed: npt.NDArray[np.uint64], counter: npt.NDArray[np.uint64]) -> FloatArray:
    """Uniform floats in ``[0, 1)`` from a counter-based stream: the SplitMix64 finaliser of
    ``seed + (counter + 1) * golden_gamma`` (wrapping uint64 arithmetic), top 53 bits."""
    z = seed + (counter + np.uint64(1)) * _GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    out: FloatArray = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return out


def cuhk03_draws(
    num_query: int, num_repeats: int, seed: int, generator: torch.Generator | None
) -> tuple[FloatArray, npt.NDArray[np.uint64]]:
    """The random numbers of the CUHK03 single-gallery-shot sampling.

    Returns ``pick`` ``(Q, R)``: uniforms choosing which of the query's matches is drawn in each
    repeat, and ``stream`` ``(Q, R)``: seeds of the :func:`splitmix64` stream that decides, per
    gallery identity, whether its drawn image precedes that match. Drawn from ``generator``
    (CPU), or from a generator seeded with ``seed``.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    shape = (num_query, num_repeats)
    pick = torch.rand(shape, generator=generator, dtype=torch.float64).numpy()
    stream = (
        torch.randint(-(2**63), 2**63 - 1, shape, generator=generator, dtype=torch.int64)
        .numpy()
        .view(np.uint64)
    )
    return pick, stream
