"""Rebuilding the reference weights and inputs of the conformance vectors."""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lagnet import LAGNet
from lagnet.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropy

DATA = Path(__file__).parent / "data" / "conformance"
DTYPES = {"float32": torch.float32, "int64": torch.int64}
VECTORS_FLOAT32 = "vectors_salt0_384x128_b2.json"
VECTORS_FLOAT64 = "vectors_salt0_384x128_b2_float64.json"

TRIPLET_FEATURES = ("global_reduced", "part_reduced", "la_reduced", "part_bn")
LOGIT_HEADS = ("la", "global", "part", "part0", "part1", "part2")
# Every recorded output, named ``field`` or ``field/entry`` after the vectors' JSON layout.
OUTPUT_NAMES = (
    "embedding",
    "flip_tta_normalized",
    "attention_features_first64",
    "attention_features_block_norms",
    "attention_features_sum",
    *(f"triplet_features/{name}" for name in TRIPLET_FEATURES),
    *(f"logits_first16/{head}" for head in LOGIT_HEADS),
    *(f"cross_entropy/{head}" for head in LOGIT_HEADS),
    *(f"triplet_margin_1.2/{name}" for name in TRIPLET_FEATURES),
)


def load_keys() -> list[dict[str, Any]]:
    return json.loads((DATA / "reference_state_dict_keys.json").read_text())  # type: ignore[no-any-return]


def load_vectors(name: str = VECTORS_FLOAT32) -> dict[str, Any]:
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


def reference_inputs(
    vectors: dict[str, Any], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eval input ``x`` ``(B, 3, H, W)``, the training input ``xt`` ``(4, 3, H, W)`` and its
    labels ``(4,)``. Drawn in float32, then cast to ``dtype`` (how the float64 set was made)."""
    g = torch.Generator().manual_seed(vectors["input_seed"])
    h, w = vectors["height"], vectors["width"]
    x = torch.randn(vectors["batch"], 3, h, w, generator=g)
    xt = torch.randn(4, 3, h, w, generator=g)
    labels = torch.tensor(vectors["train_mode"]["labels"], dtype=torch.int64)
    return x.to(dtype), xt.to(dtype), labels


def expected_outputs(vectors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every output of :data:`OUTPUT_NAMES` from a vectors file, as tensors of its dtype."""
    dtype = torch.float64 if vectors.get("dtype") == "float64" else torch.float32
    train = vectors["train_mode"]
    out: dict[str, torch.Tensor] = {}
    for name in OUTPUT_NAMES:
        field, _, entry = name.partition("/")
        value = vectors[field] if field in vectors else train[field]
        out[name] = torch.tensor(value[entry] if entry else value, dtype=dtype)
    return out


def reference_outputs(
    model: LAGNet, vectors: dict[str, Any], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Every output of :data:`OUTPUT_NAMES` computed by ``model`` (in its dtype, on ``device``,
    moved back to the CPU), the inputs cast to the model's dtype.

    The eval outputs come first, from the recipe's running statistics; the training-mode pass
    runs on a copy of the model, since it updates those statistics even under ``no_grad``.
    """
    dtype = next(model.parameters()).dtype
    x, xt, labels = reference_inputs(vectors, dtype)
    x, xt = x.to(device), xt.to(device)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model = copy.deepcopy(model).to(device).eval()
        emb, emb_flip = model.embed(x), model.embed(x.flip(-1))
        out["embedding"] = emb
        out["flip_tta_normalized"] = F.normalize(emb + emb_flip, dim=1)
        train = model.train().forward_train(xt)
        af = train.attention_features
        out["attention_features_first64"] = af[:, :64]
        out["attention_features_block_norms"] = af.view(af.shape[0], -1, 2048).norm(dim=2)
        out["attention_features_sum"] = af.sum(dim=1)
        labels = labels.to(device)
        for name in TRIPLET_FEATURES:
            feats = train.triplet_features[name]
            out[f"triplet_features/{name}"] = feats
            out[f"triplet_margin_1.2/{name}"] = BatchHardTripletLoss(margin=1.2)(feats, labels)
        for head in LOGIT_HEADS:
            logits = train.logits[head]
            out[f"logits_first16/{head}"] = logits[:, :16]
            out[f"cross_entropy/{head}"] = LabelSmoothingCrossEntropy()(logits, labels)
    return {name: out[name].cpu() for name in OUTPUT_NAMES}


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
