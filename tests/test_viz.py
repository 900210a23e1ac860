"""Figures from a real (tiny) model's outputs: sizes, panels, overlays, PNGs that load back."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lagnet import LAGNet, build_lagnet
from lagnet.data import IMAGENET_MEAN, IMAGENET_STD
from lagnet.layers import attention_drop_mask
from lagnet.viz import (
    plot_attention,
    plot_drop_region,
    plot_ranked_list,
    plot_training_curves,
    save_figure,
)

mcolors = pytest.importorskip("matplotlib.colors", reason="needs the viz extra: lagnet[viz]")

H, W = 128, 64
K = 8
GREEN, RED = "#1a9850", "#d73027"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is fastest and avoids oversubscribing a shared CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LAGNet:
    torch.manual_seed(0)
    return build_lagnet(5, backbone="resnet18", num_attentions=K).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Normalised images (as the test transforms give them)."""
    raw = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (raw - mean) / std


@pytest.fixture(scope="module")
def outputs(model: LAGNet, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model.forward_train(images)
        la = model.la_branch(model.stem(images))
    keep = attention_drop_mask(la, out.attention_maps, generator=torch.Generator().manual_seed(0))
    return {"maps": out.attention_maps, "keep": keep, "embedding": out.embedding}


def pixel_size(fig: Any) -> tuple[int, int]:
    w, h = fig.get_size_inches() * fig.dpi
    return round(float(w)), round(float(h))


def assert_png(path: Path, fig: Any) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
    exp_w, exp_h = pixel_size(fig)
    assert abs(w - exp_w) <= 1 and abs(h - exp_h) <= 1, (img.size, (exp_w, exp_h))


def image_arrays(ax: Any) -> list[np.ndarray]:
    return [np.asarray(im.get_array()) for im in ax.get_images()]


# ---------------------------------------------------------------------------------------------


def test_plot_attention_panels_and_overlays(
    images: torch.Tensor, outputs: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    maps = outputs["maps"][0]
    assert maps.shape[0] == K
    fig = plot_attention(images[0], maps, num_maps=6, dpi=80)
    axes = fig.get_axes()
    assert len(axes) == 7
    panel = 3.0 * W / H + 0.2
    assert np.allclose(fig.get_size_inches(), (7 * panel, 3.5))
    assert pixel_size(fig) == (round(7 * panel * 80), round(3.5 * 80))
    (rgb,) = image_arrays(axes[0])
    assert rgb.shape == (H, W, 3) and rgb.min() >= 0.0 and rgb.max() <= 1.0
    # the first panel is the de-normalised input
    raw = images[0] * torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = raw + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert np.allclose(rgb, raw.clamp(0, 1).permute(1, 2, 0).numpy(), atol=1e-6)
    shares = []
    for k, ax in enumerate(axes[1:]):
        base, overlay = image_arrays(ax)
        assert base.shape == (H, W, 3)
        assert overlay.shape == (H, W)
        expected = F.interpolate(maps[k][None, None], size=(H, W), mode="bilinear")[0, 0]
        # the overlay is the upsampled map scaled to [0, 1]: same peak, same ordering
        assert overlay.min() == pytest.approx(0.0, abs=1e-6)
        assert overlay.max() == pytest.approx(1.0, abs=1e-6)
        assert int(overlay.argmax()) == int(expected.flatten().argmax())
        assert ax.get_title().startswith(f"map {k + 1} (")
        shares.append(float(ax.get_title().split("(")[1].rstrip("%)")))
    assert sum(shares) == pytest.approx(100, abs=4)
    path = save_figure(fig, tmp_path / "attention.png")
    assert_png(path, fig)


def test_plot_attention_caps_and_errors(
    images: torch.Tensor, outputs: dict[str, torch.Tensor]
) -> None:
    maps = outputs["maps"][1]
    assert len(plot_attention(images[1], maps, num_maps=50).get_axes()) == 1 + K
    assert len(plot_attention(images[1], maps, num_maps=1).get_axes()) == 2
    with pytest.raises(ValueError, match=r"shape \(3, H, W\).*images\[0\]"):
        plot_attention(images, maps)
    with pytest.raises(ValueError, match=r"\(K, h, w\).*maps\[0\]"):
        plot_attention(images[0], outputs["maps"])
    with pytest.raises(ValueError, match="num_maps"):
        plot_attention(images[0], maps, num_maps=0)
    with pytest.raises(TypeError, match="attention_maps must be a torch.Tensor"):
        plot_attention(images[0], [[0.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both mean and std"):
        plot_attention(images[0], maps, mean=None)


def test_plot_drop_region_shades_the_dropped_positions(
    images: torch.Tensor, outputs: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    keep = outputs["keep"]
    assert keep.shape == (3, 1, H // 16, W // 16) and keep.dtype == torch.bool
    dropped = float((~keep[0]).float().mean())
    assert 0.0 < dropped < 1.0
    fig = plot_drop_region(images[0], keep[0], dpi=72)
    axes = fig.get_axes()
    assert len(axes) == 2
    assert len(image_arrays(axes[0])) == 1
    base, overlay = image_arrays(axes[1])
    assert base.shape == (H, W, 3) and overlay.shape == (H, W, 4)
    shaded = overlay[..., 3] > 0
    # nearest upsampling by 16: the shaded share of pixels is the dropped share of positions
    assert shaded.mean() == pytest.approx(dropped)
    expected = ~keep[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert np.array_equal(shaded, expected.numpy())
    assert f"{100 * dropped:.0f}%" in axes[1].get_title()
    # a 2-D mask, or a float mask, gives the same picture
    fig2 = plot_drop_region(images[0], keep[0, 0].float())
    assert np.array_equal(image_arrays(fig2.get_axes()[1])[1][..., 3] > 0, shaded)
    assert_png(save_figure(fig, tmp_path / "drop.png"), fig)
    with pytest.raises(ValueError, match="one image's mask"):
        plot_drop_region(images[0], keep)


def frame_color(ax: Any) -> str:
    colors = {mcolors.to_hex(s.get_edgecolor()) for s in ax.spines.values()}
    assert len(colors) == 1
    return colors.pop()


def test_plot_ranked_list_ranks_and_frames(
    images: torch.Tensor, outputs: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    emb = F.normalize(outputs["embedding"], dim=1)
    gallery = torch.cat([images, images.flip(3), images * 0.5]).contiguous()  # 9 images
    gallery_pids = torch.tensor([0, 1, 2] * 3)
    with torch.no_grad():
        g_emb = F.normalize(torch.cat([emb, emb, emb]) + 0.01 * torch.randn(9, emb.shape[1]))
    dist = torch.cdist(emb[:1], g_emb)[0]
    matches = gallery_pids == 0
    fig = plot_ranked_list(images[0], gallery, matches, distances=dist, top_k=5, dpi=60)
    axes = fig.get_axes()
    assert len(axes) == 6
    assert axes[0].get_title() == "query" and frame_color(axes[0]) == "#000000"
    order = torch.argsort(dist, stable=True)[:5].tolist()
    for rank, (ax, index) in enumerate(zip(axes[1:], order, strict=True), start=1):
        assert ax.get_title().splitlines() == [f"#{rank}", f"{float(dist[index]):.3g}"]
        assert frame_color(ax) == (GREEN if bool(matches[index]) else RED)
        (arr,) = image_arrays(ax)
        assert arr.shape == (H, W, 3)
    assert_png(save_figure(fig, tmp_path / "ranked.png"), fig)

    # without distances the given order is kept; a list of images works too
    fig = plot_ranked_list(images[0], list(gallery[:3]), [False, True, False], top_k=10)
    axes = fig.get_axes()
    assert len(axes) == 4
    assert [frame_color(a) for a in axes[1:]] == [RED, GREEN, RED]
    assert [a.get_title() for a in axes[1:]] == ["#1", "#2", "#3"]


def test_plot_ranked_list_errors(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"one entry per gallery image \(3\)"):
        plot_ranked_list(images[0], images, [True, False])
    with pytest.raises(ValueError, match="distances must have one entry"):
        plot_ranked_list(images[0], images, [True, False, True], distances=[0.1])
    with pytest.raises(ValueError, match="top_k"):
        plot_ranked_list(images[0], images, [True, False, True], top_k=0)
    with pytest.raises(ValueError, match="empty"):
        plot_ranked_list(images[0], [], [])
    with pytest.raises(ValueError, match="booleans"):
        plot_ranked_list(images[0], images, [2, 0, 1])


HISTORY: list[dict[str, Any]] = [
    {"epoch": e, "loss": 3.0 / e, "cross_entropy": 1.0 / e, "triplet": 2.0 / e, "center": 0.2}
    | ({"mAP": 0.1 * e, "rank1": 0.15 * e} if e % 2 == 0 else {})
    | {"note": "text is ignored"}
    for e in range(1, 6)
]


def lines(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    return {
        str(line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
    }


def test_plot_training_curves(tmp_path: Path) -> None:
    fig = plot_training_curves(HISTORY)
    assert pixel_size(fig) == (1000, 400)
    loss_ax, metric_ax = fig.get_axes()
    losses = lines(loss_ax)
    assert list(losses) == ["loss", "cross_entropy", "triplet", "center"]
    assert losses["triplet"] == ([1, 2, 3, 4, 5], [2.0, 1.0, 2.0 / 3, 0.5, 0.4])
    metrics = lines(metric_ax)
    assert list(metrics) == ["mAP", "rank1"]
    assert metrics["mAP"][0] == [2, 4]
    assert metrics["rank1"][1] == pytest.approx([0.3, 0.6])
    assert_png(save_figure(fig, tmp_path / "curves.png"), fig)

    only = plot_training_curves(HISTORY, loss_keys=["loss"], metric_keys=("mAP",))
    assert list(lines(only.get_axes()[0])) == ["loss"]
    assert list(lines(only.get_axes()[1])) == ["mAP"]


def test_default_loss_keys_skip_metrics_and_schedule() -> None:
    history = [
        {
            "epoch": 1,
            "lr": 2e-4,
            "loss": 2.0,
            "triplet": 1.0,
            "mAP": 0.2,
            "rank5": 0.5,
            "mINP": 0.1,
        },
        {"epoch": 2, "lr": 2e-4, "loss": 1.0, "triplet": 0.5, "time": 3.0},
    ]
    loss_ax, metric_ax = plot_training_curves(history).get_axes()
    assert list(lines(loss_ax)) == ["loss", "triplet"]
    assert list(lines(metric_ax)) == ["mAP"]
    wide = plot_training_curves(history, metric_keys=("mAP", "rank5", "mINP"))
    assert list(lines(wide.get_axes()[1])) == ["mAP", "rank5", "mINP"]
    explicit = plot_training_curves(history, loss_keys=["lr"])
    assert list(lines(explicit.get_axes()[0])) == ["lr"]


def test_plot_training_curves_before_any_evaluation() -> None:
    history = [{"loss": 2.0}, {"loss": 1.5}]  # no epoch key: 1-based positions
    loss_ax, metric_ax = plot_training_curves(history).get_axes()
    assert lines(loss_ax)["loss"] == ([1.0, 2.0], [2.0, 1.5])
    assert not metric_ax.get_lines()
    assert [t.get_text() for t in metric_ax.texts] == ["not evaluated yet"]


def test_plot_training_curves_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([])
    with pytest.raises(TypeError, match="list of dicts"):
        plot_training_curves({"loss": 1.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"history\[1\]"):
        plot_training_curves([{"loss": 1.0}, 2.0])  # type: ignore[list-item]


def test_save_figure_is_atomic_and_checks_the_path(tmp_path: Path) -> None:
    fig = plot_training_curves(HISTORY, dpi=50)
    target = tmp_path / "curves.png"
    target.write_bytes(b"old")
    assert save_figure(fig, target) == target
    assert_png(target, fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]
    save_figure(fig, tmp_path / "curves.pdf")
    assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        save_figure(fig, tmp_path / "missing-dir" / "c.png")
    with pytest.raises(ValueError, match="suffix"):
        save_figure(fig, tmp_path / "curves")
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "curves.notaformat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.pdf", "curves.png"]


def test_missing_matplotlib_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install \"lagnet\[viz\]\""):
        plot_training_curves(HISTORY)
