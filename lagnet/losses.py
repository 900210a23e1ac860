"""Losses of LAG-Net: cross-entropy, batch-hard triplet, attention-center, and their sum.

Every loss computes in float32 (float64 for float64 inputs), also under ``torch.autocast``, and
runs without host synchronisation, so that a training step compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lagnet._validation import check_float, check_float_tensor, check_positive_int
from lagnet.model import LAGNetOutput

__all__ = [
    "AttentionCenterLoss",
    "BatchHardTripletLoss",
    "LAGNetLoss",
    "LabelSmoothingCrossEntropy",
    "euclidean_distance_matrix",
    "parse_loss_spec",
]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _check_labels(labels: object, batch: int, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},) to match the batch, got {tuple(labels.shape)}"
        )
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    return labels.long()


def check_label_range(labels: Tensor, num_classes: int, name: str = "labels") -> None:
    """Refuse class indices outside ``[0, num_classes)`` (also -100 and -1), without a host sync.

    Labels on the CPU are checked eagerly and raise a ValueError that lists the offending
    values. On an accelerator, or while ``torch.compile`` traces, the check is an on-device
    assertion (``torch._assert_async``): it never waits for the device, and a bad label stops
    the program with the same message (a RuntimeError on the CPU, a device-side assert on CUDA).
    :class:`lagnet.engine.TrainStep` checks the loader's CPU labels eagerly before moving them.
    """
    message = (
        f"{name} must be class indices in [0, {num_classes}) (negative labels such as -1 or "
        "cross-entropy's ignore_index -100 are not accepted)"
    )
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            values = sorted(set(labels[bad].tolist()))
            shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            raise ValueError(f"{message}; got {shown}")
        return
    torch._assert_async(((labels >= 0) & (labels < num_classes)).all(), message)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_2d(x: object, name: str) -> Tensor:
    return check_float_tensor(x, name, "(B, D)")


class LabelSmoothingCrossEntropy(nn.Module):
    """Softmax cross-entropy with optional label smoothing: ``(B, N), (B,) -> ()``.

    Unlike :class:`torch.nn.CrossEntropyLoss` there is no ``ignore_index``: every label must
    be in ``[0, N)``. Computed in float32 (float64 for float64 logits), also under autocast.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = check_float(
            label_smoothing, "label_smoothing", low=0.0, high=1.0, high_open=True
        )

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = _check_2d(logits, "logits")
        labels = _check_labels(labels, logits.shape[0])
        check_label_range(labels, logits.shape[1])
        return self.loss(logits, labels)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss without input checks: ``(..., B, N), (B,) -> ()``, mean over all rows."""
        with torch.autocast(logits.device.type, enabled=False):
            flat = logits.to(_compute_dtype(logits)).reshape(-1, logits.shape[-1])
            target = labels.repeat(flat.shape[0] // labels.shape[0])
            return F.cross_entropy(flat, target, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


def euclidean_distance_matrix(x: Tensor) -> Tensor:
    """``(..., B, D) -> (..., B, B)`` Euclidean distances, squared distances clamped at 1e-12.

    The distance of a row to itself is exactly ``sqrt(1e-12)``: the expansion
    ``|a|^2 + |b|^2 - 2 a.b`` leaves rounding noise on the diagonal (up to ``1e-3`` after the
    square root in float32), which is set to zero before the clamp.
    """
    sq = x.pow(2).sum(dim=-1, keepdim=True)
    d2 = sq + sq.transpose(-1, -2) - 2.0 * (x @ x.transpose(-1, -2))
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    return d2.masked_fill(eye, 0.0).clamp(min=1e-12).sqrt()


def _batch_hard(dist: Tensor, same: Tensor, margin: float | None) -> Tensor:
    """``(..., B, B)`` distances, ``(B, B)`` same-identity mask -> ``(...,)`` mean losses."""
    d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=-1)
    d_an = dist.masked_fill(same, float("inf")).amin(dim=-1)
    diff = d_ap - d_an
    per_anchor = F.softplus(diff) if margin is None else F.relu(diff + margin)
    return per_anchor.mean(dim=-1)


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al.): ``(B, D), (B,) -> ()``.

    For each anchor, the farthest same-identity sample (the anchor itself counts, at distance
    ``1e-6``) and the nearest other-identity sample; ``mean(relu(d_ap - d_an + margin))``, or
    the soft margin ``mean(softplus(d_ap - d_an))`` when ``margin is None``. Anchors with no
    other identity in the batch contribute ``relu(-inf)``/``softplus(-inf)`` = 0. Computed in
    float32 (float64 for float64 features), also under autocast.
    """

    def __init__(self, margin: float | None = 1.2) -> None:
        super().__init__()
        self.margin = None if margin is None else check_float(margin, "margin", low=0.0)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        features = _check_2d(features, "features")
        labels = _check_labels(labels, features.shape[0])
        return self.loss([features], labels)

    def loss(self, features: list[Tensor], labels: Tensor) -> Tensor:
        """Mean loss over several ``(B, D_i)`` features of one batch (no input checks)."""
        same = labels[:, None] == labels[None, :]
        with torch.autocast(labels.device.type, enabled=False):
            dists = [euclidean_distance_matrix(f.to(_compute_dtype(f))) for f in features]
            return _batch_hard(torch.stack(dists), same, self.margin).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class AttentionCenterLoss(nn.Module):
    """Attention-center ("L2") regulariser with class centers kept as a persistent buffer.

    ``c_hat = l2_normalize(centers[y])``; loss ``= sum((f - c_hat)^2) / B``. In training mode,
    after computing the loss, each class present in the batch moves its center by
    ``beta * mean_i(f_i.detach() - c_hat_i)`` over that class's samples (the released code
    keeps one arbitrary sample per class; the mean is its well-defined generalisation). The
    per-class counts are a fixed-size ``index_add_`` (no ``bincount``, no host sync).

    Under ``torch.distributed`` (``sync_distributed=True``, the default) the update uses the
    features and labels of every rank (all-gathered; equal batch sizes are required, as
    :class:`~lagnet.data.DistributedPKSampler` gives), so the centers stay identical on all
    ranks; the loss itself uses the local batch.

    Shapes: ``features (B, D)``, ``labels (B,)`` in ``[0, num_classes)`` -> scalar.
    """

    centers: Tensor

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        beta: float = 0.05,
        *,
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(feature_dim, "feature_dim")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.beta = check_float(beta, "beta", low=0.0, high=1.0)
        self.sync_distributed = bool(sync_distributed)
        self.register_buffer("centers", torch.zeros(num_classes, feature_dim))

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        features = _check_2d(features, "features")
        labels = _check_labels(labels, features.shape[0])
        if features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features have dimension {features.shape[1]} but the centers were built "
                f"with feature_dim={self.feature_dim}"
            )
        check_label_range(labels, self.num_classes)
        return self.loss(features, labels)

    def loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """The loss (and, in training mode, the center update) without input checks."""
        with torch.autocast(features.device.type, enabled=False):
            f = features.to(_compute_dtype(features))
            c_hat = F.normalize(self.centers[labels], dim=1).to(f.dtype)
            loss = (f - c_hat).pow(2).sum() / f.shape[0]
            if self.training and self.beta > 0:
                self._update(f.detach(), labels)
        return loss

    @torch.no_grad()
    def _update(self, features: Tensor, labels: Tensor) -> None:
        if self.sync_distributed and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if world > 1:
                gathered_f = features.new_empty(world * features.shape[0], features.shape[1])
                gathered_y = labels.new_empty(world * labels.shape[0])
                dist.all_gather_into_tensor(gathered_f, features.contiguous())
                dist.all_gather_into_tensor(gathered_y, labels.contiguous())
                features, labels = gathered_f, gathered_y
        centers = self.centers
        c_hat = F.normalize(centers[labels], dim=1)
        diff = features.to(centers.dtype) - c_hat
        ones = torch.ones_like(labels, dtype=centers.dtype)
        counts = torch.zeros(self.num_classes, dtype=centers.dtype, device=centers.device)
        counts.index_add_(0, labels, ones)
        centers.index_add_(0, labels, diff * (self.beta / counts[labels])[:, None])

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, beta={self.beta}"


