"""Losses of LAG-Net: cross-entropy, batch-hard triplet, attention-center, and their sum."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lagnet._validation import check_float_tensor, check_positive_int

__all__ = [
    "AttentionCenterLoss",
    "BatchHardTripletLoss",
    "CrossEntropyLoss",
    "LAGNetLoss",
    "parse_loss_spec",
]


def _check_labels(labels: object, batch: int, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},) to match the batch, got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    return labels.long()


def _check_2d(x: object, name: str) -> Tensor:
    return check_float_tensor(x, name, "(B, D)")


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy with optional label smoothing: ``(B, N), (B,) -> ()``."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = _check_2d(logits, "logits")
        labels = _check_labels(labels, logits.shape[0])
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


def euclidean_distance_matrix(x: Tensor) -> Tensor:
    """``(B, D) -> (B, B)`` Euclidean distances; squared distances clamped at 1e-12."""
    sq = x.pow(2).sum(dim=1, keepdim=True)
    d2 = sq + sq.t() - 2.0 * (x @ x.t())
    return d2.clamp(min=1e-12).sqrt()


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al.): ``(B, D), (B,) -> ()``.

    For each anchor, the farthest same-identity sample (the anchor itself counts) and the
    nearest other-identity sample; ``mean(relu(d_ap - d_an + margin))``, or the soft margin
    ``mean(softplus(d_ap - d_an))`` when ``margin is None``. Anchors with no other identity in
    the batch contribute ``relu(-inf)``/``softplus(-inf)`` = 0.
    """

    def __init__(self, margin: float | None = 1.2) -> None:
        super().__init__()
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 or None (soft margin), got {margin}")
        self.margin = margin

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        features = _check_2d(features, "features")
        labels = _check_labels(labels, features.shape[0])
        x = features if features.dtype == torch.float64 else features.float()
        dist = euclidean_distance_matrix(x)
        same = labels[:, None] == labels[None, :]
        d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
        d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
        diff = d_ap - d_an
        if self.margin is None:
            return F.softplus(diff).mean()
        return F.relu(diff + self.margin).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class AttentionCenterLoss(nn.Module):
    """Attention-center ("L2") regulariser with class centers kept as a persistent buffer.

    ``c_hat = l2_normalize(centers[y])``; loss ``= sum((f - c_hat)^2) / B``. In training mode,
    after computing the loss, each class present in the batch moves its center by
    ``beta * mean_i(f_i.detach() - c_hat_i)`` over that class's samples (the released code
    keeps one arbitrary sample per class; the mean is its well-defined generalisation).

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
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.beta = float(beta)
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
        c_hat = F.normalize(self.centers[labels], dim=1)
        diff = features - c_hat.to(features.dtype)
        loss = diff.pow(2).sum() / features.shape[0]
        if self.training and self.beta > 0:
            self._update(features.detach(), labels)
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
        c_hat = F.normalize(self.centers[labels], dim=1)
        diff = features.to(self.centers.dtype) - c_hat
        counts = torch.bincount(labels, minlength=self.num_classes).to(self.centers.dtype)
        self.centers.index_add_(0, labels, diff * (self.beta / counts[labels])[:, None])

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, beta={self.beta}"


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
    (or ``CE``), ``Triplet`` and ``L2`` (or ``Center``). Missing terms get weight 0.
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
        weights[name] = float(match.group(1))
    return weights


class LAGNetLoss(nn.Module):
    """``ce_weight * CE + triplet_weight * Triplet + center_weight * L2`` over a LAGNet output.

    Cross-entropy is averaged over the seven heads' logits, the triplet loss over the five
    triplet features, and the attention-center loss uses ``attention_features``
    (REFERENCE.md section 6). ``forward(output, labels)`` returns ``(total, components)`` with
    the weighted terms under ``"cross_entropy"``, ``"triplet"`` and ``"center"``.

    Args:
        num_classes: identities ``N`` (for the centers).
        attention_dim: ``K*C`` (``model.attention_dim``).
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
    ) -> None:
        super().__init__()
        for name, w in (
            ("ce_weight", ce_weight),
            ("triplet_weight", triplet_weight),
            ("center_weight", center_weight),
        ):
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        self.ce_weight = float(ce_weight)
        self.triplet_weight = float(triplet_weight)
        self.center_weight = float(center_weight)
        self.cross_entropy = CrossEntropyLoss(label_smoothing)
        self.triplet = BatchHardTripletLoss(margin)
        self.center = AttentionCenterLoss(num_classes, attention_dim, beta=center_beta)

    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        num_classes: int,
        attention_dim: int,
        margin: float | None = 1.2,
        label_smoothing: float = 0.0,
    ) -> LAGNetLoss:
        """Build from a spec string such as ``"1*CrossEntropy+2*Triplet+1*L2"``."""
        w = parse_loss_spec(spec)
        return cls(
            num_classes,
            attention_dim,
            ce_weight=w["cross_entropy"],
            triplet_weight=w["triplet"],
            center_weight=w["center"],
            margin=margin,
            label_smoothing=label_smoothing,
        )

    def forward(self, output: object, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = getattr(output, "logits", None)
        triplet_features = getattr(output, "triplet_features", None)
        attention = getattr(output, "attention_features", None)
        if not isinstance(logits, Mapping) or not isinstance(triplet_features, Mapping):
            raise TypeError(
                "LAGNetLoss expects a LAGNetOutput (the training-mode output of LAGNet), got "
                f"{type(output).__name__}; put the model in train() mode"
            )
        if not isinstance(attention, Tensor):
            raise TypeError("output.attention_features must be a tensor")
        ce = torch.stack([self.cross_entropy(v, labels) for v in logits.values()]).mean()
        tri = torch.stack([self.triplet(v, labels) for v in triplet_features.values()]).mean()
        components = {
            "cross_entropy": self.ce_weight * ce,
            "triplet": self.triplet_weight * tri,
        }
        if self.center_weight > 0:
            components["center"] = self.center_weight * self.center(attention, labels)
        else:
            components["center"] = ce.new_zeros(())
        total = torch.stack(list(components.values())).sum()
        return total, components

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, triplet_weight={self.triplet_weight}, "
            f"center_weight={self.center_weight}"
        )
