"""A procedurally drawn, Market-1501-format re-ID dataset, and a colour-histogram baseline.

:func:`generate_synthetic_market` draws pedestrians from parts (head, hair, hat, torso with
stripes and a logo, arms, legs, shoes, bags) with per-identity attributes, seen by cameras that
differ in colour cast, brightness, blur, scale and background, with pose jitter and occluders.
Identities share a small palette of dominant torso and leg colours and differ in local details
(logo shape, colour and position; stripes; bag type, colour and side; hat; hair; shoes;
sleeves), so global colour is not enough to tell them apart, while the details stay visible at
128 x 64 and are the same in every camera. The output is a real Market-1501 folder (with
``0000`` distractors and ``-1`` junk in the gallery) read by :class:`lagnet.data.Market1501`.

:func:`color_histogram_features` is the colour-only baseline matcher.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageDraw, ImageFilter

from lagnet._validation import check_nonnegative_int, check_positive_int
from lagnet.data.datasets import ReIDRecord, read_image

__all__ = ["MANIFEST_NAME", "color_histogram_features", "generate_synthetic_market"]

MANIFEST_NAME = "lagnet_synthetic.json"
"""File written last into a generated dataset; it records the generation parameters."""

_GENERATOR_VERSION = 1  # bump when the drawing changes, so stale folders are regenerated
_SPLITS = ("bounding_box_train", "query", "bounding_box_test")
_SS = 2  # supersampling factor of the drawing canvas

RGB = tuple[int, int, int]
FloatArray = npt.NDArray[np.float32]

# Dominant colours, deliberately few: many identities share each torso/leg colour.
_TORSO: tuple[RGB, ...] = (
    (190, 40, 45),
    (35, 45, 95),
    (232, 232, 226),
    (38, 38, 40),
    (125, 125, 130),
)
_LEGS: tuple[RGB, ...] = ((45, 62, 110), (32, 32, 34), (168, 150, 112), (98, 98, 104))
_SKIN: tuple[RGB, ...] = ((238, 200, 170), (196, 146, 108), (118, 80, 56))
_HAIR: tuple[RGB, ...] = ((22, 16, 12), (104, 62, 30), (222, 190, 112), (165, 165, 165))
# Detail colours (logos, stripes, hats).
_ACCENT: tuple[RGB, ...] = (
    (250, 212, 30),
    (40, 200, 220),
    (212, 50, 180),
    (250, 130, 20),
    (50, 190, 60),
    (250, 250, 250),
    (220, 30, 30),
    (30, 80, 235),
)
_BAG: tuple[RGB, ...] = ((25, 25, 25), (112, 70, 35), (192, 160, 110), (40, 72, 46), (112, 30, 42))
_SHOES: tuple[RGB, ...] = ((245, 245, 245), (20, 20, 20), (210, 35, 35), (35, 70, 200))

_LOGO_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "bar")
_BAGS = ("none", "backpack", "handbag", "shoulder")


@dataclass(frozen=True)
class _Identity:
    """Per-identity appearance, the same in every camera."""

    torso: RGB
    legs: RGB
    skin: RGB
    hair: RGB
    hair_style: str  # short | long | bald
    hat: RGB | None
    hat_style: str  # cap | beanie
    shorts: bool
    short_sleeves: bool
    logo: str | None
    logo_color: RGB
    logo_x: float  # -1 left, 0 centre, 1 right (image side)
    logo_y: float  # fraction of the torso height
    stripes: str  # none | horizontal | vertical
    stripe_color: RGB
    stripe_count: int
    bag: str
    bag_color: RGB
    bag_side: int  # -1 left, 1 right
    shoes: RGB
    build: float  # torso width factor
    height: float  # body height factor


@dataclass(frozen=True)
class _Camera:
    """Per-camera appearance of the scene."""

    gains: tuple[float, float, float]
    brightness: float
    blur: float
    scale: float
    wall: RGB
    floor: RGB
    horizon: float
    feature: RGB
    period: float


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _draw_identity(rng: np.random.Generator) -> _Identity:
    has_logo = rng.random() < 0.8
    has_hat = rng.random() < 0.35
    return _Identity(
        torso=_pick(rng, _TORSO),
        legs=_pick(rng, _LEGS),
        skin=_pick(rng, _SKIN),
        hair=_pick(rng, _HAIR),
        hair_style=_pick(rng, ("short", "short", "long", "bald")),
        hat=_pick(rng, _ACCENT) if has_hat else None,
        hat_style=_pick(rng, ("cap", "beanie")),
        shorts=bool(rng.random() < 0.3),
        short_sleeves=bool(rng.random() < 0.4),
        logo=_pick(rng, _LOGO_SHAPES) if has_logo else None,
        logo_color=_pick(rng, _ACCENT),
        logo_x=float(_pick(rng, (-1.0, 0.0, 1.0))),
        logo_y=float(_pick(rng, (0.22, 0.5))),
        stripes=_pick(rng, ("none", "none", "horizontal", "vertical")),
        stripe_color=_pick(rng, _ACCENT),
        stripe_count=int(rng.integers(1, 4)),
        bag=_pick(rng, _BAGS),
        bag_color=_pick(rng, _BAG),
        bag_side=int(_pick(rng, (-1, 1))),
        shoes=_pick(rng, _SHOES),
        build=float(rng.uniform(0.88, 1.15)),
        height=float(rng.uniform(0.94, 1.04)),
    )


def _draw_camera(rng: np.random.Generator) -> _Camera:
    def color(lo: int, hi: int) -> RGB:  # muted: half grey, half a random colour
        grey = rng.integers(lo, hi)
        c = (grey + rng.integers(lo, hi, size=3)) // 2
        return (int(c[0]), int(c[1]), int(c[2]))

    g = rng.uniform(0.85, 1.15, size=3)
    return _Camera(
        gains=(float(g[0]), float(g[1]), float(g[2])),
        brightness=float(rng.uniform(0.75, 1.2)),
        blur=float(rng.uniform(0.0, 1.0)),
        scale=float(rng.uniform(0.74, 0.92)),
        wall=color(60, 220),
        floor=color(50, 180),
        horizon=float(rng.uniform(0.5, 0.75)),
        feature=color(30, 240),
        period=float(rng.uniform(0.25, 0.6)),
    )


def _background(rng: np.random.Generator, cam: _Camera, h: int, w: int) -> npt.NDArray[np.uint8]:
    """The camera's scene: wall with periodic features, floor, clutter and sensor noise."""
    img = np.empty((h, w, 3), dtype=np.float32)
    horizon = int(h * (cam.horizon + rng.uniform(-0.04, 0.04)))
    img[:horizon] = np.asarray(cam.wall) + rng.uniform(-15, 15, size=3)  # lighting varies
    img[horizon:] = np.asarray(cam.floor) + rng.uniform(-15, 15, size=3)
    img *= np.linspace(0.85, 1.1, h, dtype=np.float32)[:, None, None]
    period = max(4, int(w * cam.period))
    offset = int(rng.integers(period))
    top, bottom = int(horizon * 0.2), int(horizon * 0.8)
    for x in range(offset - period, w, period):
        x0, x1 = max(x, 0), max(min(x + period // 3, w), 0)
        img[top:bottom, x0:x1] = cam.feature
    for _ in range(int(rng.integers(0, 3))):
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        ch, cw = int(rng.integers(h // 12, h // 4)), int(rng.integers(w // 10, w // 3))
        img[cy : cy + ch, cx : cx + cw] = rng.integers(30, 230, size=3)
    img += rng.normal(0.0, 5.0, size=img.shape).astype(np.float32)
    out: npt.NDArray[np.uint8] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _logo(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, c: RGB) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=c)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=c)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r * 1.2), (cx + r, cy), (cx, cy + r * 1.2), (cx - r, cy)], fill=c)
    elif shape == "cross":
        t = r * 0.4
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=c)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=c)
    else:  # bar
        draw.rectangle((cx - r * 1.3, cy - r * 0.45, cx + r * 1.3, cy + r * 0.45), fill=c)


