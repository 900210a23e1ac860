"""BatchTransform: bit-identical to the PIL presets for the same decisions, torchvision's
RandomErasing law for the rectangles, no host sync on CUDA, argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as tvf

from lagnet.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentDecisions,
    BatchTransform,
    ImageCache,
    build_transforms,
    read_image,
)

H, W = 384, 128


@pytest.fixture(scope="module")
def crops(market_crops: list[str]) -> list[str]:
    return market_crops


def pil_train(path: str, height: int, width: int, flip: bool, box: list[int]) -> torch.Tensor:
    """The training preset's PIL path with the flip and the rectangle injected."""
    image = T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC)(read_image(path))
    if flip:
        image = tvf.hflip(image)
    tensor = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)(T.ToTensor()(image))
    top, left, h, w = box
    if h > 0:
        tensor = tvf.erase(tensor, top, left, h, w, v=torch.tensor(0.0))
    return tensor


@pytest.mark.parametrize(("height", "width"), [(H, W), (37, 23)])
def test_test_preset_equals_build_transforms(crops: list[str], height: int, width: int) -> None:
    cache = ImageCache(crops, height, width, progress=False)
    out = BatchTransform(height, width, train=False)(cache.images)
    pil = build_transforms(height, width, train=False)
    expected = torch.stack([pil(read_image(p)) for p in crops])
    assert out.dtype == torch.float32 and out.shape == (len(crops), 3, height, width)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("height", "width"), [(H, W), (37, 23)])
def test_train_preset_equals_pil_for_the_same_decisions(
    crops: list[str], height: int, width: int
) -> None:
    cache = ImageCache(crops, height, width, progress=False)
    n = len(crops)
    flips = torch.tensor([i % 3 != 1 for i in range(n)])
    boxes = [[0, 0, 0, 0]] * n
    boxes[0] = [0, 0, 5, 7]  # the top-left corner
    boxes[1] = [height - 9, width - 4, 9, 4]  # the bottom-right corner
    boxes[2] = [3, 1, height - 4, width - 2]  # almost everything
    boxes[3] = [10, 2, 1, 1]  # one pixel
    boxes[5] = [4, 6, 8, 2]
    decisions = AugmentDecisions(flips, torch.tensor(boxes, dtype=torch.int64))
    transform = BatchTransform(height, width, train=True)
    before = cache.images.clone()
    out = transform.apply_decisions(cache.images, decisions)
    assert torch.equal(cache.images, before)  # the input is not modified
    for i, path in enumerate(crops):
        expected = pil_train(path, height, width, bool(flips[i]), boxes[i])
        assert torch.equal(out[i], expected), (i, boxes[i])
    # erased pixels are +0.0 exactly, as torchvision's erase writes them
    assert torch.equal(out[0, :, :5, :7].view(torch.int32), torch.zeros(3, 5, 7, dtype=torch.int32))


def test_forward_draws_then_applies(crops: list[str]) -> None:
    cache = ImageCache(crops, 40, 16, progress=False)
    transform = BatchTransform(40, 16, train=True, generator=torch.Generator().manual_seed(3))
    out = transform(cache.images)
    again = BatchTransform(40, 16, train=True, generator=torch.Generator().manual_seed(3))
    decisions = again.draw(len(crops), torch.device("cpu"))
    assert torch.equal(out, again.apply_decisions(cache.images, decisions))
    assert bool(decisions.flips.any()) and bool((decisions.boxes[:, 2] > 0).any())
    assert not torch.equal(out, transform(cache.images))  # the generator moved on


def test_eval_mode_and_disabled_options(crops: list[str]) -> None:
    cache = ImageCache(crops, 40, 16, progress=False)
    test = BatchTransform(40, 16, train=False)(cache.images)
    transform = BatchTransform(40, 16, train=True)
    assert transform.augments
    transform.eval()
    assert not transform.augments and torch.equal(transform(cache.images), test)
    plain = BatchTransform(40, 16, train=True, flip=False, random_erasing=False)
    assert not plain.augments and torch.equal(plain(cache.images), test)
    no_flip = BatchTransform(40, 16, train=True, flip=False, generator=torch.Generator())
    d = no_flip.draw(500, "cpu")
    assert not bool(d.flips.any()) and bool((d.boxes[:, 2] > 0).any())
    no_erase = BatchTransform(40, 16, train=True, random_erasing=False, generator=torch.Generator())
    d = no_erase.draw(500, "cpu")
    assert bool(d.flips.any()) and torch.equal(d.boxes, torch.zeros(500, 4, dtype=torch.int64))
    assert "train=True, flip=False, random_erasing=True" in repr(no_flip)


