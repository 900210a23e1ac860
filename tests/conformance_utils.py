"""Rebuilding the reference weights and inputs of the conformance vectors."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).parent / "data" / "conformance"
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def load_keys() -> list[dict[str, Any]]:
    return json.loads((DATA / "reference_state_dict_keys.json").read_text())  # type: ignore[no-any-return]


def load_vectors(name: str = "vectors_salt0_384x128_b2.json") -> dict[str, Any]:
    return json.loads((DATA / name).read_text())  # type: ignore[no-any-return]


def rebuild_reference_state_dict(salt: int = 0) -> dict[str, torch.Tensor]:
    """The state dict the reference model was loaded with (name-keyed recipe)."""
    state: dict[str, torch.Tensor] = {}
    for entry in load_keys():
        key, shape, dtype = entry["key"], tuple(entry["shape"]), DTYPES[entry["dtype"]]
        g = torch.Generator().manual_seed((zlib.crc32(key.encode()) + salt) % 2**63)
        if key.endswith("num_batches_tracked"):
            t = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith("running_mean"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 1 and key.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * math.sqrt(1 / math.prod(shape[1:]))
        state[key] = t.to(dtype)
    return state


def reference_inputs(vectors: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eval input ``x``, the training input ``xt`` and its labels."""
    g = torch.Generator().manual_seed(vectors["input_seed"])
    h, w = vectors["height"], vectors["width"]
    x = torch.randn(vectors["batch"], 3, h, w, generator=g)
    xt = torch.randn(4, 3, h, w, generator=g)
    labels = torch.tensor(vectors["train_mode"]["labels"], dtype=torch.int64)
    return x, xt, labels


@contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions, the previous settings restored after.

    cuDNN uses TF32 for float32 convolutions by default on Ampere and newer GPUs, which moves
    the embedding by ~4e-2 against the released code's float32 numbers.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
