"""Transform presets: shapes, dtype, normalisation, and the train-time random ops."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lagnet.data import IMAGENET_MEAN, IMAGENET_STD, build_transforms

COLOR = (200, 30, 90)


def halves() -> Image.Image:
    """Left half red, right half blue: a flip is easy to see."""
    image = Image.new("RGB", (50, 100), (255, 0, 0))
    image.paste((0, 0, 255), (25, 0, 50, 100))
    return image


def test_test_preset_shape_dtype_and_normalisation() -> None:
    tf = build_transforms(64, 32, train=False)
    out = tf(Image.new("RGB", (17, 41), COLOR))
    assert out.shape == (3, 64, 32) and out.dtype == torch.float32
    for c in range(3):
        expected = (COLOR[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[c], torch.full((64, 32), expected), atol=1e-5)
    assert build_transforms(train=False)(Image.new("RGB", (64, 128))).shape == (3, 384, 128)


def test_test_preset_is_deterministic_and_never_flips() -> None:
    tf = build_transforms(100, 50, train=False)
    outs = [tf(halves()) for _ in range(20)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert float(outs[0][0, :, :10].mean()) > float(outs[0][0, :, -10:].mean())  # red left


def test_presets_use_bicubic_resize_and_torchvision_random_erasing() -> None:
    train = build_transforms(384, 128, train=True)
    ops = train.transforms  # type: ignore[attr-defined]
    assert [type(op) for op in ops] == [
        T.Resize,
        T.RandomHorizontalFlip,
        T.ToTensor,
        T.Normalize,
        T.RandomErasing,
    ]
    assert ops[0].size == (384, 128) and ops[0].interpolation == T.InterpolationMode.BICUBIC
    erase = ops[-1]
    assert (erase.p, erase.scale, erase.ratio, erase.value) == (0.5, (0.02, 0.4), (0.3, 3.3), 0)
    assert ops[1].p == 0.5
    test_ops = build_transforms(train=False).transforms  # type: ignore[attr-defined]
    assert [type(op) for op in test_ops] == [T.Resize, T.ToTensor, T.Normalize]


def test_train_preset_flips_and_erases_about_half_the_time() -> None:
    torch.manual_seed(0)
    tf = build_transforms(100, 50, train=True)
    n, flipped, erased = 400, 0, 0
    for _ in range(n):
        out = tf(halves())
        flipped += float(out[0, :, :10].mean()) < float(out[0, :, -10:].mean())
        erased += bool((out == 0).all(dim=0).any())
    assert 0.4 * n < flipped < 0.6 * n
    assert 0.4 * n < erased < 0.6 * n


def test_train_preset_without_random_ops_equals_test_preset() -> None:
    torch.manual_seed(0)
    plain = build_transforms(64, 32, train=True, flip=False, random_erasing=False)
    test = build_transforms(64, 32, train=False)
    for _ in range(10):
        assert torch.equal(plain(halves()), test(halves()))


def test_invalid_size() -> None:
    with pytest.raises(ValueError, match=r"^height must be >= 1, got 0$"):
        build_transforms(0, 128, train=False)
    with pytest.raises(ValueError, match=r"^width must be >= 1, got -4$"):
        build_transforms(64, -4, train=False)
    with pytest.raises(TypeError, match=r"^height must be an int, got float \(64.5\)$"):
        build_transforms(64.5, 32, train=False)  # type: ignore[arg-type]