def __getattr__(name: str) -> Any:
    if name == "CrossEntropyLoss":
        warnings.warn(
            "lagnet.losses.CrossEntropyLoss was renamed: use "
            "`from lagnet.losses import LabelSmoothingCrossEntropy` (the old name will be "
            "removed in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return LabelSmoothingCrossEntropy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_TERM_NAMES = {
    "crossentropy": "cross_entropy",
    "ce": "cross_entropy",
    "triplet": "triplet",
    "l2": "center",
    "center": "center",
}


def parse_loss_spec(spec: str) -> dict[str, float]:
    """Parse ``"1*CrossEntropy+2*Triplet+1*L2"`` into ``{"cross_entropy": 1.0, ...}``.

    Terms are ``weight*Name`` joined by ``+``; names (case-insensitive) are ``CrossEntropy``
    (or ``CE``), ``Triplet`` and ``L2`` (or ``Center``). Missing terms get weight 0. Weights
    must be finite and at least one must be positive.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"loss spec must be a non-empty string like '1*CrossEntropy+2*Triplet', got {spec!r}"
        )
    weights = {"cross_entropy": 0.0, "triplet": 0.0, "center": 0.0}
    seen: set[str] = set()
    for term in spec.replace(" ", "").split("+"):
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\*([A-Za-z0-9]+)", term)
        if match is None:
            raise ValueError(
                f"malformed loss term {term!r} in spec {spec!r}: expected 'weight*Name', "
                f"e.g. '1*CrossEntropy+2*Triplet+1*L2'"
            )
        name = _TERM_NAMES.get(match.group(2).lower())
        if name is None:
            raise ValueError(
                f"unknown loss {match.group(2)!r} in spec {spec!r}; expected CrossEntropy, "
                "Triplet or L2"
            )
        if name in seen:
            raise ValueError(f"loss {match.group(2)!r} appears twice in spec {spec!r}")
        seen.add(name)
        weight = float(match.group(1))
        if weight == float("inf"):
            raise ValueError(
                f"weight {match.group(1)!r} of {match.group(2)!r} in spec {spec!r} is infinite "
                "(too large for a float)"
            )
        weights[name] = weight
    if not any(weights.values()):
        raise ValueError(f"every weight in loss spec {spec!r} is 0: the loss would always be 0")
    return weights


_WEIGHT_NAMES = ("ce_weight", "triplet_weight", "center_weight")


class LAGNetLoss(nn.Module):
    """``ce_weight * CE + triplet_weight * Triplet + center_weight * L2`` over a LAGNet output.

    Cross-entropy is averaged over the seven heads' logits, the triplet loss over the five
    triplet features, and the attention-center loss uses ``attention_features`` (see
    ``docs/reference-code.md``, the losses). ``forward(output, labels)`` returns
    ``(total, components)`` with the weighted terms under ``"cross_entropy"``, ``"triplet"``
    and ``"center"``. Every term is computed in float32 (also under autocast) and without a
    host synchronisation, so a training step compiles with ``fullgraph=True``.

    Args:
        num_classes: identities ``N`` (the classifiers' size and the centers').
        attention_dim: ``K*C`` (``model.attention_dim``).
        ce_weight, triplet_weight, center_weight: finite weights ``>= 0``, not all 0.
        margin: triplet margin ``>= 0``, or ``None`` for the soft margin.
        label_smoothing: in ``[0, 1)``.
        center_beta: center update rate in ``[0, 1]``.
        sync_distributed: all-gather the center updates under ``torch.distributed``.
    """

    def __init__(
        self,
        num_classes: int,
        attention_dim: int,
        *,
        ce_weight: float = 1.0,
        triplet_weight: float = 2.0,
        center_weight: float = 1.0,
        margin: float | None = 1.2,
        label_smoothing: float = 0.0,
        center_beta: float = 0.05,
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        ce_weight = check_float(ce_weight, "ce_weight", low=0.0)
        triplet_weight = check_float(triplet_weight, "triplet_weight", low=0.0)
        center_weight = check_float(center_weight, "center_weight", low=0.0)
        if ce_weight == triplet_weight == center_weight == 0.0:
            raise ValueError(
                "ce_weight, triplet_weight and center_weight are all 0: the loss would always be 0"
            )
        self.ce_weight = ce_weight
        self.triplet_weight = triplet_weight
        self.center_weight = center_weight
        self.cross_entropy = LabelSmoothingCrossEntropy(label_smoothing)
        self.triplet = BatchHardTripletLoss(margin)
        self.center = AttentionCenterLoss(
            num_classes, attention_dim, beta=center_beta, sync_distributed=sync_distributed
        )

    @classmethod
    def from_spec(
        cls, spec: str, *, num_classes: int, attention_dim: int, **kwargs: Any
    ) -> LAGNetLoss:
        """Build from a spec string such as ``"1*CrossEntropy+2*Triplet+1*L2"``.

        ``kwargs`` are the other constructor arguments (``margin``, ``label_smoothing``,
        ``center_beta``, ``sync_distributed``); the weights come from the spec.
        """
        given = sorted(set(kwargs) & set(_WEIGHT_NAMES))
        if given:
            raise TypeError(f"from_spec takes the weights from the spec string, not {given}")
        w = parse_loss_spec(spec)
        return cls(
            num_classes,
            attention_dim,
            ce_weight=w["cross_entropy"],
            triplet_weight=w["triplet"],
            center_weight=w["center"],
            **kwargs,
        )

    def forward(self, output: LAGNetOutput, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``output`` of ``model.forward_train``, ``labels (B,)`` -> ``(total, components)``."""
        if not isinstance(output, LAGNetOutput):
            raise TypeError(
                "LAGNetLoss expects a LAGNetOutput (the training-mode output of LAGNet), got "
                f"{type(output).__name__}; put the model in train() mode or call forward_train"
            )
        logits = torch.stack(list(output.logits.values()))  # (heads, B, N)
        labels = _check_labels(labels, logits.shape[1])
        if logits.shape[2] != self.center.num_classes:
            raise ValueError(
                f"the model's classifiers have {logits.shape[2]} classes but the loss was built "
                f"with num_classes={self.center.num_classes}"
            )
        attention = output.attention_features
        if attention.ndim != 2 or attention.shape[1] != self.center.feature_dim:
            raise ValueError(
                f"attention_features have shape {tuple(attention.shape)} but the loss was built "
                f"with attention_dim={self.center.feature_dim}"
            )
        check_label_range(labels, self.center.num_classes)
        ce = self.cross_entropy.loss(logits, labels)
        tri = self.triplet.loss(list(output.triplet_features.values()), labels)
        components = {
            "cross_entropy": self.ce_weight * ce,
            "triplet": self.triplet_weight * tri,
        }
        if self.center_weight > 0:
            components["center"] = self.center_weight * self.center.loss(attention, labels)
        else:
            components["center"] = ce.new_zeros(())
        total = components["cross_entropy"] + components["triplet"] + components["center"]
        return total, components

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, triplet_weight={self.triplet_weight}, "
            f"center_weight={self.center_weight}"
        )