def test_drawn_rectangles_lie_inside_the_image(device: torch.device) -> None:
    transform = BatchTransform(H, W, train=True)
    gen = torch.Generator(device=device).manual_seed(0)
    transform.generator = gen
    d = transform.draw(4000, device)
    assert d.flips.device.type == device.type and d.boxes.dtype == torch.int64
    top, left, h, w = d.boxes.cpu().unbind(1)
    erased = h > 0
    assert bool((w[erased] > 0).all()) and bool((w[~erased] == 0).all())
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + h <= H).all() and (left + w <= W).all())
    assert bool((h < H).all() and (w < W).all())


def _torchvision_boxes(
    n: int, seed: int, height: int = H, width: int = W
) -> tuple[np.ndarray, int]:
    """n draws of RandomErasing(p=0.5, ...) on a (3, height, width) image: boxes, erased count."""
    image = torch.empty(3, height, width)
    boxes = np.zeros((n, 4), dtype=np.int64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for k in range(n):
            if torch.rand(1) < 0.5:
                i, j, h, w, _ = T.RandomErasing.get_params(
                    image, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=[0.0]
                )
                if (h, w) != (height, width):  # (0, 0, H, W): all 10 attempts failed
                    boxes[k] = (i, j, h, w)
    return boxes, int((boxes[:, 2] > 0).sum())


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), grid, side="right") / a.size
    fb = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


@pytest.mark.slow
def test_rectangles_follow_torchvisions_law() -> None:
    n = 20_000
    ours = BatchTransform(H, W, train=True, generator=torch.Generator().manual_seed(1))
    d = ours.draw(n, "cpu")
    mine = d.boxes.numpy()
    theirs, erased_theirs = _torchvision_boxes(n, seed=2)
    erased_mine = int((mine[:, 2] > 0).sum())
    # P(erase) = 0.5 * P(one of 10 attempts fits) ~ 0.5: the difference of two binomial
    # proportions has sd sqrt(2 * 0.25 / n) = 0.005; allow 4 sd.
    assert abs(erased_mine - erased_theirs) / n < 0.02
    assert abs(erased_mine / n - 0.5) < 0.02
    a = mine[mine[:, 2] > 0]
    b = theirs[theirs[:, 2] > 0]
    # Two-sample KS at alpha = 1e-3: D < 1.95 * sqrt((na + nb) / (na nb)) ~ 0.028 for 10k + 10k
    # (conservative for these discrete laws). Heights, widths, areas, aspect, position.
    bound = 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    columns = {
        "top": (a[:, 0], b[:, 0]),
        "left": (a[:, 1], b[:, 1]),
        "h": (a[:, 2], b[:, 2]),
        "w": (a[:, 3], b[:, 3]),
        "area": (a[:, 2] * a[:, 3], b[:, 2] * b[:, 3]),
        "aspect": (a[:, 2] / a[:, 3], b[:, 2] / b[:, 3]),
    }
    for name, (x, y) in columns.items():
        assert _ks(x, y) < bound, name
    # and the test has power: a rectangle law with areas one fifth larger is rejected
    assert _ks((a[:, 2] * a[:, 3] * 1.2).astype(np.int64), b[:, 2] * b[:, 3]) > bound
    # flips: P = 0.5 within 4 sd
    assert abs(float(d.flips.double().mean()) - 0.5) < 4 * math.sqrt(0.25 / n)


@pytest.mark.slow
def test_ten_attempts_then_no_erasing_like_torchvision() -> None:
    # On a 2 x 64 image one attempt fits (h = 1) with probability about 0.02, so whether an
    # image is erased depends on the 10-attempt limit: P(erase) = 0.5 * (1 - 0.98^10) ~ 0.087
    # (one attempt only: ~0.01; no limit: 0.5).
    n = 10_000
    ours = BatchTransform(2, 64, train=True, generator=torch.Generator().manual_seed(4))
    mine = ours.draw(n, "cpu").boxes.numpy()
    theirs, erased_theirs = _torchvision_boxes(n, seed=5, height=2, width=64)
    erased_mine = int((mine[:, 2] > 0).sum())
    # two binomial proportions near 0.087: sd of the difference sqrt(2 * 0.087 * 0.913 / n)
    # = 0.004; allow 4 sd
    assert abs(erased_mine - erased_theirs) / n < 0.016
    assert 0.06 < erased_mine / n < 0.11
    a, b = mine[mine[:, 2] > 0], theirs[theirs[:, 2] > 0]
    assert set(a[:, 2].tolist()) == set(b[:, 2].tolist()) == {1}
    bound = 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    for column in range(4):
        assert _ks(a[:, column], b[:, column]) < bound, column