def _draw_person(
    draw: ImageDraw.ImageDraw,
    ident: _Identity,
    rng: np.random.Generator,
    *,
    cx: float,
    feet: float,
    ph: float,
) -> None:
    """Draw one pedestrian, feet at ``(cx, feet)``, body height ``ph`` (canvas pixels)."""
    u = ph  # body unit
    head_top = feet - u
    shoulder = head_top + 0.16 * u
    hip = head_top + 0.53 * u
    ankle = feet - 0.035 * u
    tw = 0.25 * u * ident.build * rng.uniform(0.92, 1.05)  # torso width (pose/viewpoint)
    left, right = cx - tw / 2, cx + tw / 2
    leg_w = 0.105 * u
    stride = rng.uniform(-0.07, 0.07) * u
    swing = rng.uniform(0.0, 0.06) * u
    arm_w = 0.07 * u
    side_x = {-1: left, 1: right}

    # Backpack body behind the torso, sticking out on its side.
    if ident.bag == "backpack":
        bx = side_x[ident.bag_side]
        draw.rectangle(
            (
                min(bx, bx + ident.bag_side * 0.1 * u),
                shoulder + 0.04 * u,
                max(bx, bx + ident.bag_side * 0.1 * u),
                hip - 0.02 * u,
            ),
            fill=ident.bag_color,
        )
    # Long hair falls behind the shoulders.
    hx0, hx1 = cx - 0.065 * u, cx + 0.065 * u
    if ident.hair_style == "long":
        draw.rectangle(
            (hx0 - 0.01 * u, head_top + 0.04 * u, hx1 + 0.01 * u, shoulder + 0.08 * u),
            fill=ident.hair,
        )

    # Legs (hip to ankle), with stride.
    for sgn in (-1, 1):
        top_x = cx + sgn * leg_w * 0.55
        foot_x = top_x + sgn * stride
        poly = [
            (top_x - leg_w / 2, hip),
            (top_x + leg_w / 2, hip),
            (foot_x + leg_w / 2.4, ankle),
            (foot_x - leg_w / 2.4, ankle),
        ]
        draw.polygon(poly, fill=ident.legs)
        if ident.shorts:
            knee = hip + 0.17 * u
            draw.polygon(
                [
                    (top_x + (foot_x - top_x) * 0.4 - leg_w / 2.3, knee),
                    (top_x + (foot_x - top_x) * 0.4 + leg_w / 2.3, knee),
                    (foot_x + leg_w / 2.6, ankle),
                    (foot_x - leg_w / 2.6, ankle),
                ],
                fill=ident.skin,
            )
        draw.ellipse(
            (foot_x - leg_w * 0.75, ankle - 0.03 * u, foot_x + leg_w * 0.75, feet), fill=ident.shoes
        )

    # Torso, stripes and logo.
    draw.rounded_rectangle(
        (left, shoulder, right, hip + 0.02 * u), radius=0.04 * u, fill=ident.torso
    )
    t_h = hip - shoulder
    if ident.stripes == "horizontal":
        band = 0.07 * u
        for i in range(ident.stripe_count):
            y = shoulder + t_h * (0.3 + 0.22 * i)
            draw.rectangle((left, y, right, y + band * 0.7), fill=ident.stripe_color)
    elif ident.stripes == "vertical":
        for i in range(ident.stripe_count):
            x = cx + (i - (ident.stripe_count - 1) / 2) * 0.07 * u
            draw.rectangle((x - 0.018 * u, shoulder, x + 0.018 * u, hip), fill=ident.stripe_color)
    if ident.logo is not None:
        lx = cx + ident.logo_x * tw * 0.26
        ly = shoulder + t_h * ident.logo_y
        _logo(draw, ident.logo, lx, ly, 0.05 * u, ident.logo_color)

    # Bags in front: straps and bag bodies.
    if ident.bag == "backpack":
        for sgn in (-1, 1):
            sx = cx + sgn * tw * 0.3
            draw.line((sx, shoulder, sx, hip - 0.08 * u), fill=ident.bag_color, width=_w(0.03 * u))
    elif ident.bag == "shoulder":
        start = side_x[-ident.bag_side]
        end = side_x[ident.bag_side]
        draw.line((start, shoulder, end, hip), fill=ident.bag_color, width=_w(0.025 * u))
        draw.rectangle(
            (end - 0.07 * u, hip - 0.04 * u, end + 0.07 * u, hip + 0.08 * u), fill=ident.bag_color
        )

    # Arms with sleeves, hands.
    hand_y = hip + 0.06 * u
    for sgn in (-1, 1):
        sx = side_x[sgn]
        hx = sx + sgn * (0.025 * u + swing * (1 if sgn > 0 else 0.5))
        poly = [
            (sx - arm_w / 2, shoulder + 0.01 * u),
            (sx + arm_w / 2, shoulder + 0.01 * u),
            (hx + arm_w / 2.5, hand_y),
            (hx - arm_w / 2.5, hand_y),
        ]
        draw.polygon(poly, fill=ident.skin if ident.short_sleeves else ident.torso)
        if ident.short_sleeves:
            elbow = shoulder + (hand_y - shoulder) * 0.4
            draw.polygon(
                [
                    poly[0],
                    poly[1],
                    (sx + (hx - sx) * 0.4 + arm_w / 2.2, elbow),
                    (sx + (hx - sx) * 0.4 - arm_w / 2.2, elbow),
                ],
                fill=ident.torso,
            )
        draw.ellipse(
            (hx - 0.025 * u, hand_y - 0.02 * u, hx + 0.025 * u, hand_y + 0.035 * u), fill=ident.skin
        )
        if ident.bag == "handbag" and sgn == ident.bag_side:
            draw.rectangle(
                (hx - 0.06 * u, hand_y, hx + 0.06 * u, hand_y + 0.12 * u), fill=ident.bag_color
            )

    # Head, hair, hat.
    draw.ellipse((hx0, head_top, hx1, head_top + 0.15 * u), fill=ident.skin)
    draw.rectangle(
        (cx - 0.03 * u, head_top + 0.13 * u, cx + 0.03 * u, shoulder + 0.01 * u), fill=ident.skin
    )
    if ident.hair_style != "bald":
        draw.chord(
            (hx0 - 0.005 * u, head_top - 0.005 * u, hx1 + 0.005 * u, head_top + 0.11 * u),
            180,
            360,
            fill=ident.hair,
        )
    if ident.hat is not None:
        if ident.hat_style == "cap":
            draw.chord(
                (hx0 - 0.01 * u, head_top - 0.02 * u, hx1 + 0.01 * u, head_top + 0.1 * u),
                180,
                360,
                fill=ident.hat,
            )
            draw.rectangle(
                (hx0 - 0.03 * u, head_top + 0.035 * u, hx1 + 0.03 * u, head_top + 0.055 * u),
                fill=ident.hat,
            )
        else:
            draw.rectangle(
                (hx0 - 0.005 * u, head_top - 0.025 * u, hx1 + 0.005 * u, head_top + 0.05 * u),
                fill=ident.hat,
            )


