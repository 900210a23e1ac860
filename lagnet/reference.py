"""Loading checkpoints saved by the authors' released LAG-Net code.

The released model registers a full unused torchvision ResNet-50 under ``test.`` and an unused
SE block under ``channel_attention.``; both are accepted and ignored. Every other key is mapped
onto :class:`~lagnet.model.LAGNet` (``variant="reference"``) by :func:`reference_key_to_lagnet`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from torch import Tensor

from lagnet.checkpoint import load_state_dict_file
from lagnet.model import LAGNet, few_keys, load_checked

__all__ = ["IGNORED_PREFIXES", "from_reference", "reference_key_to_lagnet"]

IGNORED_PREFIXES: tuple[str, ...] = ("test.", "channel_attention.")
"""Key prefixes of the released code's unused modules."""

_PREFIXES: tuple[tuple[str, str], ...] = (
    ("backbone.", "stem."),
    ("global_stream.", "global_branch."),
    ("part_stream.", "part_branch."),
    ("la_stream.", "la_branch."),
    ("attentions.", "las."),
    ("classifier_gs.", "global_head.head."),
    ("classifier_ps.", "part_head.head."),
    ("classifier_p0_ps.", "part_head.stripe_heads.0."),
    ("classifier_p1_ps.", "part_head.stripe_heads.1."),
    ("classifier_p2_ps.", "part_head.stripe_heads.2."),
    ("classifier_la.", "la_head."),
    ("classifier_d.", "drop_head."),
    ("reduction_0.", "global_head.reduction."),
    ("reduction_1.", "part_head.reduction."),
    ("reduction_2.", "la_reduction."),
    ("reduction_3.", "drop_reduction."),
    ("reduction_4.", "part_head.stripe_reductions.0."),
    ("reduction_5.", "part_head.stripe_reductions.1."),
    ("reduction_6.", "part_head.stripe_reductions.2."),
)

_HEAD_INNER: tuple[tuple[str, str], ...] = (
    (r"\.fc_block1\.", ".neck."),
    (r"\.fc_block2\.0\.", ".bottleneck."),
    (r"\.classifier\.0\.", ".classifier."),
)


def reference_key_to_lagnet(key: str) -> str | None:
    """The lagnet name of a released-code state-dict key (``None`` for ignored keys).

    Raises:
        ValueError: for a key the released code does not have.
    """
    if key.startswith(IGNORED_PREFIXES):
        return None
    for old, new in _PREFIXES:
        if key.startswith(old):
            out = new + key[len(old) :]
            if old.startswith("classifier_"):
                for pattern, repl in _HEAD_INNER:
                    out = re.sub(pattern, repl, out)
            return out
    raise ValueError(f"unexpected key {key!r}: not a key of the released LAG-Net model")


def _infer_num_classes(state: Mapping[str, Tensor]) -> int:
    key = "classifier_gs.classifier.0.weight"
    if key not in state:
        raise ValueError(f"cannot infer num_classes: the checkpoint has no {key!r}")
    return int(state[key].shape[0])


def _infer_geometry(state: Mapping[str, Tensor]) -> tuple[str, int, int]:
    """backbone name, embed_dim, reduce_dim."""
    conv = state.get("attentions.conv.weight")
    channels = int(conv.shape[0]) if conv is not None else 2048
    embed = state.get("classifier_gs.fc_block1.2.weight")
    reduce = state.get("reduction_0.0.weight")
    layer_counts = {
        k.split(".")[2] for k in state if k.startswith("global_stream.0.") and k.count(".") > 3
    }
    n_layer3 = len(layer_counts) + 1
    if channels == 512:
        backbone = "resnet34" if n_layer3 == 6 else "resnet18"
    else:
        backbone = {6: "resnet50", 23: "resnet101", 36: "resnet152"}.get(n_layer3, "resnet50")
    return (
        backbone,
        int(embed.shape[0]) if embed is not None else 512,
        int(reduce.shape[0]) if reduce is not None else 256,
    )


def from_reference(
    checkpoint: Mapping[str, Tensor] | str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    num_attentions: int = 24,
) -> LAGNet:
    """Build a ``variant="reference"`` :class:`LAGNet` from the released code's weights.

    Args:
        checkpoint: a state dict, or a file saved with ``torch.save`` (loaded with
            ``weights_only=True``; files that carry pickled code are refused).
        num_classes: identities of the classifiers; inferred from the checkpoint if ``None``
            (a mismatch is an error).
        num_attentions: ``K`` (not stored in the weights; 24 in the released code).

    Raises:
        TypeError: ``checkpoint`` is not a mapping of names to tensors (e.g. a dict of lists).
        ValueError: naming every missing, unexpected or mis-shaped key.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        state: Mapping[str, Tensor] = load_state_dict_file(checkpoint, what="reference checkpoint")
        source = str(checkpoint)
    elif isinstance(checkpoint, Mapping):
        state = checkpoint
        source = "the reference state dict"
    else:
        raise TypeError(
            f"checkpoint must be a state dict or a file path, got {type(checkpoint).__name__}"
        )
    wrong = [
        (k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)
    ]
    if wrong:
        key, value = wrong[0]
        raise TypeError(
            f"{source} must map parameter names (str) to tensors, but {key!r} holds a "
            f"{type(value).__name__}"
            + (f" (and {len(wrong) - 1} more entries)" if len(wrong) > 1 else "")
        )
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    inferred = _infer_num_classes(state)
    if num_classes is None:
        num_classes = inferred
    elif num_classes != inferred:
        raise ValueError(
            f"num_classes={num_classes} does not match the checkpoint's classifiers "
            f"({inferred} classes)"
        )
    backbone, embed_dim, reduce_dim = _infer_geometry(state)
    unknown = []
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        try:
            new = reference_key_to_lagnet(key)
        except ValueError:
            unknown.append(key)
            continue
        if new is not None:
            mapped[new] = value
    if unknown:
        raise ValueError(f"cannot load {source}: unexpected keys {few_keys(sorted(unknown))}")
    model = LAGNet(
        num_classes,
        backbone=backbone,
        variant="reference",
        num_attentions=num_attentions,
        embed_dim=embed_dim,
        reduce_dim=reduce_dim,
    )
    load_checked(model, mapped, source=source)
    return model
