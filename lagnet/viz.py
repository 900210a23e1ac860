"""Figures for LAG-Net: attention overlays, the dropped region, ranked lists, training curves.

Every function returns a :class:`matplotlib.figure.Figure` built with the object API on an Agg
canvas (no pyplot, no global backend state), so it works in scripts, on servers and in
notebooks (where the figure displays itself). Save one with :func:`save_figure` (atomic) or
``fig.savefig(path)``.

Images are ``(3, H, W)`` tensors normalised with ``mean``/``std`` (ImageNet by default, the
output of :func:`lagnet.data.build_transforms`); pass ``mean=None, std=None`` for images
already in ``[0, 1]``.

matplotlib is an optional dependency (``pip install "lagnet[viz]"``), imported when a function
runs.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsFloat, TypeGuard

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from lagnet._io import atomic_write
from lagnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_attention",
    "plot_drop_region",
    "plot_ranked_list",
    "plot_training_curves",
    "save_figure",
]

FloatImage = npt.NDArray[np.float32]

_CORRECT = "#1a9850"  # green border: same identity as the query
_WRONG = "#d73027"  # red border: another identity
_DROP_RGB = (0.9, 0.1, 0.1)
_PANEL_HEIGHT = 3.0  # inches per image row


def _figure(width: float, height: float, dpi: float) -> Figure:
    """A new Figure attached to an Agg canvas (pyplot is never imported)."""
    try:
        figure_mod = importlib.import_module("matplotlib.figure")
        agg = importlib.import_module("matplotlib.backends.backend_agg")
    except ImportError as err:
        raise ImportError(
            "lagnet.viz needs matplotlib, which is not installed; "
            'install the viz extra: pip install "lagnet[viz]"'
        ) from err
    fig: Figure = figure_mod.Figure(figsize=(width, height), dpi=dpi)
    agg.FigureCanvasAgg(fig)
    return fig


def _check_dpi(dpi: object) -> float:
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    return float(dpi)


def _as_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or NumPy array), got {type(x).__name__}")
    return x.detach().cpu()


def _stats(values: Sequence[float] | None, name: str) -> Tensor | None:
    if values is None:
        return None
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {tuple(values)}")
    return torch.tensor([float(v) for v in values]).view(3, 1, 1)


def _to_rgb(
    image: object,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    name: str = "image",
) -> FloatImage:
    """``(3, H, W)`` normalised tensor -> ``(H, W, 3)`` float32 array in ``[0, 1]``."""
    x = _as_tensor(image, name)
    if x.ndim != 3 or x.shape[0] != 3:
        hint = " (take one image of the batch, e.g. images[0])" if x.ndim == 4 else ""
        raise ValueError(f"{name} must have shape (3, H, W), got {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = x.float()
    m, s = _stats(mean, "mean"), _stats(std, "std")
    if (m is None) != (s is None):
        raise ValueError("give both mean and std, or neither (images already in [0, 1])")
    if m is not None and s is not None:
        x = x * s + m
    rgb: FloatImage = x.clamp(0.0, 1.0).permute(1, 2, 0).numpy().astype(np.float32)
    return rgb


def _hide_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _image_axes(fig: Figure, ncols: int) -> list[Axes]:
    """One row of ``ncols`` image panels."""
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    out: list[Axes] = list(axes)
    for ax in out:
        _hide_ticks(ax)
    return out


def _panel_width(height: int, width: int) -> float:
    return _PANEL_HEIGHT * width / height + 0.2


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


def plot_attention(
    image: Tensor,
    attention_maps: Tensor,
    *,
    num_maps: int = 6,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    alpha: float = 0.5,
    cmap: str = "jet",
    dpi: float = 100,
) -> Figure:
    """The image and the first ``num_maps`` LAS attention maps overlaid on it, in one row.

    Args:
        image: ``(3, H, W)`` image, normalised with ``mean``/``std``.
        attention_maps: ``(K, h, w)`` non-negative maps of that image, e.g.
            ``model.forward_train(x).attention_maps[i]`` (descending energy); each is
            resized bilinearly to ``(H, W)`` and scaled to ``[0, 1]`` for display.
        num_maps: how many maps to show (at most ``K``).
        mean: per-channel mean the image was normalised with (``None``: already ``[0, 1]``).
        std: per-channel standard deviation (``None`` with ``mean=None``).
        alpha: opacity of the overlays.
        cmap: matplotlib colormap of the overlays.
        dpi: figure resolution.

    Returns:
        a Figure with ``1 + min(num_maps, K)`` panels (``3.5`` inches high, each panel
        ``3 W / H + 0.2`` inches wide); each overlay title gives the map's share of the energy
        of the shown maps.
    """
    rgb = _to_rgb(image, mean, std)
    maps = _as_tensor(attention_maps, "attention_maps")
    if maps.ndim != 3:
        hint = " (take one sample of the batch, e.g. maps[0])" if maps.ndim == 4 else ""
        raise ValueError(f"attention_maps must have shape (K, h, w), got {tuple(maps.shape)}{hint}")
    if not maps.is_floating_point():
        raise TypeError(f"attention_maps must be floating point, got dtype {maps.dtype}")
    if isinstance(num_maps, bool) or not isinstance(num_maps, int) or num_maps < 1:
        raise ValueError(f"num_maps must be an int >= 1, got {num_maps!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n = min(num_maps, maps.shape[0])
    height, width = rgb.shape[:2]
    shown = maps[:n].float()
    energy = shown.clamp_min(0).sum(dim=(1, 2))
    share = (energy / energy.sum().clamp_min(1e-12)).tolist()
    up = F.interpolate(shown[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    low = up.amin(dim=(1, 2), keepdim=True)
    span = (up.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    scaled = ((up - low) / span).numpy()

    fig = _figure((n + 1) * _panel_width(height, width), _PANEL_HEIGHT + 0.5, _check_dpi(dpi))
    axes = _image_axes(fig, n + 1)
    axes[0].imshow(rgb)
    axes[0].set_title("input", fontsize=9)
    for k in range(n):
        ax = axes[k + 1]
        ax.imshow(rgb)
        ax.imshow(scaled[k], cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
        ax.set_title(f"map {k + 1} ({100 * share[k]:.0f}%)", fontsize=9)
    fig.tight_layout()
    return fig


def _keep_2d(keep_mask: object) -> Tensor:
    keep = _as_tensor(keep_mask, "keep_mask")
    while keep.ndim > 2 and keep.shape[0] == 1:
        keep = keep[0]
    if keep.ndim != 2:
        raise ValueError(
            "keep_mask must be one image's mask, shape (h, w), (1, h, w) or (1, 1, h, w); "
            f"got {tuple(keep.shape)} (take one sample of the batch, e.g. mask[i])"
        )
    return keep


def plot_drop_region(
    image: Tensor,
    keep_mask: Tensor,
    *,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    alpha: float = 0.55,
    dpi: float = 100,
) -> Figure:
    """The image, and the region Batch Attention DropBlock drops shaded in red.

    Args:
        image: ``(3, H, W)`` image, normalised with ``mean``/``std``.
        keep_mask: that image's keep mask, ``True`` where features are kept, shape ``(h, w)``,
            ``(1, h, w)`` or ``(1, 1, h, w)`` (one row of :func:`lagnet.attention_drop_mask`'s
            output); resized to ``(H, W)`` with nearest-neighbour interpolation. Float masks
            count values ``> 0.5`` as kept.
        mean: per-channel mean the image was normalised with (``None``: already ``[0, 1]``).
        std: per-channel standard deviation.
        alpha: opacity of the red shading.
        dpi: figure resolution.

    Returns:
        a Figure with two panels; the second's title gives the dropped fraction.
    """
    rgb = _to_rgb(image, mean, std)
    keep = _keep_2d(keep_mask)
    keep = keep > 0.5 if keep.is_floating_point() else keep.bool()
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    height, width = rgb.shape[:2]
    dropped = ~keep
    fraction = float(dropped.float().mean())
    big = F.interpolate(dropped[None, None].float(), size=(height, width), mode="nearest")[0, 0]
    overlay = np.zeros((height, width, 4), dtype=np.float32)
    overlay[..., :3] = _DROP_RGB
    overlay[..., 3] = big.numpy() * alpha

    fig = _figure(2 * _panel_width(height, width), _PANEL_HEIGHT + 0.5, _check_dpi(dpi))
    axes = _image_axes(fig, 2)
    axes[0].imshow(rgb)
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(rgb)
    axes[1].imshow(overlay)
    axes[1].set_title(f"dropped {100 * fraction:.0f}% of positions", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# ranked list
# ---------------------------------------------------------------------------------------------


def _frame(ax: Axes, color: str, width: float = 4.0) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _as_vector(values: object, name: str, length: int) -> npt.NDArray[Any]:
    if isinstance(values, (Tensor, np.ndarray)):
        arr = _as_tensor(values, name).numpy()
    else:
        arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(
            f"{name} must have one entry per gallery image ({length}), got shape {arr.shape}"
        )
    return arr


def plot_ranked_list(
    query_image: Tensor,
    gallery_images: Tensor | Sequence[Tensor],
    matches: Tensor | Sequence[bool],
    *,
    distances: Tensor | Sequence[float] | None = None,
    top_k: int = 10,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    dpi: float = 100,
) -> Figure:
    """The query and its top-``k`` gallery images, framed green (correct) or red (wrong).

    Args:
        query_image: ``(3, H, W)`` image, normalised with ``mean``/``std``.
        gallery_images: ``(N, 3, H, W)`` tensor or a sequence of ``(3, H, W)`` tensors, in
            ranked order (best first) unless ``distances`` is given.
        matches: ``(N,)`` bools, ``True`` where the gallery image shows the query's identity.
        distances: optional ``(N,)`` query-gallery distances; the gallery is then ranked by
            them (ascending, stable) and each panel shows its distance.
        top_k: how many gallery images to show (at most ``N``).
        mean: per-channel mean the images were normalised with (``None``: already ``[0, 1]``).
        std: per-channel standard deviation.
        dpi: figure resolution.

    Returns:
        a Figure with ``1 + min(top_k, N)`` panels: the query (black frame), then rank 1, 2, ...
    """
    if isinstance(gallery_images, (Tensor, np.ndarray)):
        gallery = _as_tensor(gallery_images, "gallery_images")
        if gallery.ndim != 4:
            raise ValueError(
                f"gallery_images must have shape (N, 3, H, W), got {tuple(gallery.shape)}"
            )
        items: list[Tensor] = list(gallery.unbind(0))
    elif isinstance(gallery_images, Sequence) and not isinstance(gallery_images, str):
        items = list(gallery_images)
    else:
        raise TypeError(
            "gallery_images must be a (N, 3, H, W) tensor or a sequence of (3, H, W) tensors, "
            f"got {type(gallery_images).__name__}"
        )
    num = len(items)
    if num == 0:
        raise ValueError("gallery_images is empty")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    hits = _as_vector(matches, "matches", num)
    if hits.dtype != np.bool_:
        if not np.isin(hits, (0, 1)).all():
            raise ValueError(f"matches must be booleans, got values {np.unique(hits)[:5]}")
        hits = hits.astype(bool)
    order = np.arange(num)
    dist: npt.NDArray[Any] | None = None
    if distances is not None:
        dist = _as_vector(distances, "distances", num).astype(np.float64)
        order = np.argsort(dist, kind="stable")
    k = min(top_k, num)
    query = _to_rgb(query_image, mean, std, "query_image")
    height, width = query.shape[:2]

    fig = _figure((k + 1) * _panel_width(height, width), _PANEL_HEIGHT + 0.8, _check_dpi(dpi))
    axes = _image_axes(fig, k + 1)
    axes[0].imshow(query)
    axes[0].set_title("query", fontsize=9)
    _frame(axes[0], "black")
    for rank, index in enumerate(order[:k].tolist(), start=1):
        ax = axes[rank]
        ax.imshow(_to_rgb(items[index], mean, std, f"gallery_images[{index}]"))
        title = f"#{rank}"
        if dist is not None:
            title += f"\n{dist[index]:.3g}"
        ax.set_title(title, fontsize=9)
        _frame(ax, _CORRECT if bool(hits[index]) else _WRONG)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------------


def _is_number(value: object) -> TypeGuard[SupportsFloat]:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


_NOT_LOSSES = frozenset({"lr", "learning_rate", "time", "elapsed", "seconds", "step", "iteration"})
_METRIC_NAME = re.compile(r"^(map|minp|rank-?\d+|top-?\d+|cmc.*)$", re.IGNORECASE)


def _default_loss_key(key: object, excluded: set[str]) -> bool:
    return (
        isinstance(key, str)
        and key not in excluded
        and key.lower() not in _NOT_LOSSES
        and not _METRIC_NAME.match(key)
    )


def _series(
    history: Sequence[Mapping[str, Any]], key: str, xs: list[float]
) -> tuple[list[float], list[float]]:
    x_out: list[float] = []
    y_out: list[float] = []
    for x, entry in zip(xs, history, strict=True):
        value = entry.get(key)
        if _is_number(value):
            x_out.append(x)
            y_out.append(float(value))
    return x_out, y_out


def _plot_panel(
    ax: Any,
    history: Sequence[Mapping[str, Any]],
    xs: list[float],
    keys: Sequence[str],
    x_key: str,
    title: str,
    empty: str,
    *,
    loss: bool,
) -> None:
    """One panel of :func:`plot_training_curves`: a line per key present in ``history``."""
    plotted = 0
    for key in keys:
        x, y = _series(history, key, xs)
        if y:
            marker = ("." if len(y) < 30 else None) if loss else "o"
            ax.plot(x, y, marker=marker, label=key)
            plotted += 1
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x_key)
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center")


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    *,
    loss_keys: Sequence[str] | None = None,
    metric_keys: Sequence[str] = ("mAP", "rank1"),
    x_key: str = "epoch",
    dpi: float = 100,
) -> Figure:
    """Loss components (left) and evaluation metrics (right) over training.

    Args:
        history: one mapping per epoch, e.g. ``{"epoch": 1, "loss": 3.2, "cross_entropy": 1.0,
            "triplet": 2.0, "center": 0.2, "mAP": 0.4, "rank1": 0.6}``. Keys may be missing
            in some epochs (metrics in epochs without evaluation); non-numeric values are
            ignored.
        loss_keys: keys for the loss panel; ``None``: every key with a numeric value in some
            epoch, in order of first appearance, except ``x_key``, ``metric_keys``, other
            metric names (``mAP``, ``mINP``, ``rankN``, ``topN``, ``cmc...``) and schedule or
            timing keys (``lr``, ``time``, ...).
        metric_keys: keys for the metric panel (those never present are skipped).
        x_key: the x-axis key; an epoch without it is placed at its 1-based position.
        dpi: figure resolution.

    Returns:
        a ``10 x 4`` inch Figure with two axes, both spanning the x range of ``history``.
    """
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Sequence):
        raise TypeError(
            f"history must be a list of dicts (one per epoch), got {type(history).__name__}"
        )
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise TypeError(f"history[{i}] must be a dict, got {type(entry).__name__}")
    if len(history) == 0:
        raise ValueError("history is empty: nothing to plot")
    if isinstance(metric_keys, str):
        metric_keys = (metric_keys,)
    if isinstance(loss_keys, str):
        loss_keys = (loss_keys,)
    xs: list[float] = []
    for i, entry in enumerate(history):
        x = entry.get(x_key)
        xs.append(float(x) if _is_number(x) else float(i + 1))
    if loss_keys is None:
        excluded = {x_key, *metric_keys}
        found: dict[str, None] = {}
        for entry in history:
            for key, value in entry.items():
                if _default_loss_key(key, excluded) and _is_number(value):
                    found.setdefault(str(key), None)
        loss_keys = list(found)

    fig = _figure(10.0, 4.0, _check_dpi(dpi))
    loss_ax, metric_ax = fig.subplots(1, 2)
    _plot_panel(loss_ax, history, xs, loss_keys, x_key, "losses", "no loss values", loss=True)
    _plot_panel(
        metric_ax, history, xs, metric_keys, x_key, "evaluation", "not evaluated yet", loss=False
    )
    # both panels span the run's x range, so one evaluation is a point at its epoch on the
    # epochs axis, not a lone dot centred on an axis of its own
    lo, hi = min(xs), max(xs)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    for ax in (loss_ax, metric_ax):
        ax.set_xlim(lo - pad, hi + pad)
        if all(x.is_integer() for x in xs):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: float | None = None) -> Path:
    """Save ``fig`` atomically: write a temporary file next to ``path``, then rename it.

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...). A reader never sees a
    half-written file, and an existing file is replaced only once the new one is complete.

    Args:
        fig: the figure.
        path: the file to write; its folder must exist.
        dpi: resolution (default: the figure's).

    Returns:
        the path written.
    """
    if not hasattr(fig, "savefig"):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    out = Path(path)
    fmt = out.suffix.lstrip(".").lower()
    if not fmt:
        raise ValueError(f"path {str(out)!r} needs a suffix naming the format, e.g. .png")
    if not out.parent.is_dir():
        raise FileNotFoundError(
            f"output folder {str(out.parent)!r} does not exist (path {str(out)!r})"
        )
    if dpi is not None:
        dpi = _check_dpi(dpi)
    resolution: Any = "figure" if dpi is None else dpi
    atomic_write(out, lambda f: fig.savefig(f, format=fmt, dpi=resolution), durable=False)
    return out