def _w(x: float) -> int:
    return max(1, round(x))


def _render(
    ident: _Identity | None,
    cam: _Camera,
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    junk: bool = False,
) -> Image.Image:
    """One camera image: background, pedestrian (none for junk), occluder, camera effects."""
    ch, cw = height * _SS, width * _SS
    canvas = Image.fromarray(_background(rng, cam, ch, cw), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    if ident is not None:
        ph = ch * cam.scale * ident.height * rng.uniform(0.95, 1.04)
        feet = ch * rng.uniform(0.955, 0.99)
        cx = cw / 2 + rng.uniform(-0.08, 0.08) * cw
        if junk:  # a bad detection: the box shows a fragment of a person
            feet += ph * rng.uniform(0.35, 0.6) * (1 if rng.random() < 0.5 else -0.6)
            cx += cw * rng.uniform(-0.45, 0.45)
        _draw_person(draw, ident, rng, cx=cx, feet=feet, ph=ph)
    if rng.random() < 0.3:  # occluder: an object in front (bottom) or a pole (side)
        color = tuple(int(c) for c in rng.integers(20, 200, size=3))
        if rng.random() < 0.6:
            top = ch * rng.uniform(0.72, 0.88)
            draw.rectangle((0, top, cw, ch), fill=color)
        else:
            x = cw * rng.uniform(0.0, 0.85)
            draw.rectangle((x, 0, x + cw * rng.uniform(0.1, 0.18), ch), fill=color)
    image = canvas.reduce(_SS)
    arr = np.asarray(image, dtype=np.float32)
    gain = np.asarray(cam.gains, dtype=np.float32) * cam.brightness * rng.uniform(0.92, 1.08)
    arr = arr * gain + rng.normal(0.0, 2.5, size=arr.shape).astype(np.float32)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")
    if cam.blur > 0.15:
        image = image.filter(ImageFilter.GaussianBlur(cam.blur))
    return image


@dataclass(frozen=True)
class _Params:
    num_train_ids: int
    num_test_ids: int
    images_per_id_per_cam: int
    num_cameras: int
    height: int
    width: int
    seed: int
    num_distractors: int
    num_junk: int
    generator_version: int = _GENERATOR_VERSION


def _counts(root: Path) -> dict[str, int]:
    return {s: sum(1 for _ in (root / s).glob("*.jpg")) for s in _SPLITS if (root / s).is_dir()}


def _is_complete(root: Path, params: _Params) -> bool:
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(data.get("params") == asdict(params) and data.get("counts") == _counts(root))


def _write_dataset(out: Path, p: _Params) -> None:
    rng = np.random.default_rng([p.seed, 0])
    total = p.num_train_ids + p.num_test_ids
    pids = (rng.permutation(total) + 1).tolist()
    train_pids, test_pids = sorted(pids[: p.num_train_ids]), sorted(pids[p.num_train_ids :])
    train_set = set(train_pids)
    cams = [_draw_camera(np.random.default_rng([p.seed, 1, c])) for c in range(p.num_cameras)]
    frames = [0] * p.num_cameras
    for split in _SPLITS:
        (out / split).mkdir()

    def save(split: str, pid: int, cam: int, image: Image.Image) -> None:
        frames[cam] += 1 + int(rng.integers(0, 40))
        prefix = "-1" if pid == -1 else f"{pid:04d}"  # Market-1501 writes junk as "-1_..."
        name = f"{prefix}_c{cam + 1}s1_{frames[cam]:06d}_00.jpg"
        image.save(out / split / name, format="JPEG", quality=90)

    def person(pid: int, cam: int, k: int, ident: _Identity) -> Image.Image:
        return _render(
            ident, cams[cam], np.random.default_rng([p.seed, 3, pid, cam, k]), p.height, p.width
        )

    for pid in train_pids + test_pids:
        ident = _draw_identity(np.random.default_rng([p.seed, 2, pid]))
        for cam in range(p.num_cameras):
            for k in range(p.images_per_id_per_cam):
                if pid in train_set:
                    split = "bounding_box_train"
                else:  # the first image of each camera is the query, the rest gallery
                    split = "query" if k == 0 else "bounding_box_test"
                save(split, pid, cam, person(pid, cam, k, ident))
    for j in range(p.num_distractors):
        drng = np.random.default_rng([p.seed, 4, j])
        cam = int(drng.integers(p.num_cameras))
        image = _render(_draw_identity(drng), cams[cam], drng, p.height, p.width)
        save("bounding_box_test", 0, cam, image)
    for j in range(p.num_junk):
        jrng = np.random.default_rng([p.seed, 5, j])
        cam = int(jrng.integers(p.num_cameras))
        fragment = _draw_identity(jrng) if jrng.random() < 0.7 else None
        image = _render(fragment, cams[cam], jrng, p.height, p.width, junk=True)
        save("bounding_box_test", -1, cam, image)
    manifest = {"generator": "lagnet.data.synthetic", "params": asdict(p), "counts": _counts(out)}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def generate_synthetic_market(
    root: str | os.PathLike[str],
    *,
    num_train_ids: int = 100,
    num_test_ids: int = 100,
    images_per_id_per_cam: int = 4,
    num_cameras: int = 4,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    num_distractors: int = 100,
    num_junk: int = 40,
    overwrite: bool = False,
) -> Path:
    """Write (or reuse) a synthetic Market-1501-format dataset at ``root``; returns ``root``.

    Layout: ``bounding_box_train/`` (every train identity, ``images_per_id_per_cam`` images in
    every camera), ``query/`` (one image per test identity and camera), ``bounding_box_test/``
    (the other test images, plus ``num_distractors`` ``0000_...`` distractors and ``num_junk``
    ``-1_...`` junk crops), JPEG names ``PPPP_cCs1_FFFFFF_00.jpg``, and a ``lagnet_synthetic.json``
    manifest of the parameters. Identities are numbered ``1..num_train_ids + num_test_ids`` and
    split at random between train and test. The output depends only on the arguments (numpy
    generators seeded from ``seed``).

    The folder is written next to ``root`` under a temporary name and renamed into place. If
    ``root`` already holds a complete dataset with the same parameters, nothing is written; if
    it holds anything else, ``FileExistsError`` unless ``overwrite=True``.
    """
    p = _Params(
        num_train_ids,
        num_test_ids,
        images_per_id_per_cam,
        num_cameras,
        height,
        width,
        seed,
        num_distractors,
        num_junk,
    )
    _check(p)
    root = Path(root).expanduser()
    if root.exists():
        if _is_complete(root, p):
            return root
        if not overwrite and not (root.is_dir() and not any(root.iterdir())):
            raise FileExistsError(
                f"{str(root)!r} exists and is not a synthetic dataset with these parameters; "
                "pass overwrite=True to replace it, or choose another folder"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_dataset(tmp, p)
        if root.exists():
            if _is_complete(root, p):  # written meanwhile by a concurrent call
                return root
            if root.is_dir() and not root.is_symlink():
                trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
                os.replace(root, trash)  # an empty folder may be replaced by a rename
                os.replace(tmp, root)
                shutil.rmtree(trash)
            else:
                root.unlink()
                os.replace(tmp, root)
        else:
            try:
                os.replace(tmp, root)
            except OSError:
                if not _is_complete(root, p):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check(p: _Params) -> None:
    for name in ("num_train_ids", "num_test_ids", "images_per_id_per_cam", "num_cameras",
                 "height", "width"):  # fmt: skip
        check_positive_int(getattr(p, name), name)
    for name in ("seed", "num_distractors", "num_junk"):
        check_nonnegative_int(getattr(p, name), name)
    if p.num_train_ids < 1 or p.num_test_ids < 1:
        raise ValueError("num_train_ids and num_test_ids must be at least 1")
    if p.num_train_ids + p.num_test_ids > 9999:
        raise ValueError("at most 9999 identities fit the 4-digit Market-1501 names")
    if p.num_cameras < 2 or p.num_cameras > 9:
        raise ValueError("num_cameras must be between 2 and 9 (cross-camera matching)")
    if p.images_per_id_per_cam < 2:
        raise ValueError("images_per_id_per_cam must be at least 2 (one query + gallery)")
    if p.height < 32 or p.width < 16:
        raise ValueError("images must be at least 32 x 16 (height x width)")
    if p.num_distractors < 0 or p.num_junk < 0:
        raise ValueError("num_distractors and num_junk must be non-negative")


ImageSource = ReIDRecord | str | os.PathLike[str] | Image.Image


def color_histogram_features(
    images: Sequence[ImageSource], bins: int = 8, *, space: str = "hsv"
) -> torch.Tensor:
    """Joint colour histograms, one L2-normalised row of ``bins**3`` values per image.

    ``images`` are records, paths or PIL images; ``space`` is ``"hsv"`` or ``"rgb"`` (each
    channel quantised into ``bins`` equal ranges). Returns a float32 tensor (N, bins**3); the
    Euclidean distance between rows is a colour-only matcher (the baseline to beat).
    """
    if space not in ("hsv", "rgb"):
        raise ValueError(f"space must be 'hsv' or 'rgb', got {space!r}")
    check_positive_int(bins, "bins")
    if bins > 256:
        raise ValueError(f"bins must be in 1..256, got {bins}")
    out = np.zeros((len(images), bins**3), dtype=np.float32)
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            image = item.convert("RGB")
        else:
            image = read_image(item.path if isinstance(item, ReIDRecord) else item)
        if space == "hsv":
            image = image.convert("HSV")
        q = (np.asarray(image, dtype=np.int64) * bins) >> 8
        index = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
        out[i] = np.bincount(index.ravel(), minlength=bins**3)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return torch.from_numpy(out / np.maximum(norms, 1e-12))