def test_flip_where_on_every_width() -> None:
    from lagnet.data.batch_transform import _flip_where

    for width in (1, 2, 3, 4, 6, 8, 12, 16, 24):
        x = torch.randint(0, 256, (3, 2, 5, width), dtype=torch.uint8)
        flips = torch.tensor([True, False, True])
        out = _flip_where(x, flips)
        assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
        assert torch.equal(out[2], x[2].flip(-1))
    offset = torch.randint(0, 256, (2 * 3 * 4 * 8 + 1,), dtype=torch.uint8)[1:].view(2, 3, 4, 8)
    out = _flip_where(offset, torch.tensor([False, True]))
    assert torch.equal(out[1], offset[1].flip(-1)) and torch.equal(out[0], offset[0])


def test_device_matches_cpu_bit_for_bit(device: torch.device) -> None:
    images = torch.randint(0, 256, (6, 3, 24, 16), dtype=torch.uint8)
    decisions = AugmentDecisions(
        torch.tensor([True, False, True, True, False, False]),
        torch.tensor([[0, 0, 3, 4], [0] * 4, [5, 2, 10, 9], [0] * 4, [20, 15, 4, 1], [0] * 4]),
    )
    transform = BatchTransform(24, 16, train=True)
    cpu = transform.apply_decisions(images, decisions)
    on_device = transform.apply_decisions(
        images.to(device), AugmentDecisions(*(t.to(device) for t in decisions))
    )
    assert on_device.device.type == device.type
    assert torch.equal(on_device.cpu(), cpu)
    assert torch.equal(
        BatchTransform(24, 16, train=False)(images.to(device)).cpu(),
        BatchTransform(24, 16, train=False)(images),
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_never_syncs() -> None:
    images = torch.randint(0, 256, (8, 3, 64, 32), dtype=torch.uint8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    train = BatchTransform(64, 32, train=True, generator=gen)
    test = BatchTransform(64, 32, train=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the first call included: its constants go to the device without blocking
        outs = [train(images), train(images), test(images)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(o.device.type == "cuda" and o.dtype == torch.float32 for o in outs)
    assert torch.equal(outs[2].cpu(), BatchTransform(64, 32, train=False)(images.cpu()))


def test_bad_arguments() -> None:
    transform = BatchTransform(8, 4, train=True)
    good = torch.zeros(2, 3, 8, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"uint8 \(B, 3, 8, 4\) tensor, got dtype torch.float32"):
        transform(good.float())
    with pytest.raises(ValueError, match=r"got dtype torch.uint8 and shape \(2, 3, 8, 5\)"):
        transform(torch.zeros(2, 3, 8, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        transform(good[:0])
    with pytest.raises(TypeError, match="images must be a torch.Tensor, got ndarray"):
        transform(good.numpy())
    with pytest.raises(ValueError, match=r"decisions.flips must be a \(2,\) bool tensor"):
        transform.apply_decisions(
            good,
            AugmentDecisions(
                torch.zeros(3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.int64)
            ),
        )
    with pytest.raises(ValueError, match=r"decisions.boxes must be a \(2, 4\) int64 tensor"):
        transform.apply_decisions(
            good,
            AugmentDecisions(
                torch.zeros(2, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.int32)
            ),
        )
    with pytest.raises(TypeError, match="decisions must be AugmentDecisions or None, got tuple"):
        transform.apply_decisions(good, (1, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="height must be >= 1, got 0"):
        BatchTransform(0, 4, train=True)
    with pytest.raises(TypeError, match="train must be a bool, got str"):
        BatchTransform(8, 4, train="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        BatchTransform(8, 4, train=True, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        transform.draw(0, "cpu")


def test_module_apply_keeps_its_meaning() -> None:
    transform = BatchTransform(8, 4, train=True)
    seen: list[str] = []
    assert transform.apply(lambda m: seen.append(type(m).__name__)) is transform
    assert seen == ["BatchTransform"]


def test_keep_bits_mask_is_exact() -> None:
    from lagnet.data.batch_transform import _keep_bits

    boxes = torch.tensor([[1, 2, 2, 3], [0, 0, 0, 0], [3, 4, 5, 5]])  # the last one is clipped
    keep = _keep_bits(boxes, 4, 6)
    assert keep.shape == (3, 1, 4, 6) and keep.dtype == torch.int32
    expected = torch.full((3, 4, 6), -1, dtype=torch.int32)
    expected[0, 1:3, 2:5] = 0
    expected[2, 3:, 4:] = 0
    assert torch.equal(keep[:, 0], expected)
