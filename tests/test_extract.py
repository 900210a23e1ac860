"""Tests of lagnet.evaluation.extract_features."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lagnet.evaluation import Features, extract_features


class Tiny(nn.Module):
    """(B, 3, 4, 6) -> (B, 5); batch norm and dropout make train and eval mode differ."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 4 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.drop(self.bn(x)).flatten(1))
        return out


def make_model() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    model.train()
    with torch.no_grad():  # move the running statistics away from their defaults
        model(torch.randn(8, 3, 4, 6) * 3 + 1)
    return model


def make_data(n: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 4, 6, generator=g)
    return images, torch.arange(n) % 3, torch.arange(n) % 2


def manual(model: nn.Module, images: torch.Tensor, flip: bool, normalize: bool) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(images)
        if flip:
            out = out + model(images.flip(3))
    return F.normalize(out, dim=1) if normalize else out


@pytest.mark.parametrize(("flip", "normalize"), [(True, True), (False, True), (True, False)])
def test_matches_manual_computation(flip: bool, normalize: bool) -> None:
    model = make_model()
    images, pids, camids = make_data()
    loader = DataLoader(TensorDataset(images, pids, camids), batch_size=3)
    feats = extract_features(model, loader, flip=flip, normalize=normalize, progress=False)
    assert isinstance(feats, Features) and len(feats) == 7
    expected = manual(make_model(), images, flip, normalize)
    torch.testing.assert_close(feats.features, expected)
    assert torch.equal(feats.pids, pids) and torch.equal(feats.camids, camids)
    assert feats.features.dtype == torch.float32 and feats.pids.dtype == torch.int64
    assert feats.features.device.type == "cpu"
    assert not feats.features.is_inference()
    feats.features.add_(1.0)  # ordinary tensors: in-place ops are allowed
    if normalize:
        torch.testing.assert_close(expected.norm(dim=1), torch.ones(7))


def test_flip_is_on_the_width_dimension() -> None:
    model = make_model()
    images, pids, camids = make_data(4)
    loader = DataLoader(TensorDataset(images, pids, camids), batch_size=4)
    feats = extract_features(model, loader, normalize=False, progress=False)
    wrong = manual(make_model(), images, False, False)
    model.eval()
    with torch.no_grad():
        wrong = wrong + model(images.flip(2))  # height flip: must not match
    assert not torch.allclose(feats.features, wrong)


@pytest.mark.parametrize("training", [True, False])
def test_training_mode_restored(training: bool) -> None:
    model = make_model()
    model.train(training)
    images, pids, camids = make_data()
    extract_features(model, DataLoader(TensorDataset(images, pids, camids)), progress=False)
    assert model.training is training
    assert model.bn.training is training and model.drop.training is training


def test_mixed_submodule_modes_restored() -> None:
    model = make_model()
    model.train()
    model.bn.eval()  # e.g. frozen batch norm during fine-tuning
    images, pids, camids = make_data()
    extract_features(model, DataLoader(TensorDataset(images, pids, camids)), progress=False)
    assert model.training and model.drop.training and model.fc.training
    assert not model.bn.training


def test_training_mode_restored_after_error() -> None:
    model = make_model()

    def bad_batches() -> Iterator[Any]:
        yield torch.zeros(2, 3, 4, 6), [0, 1], [0, 0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        extract_features(model, bad_batches(), progress=False)
    assert model.training


def test_dict_batches_lists_and_progress_bar() -> None:
    model = make_model()
    images, pids, camids = make_data(5)
    batches = [
        {"images": images[:2], "pids": pids[:2].tolist(), "camids": camids[:2].tolist()},
        {"images": images[2:], "pids": pids[2:], "camids": camids[2:], "paths": ["a"] * 3},
    ]
    feats = extract_features(model, batches, progress=True)
    torch.testing.assert_close(feats.features, manual(make_model(), images, True, True))
    assert feats.pids.tolist() == pids.tolist()


def test_amp_on_cpu_runs() -> None:
    model = make_model()
    images, pids, camids = make_data(4)
    loader = DataLoader(TensorDataset(images, pids, camids), batch_size=2)
    feats = extract_features(model, loader, amp=True, device="cpu", progress=False)
    assert feats.features.dtype == torch.float32
    torch.testing.assert_close(
        feats.features, manual(make_model(), images, True, True), atol=0.05, rtol=0.05
    )


class ReturnsTuple(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(1), x.flatten(1)


class ReturnsWrongShape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten()


@pytest.mark.parametrize(
    ("model", "batches", "error", "pattern"),
    [
        (Tiny(), [], ValueError, "loader yielded no batches"),
        (
            Tiny(),
            [(torch.zeros(2, 3, 4), [0, 1], [0, 0])],
            ValueError,
            r"\(B, C, H, W\).*\(2, 3, 4\)",
        ),
        (Tiny(), [(torch.zeros(2, 3, 4, 6), [0], [0, 0])], ValueError, r"pids has shape \(1,\)"),
        (Tiny(), [(torch.zeros(2, 3, 4, 6), [0, 1], [0.5, 0.0])], TypeError, "camids must be int"),
        (Tiny(), [{"images": torch.zeros(1, 3, 4, 6), "pids": [0]}], ValueError, "lacks"),
        (Tiny(), [torch.zeros(2, 3, 4, 6)], TypeError, "tuple or a dict, got Tensor"),
        (Tiny(), [(torch.zeros(2, 3, 4, 6), [0, 1])], ValueError, "got 2 items"),
        (Tiny(), [3], TypeError, "got int"),
        (ReturnsTuple(), [(torch.zeros(2, 3, 4, 6), [0, 1], [0, 0])], TypeError, "got tuple"),
        (
            ReturnsWrongShape(),
            [(torch.zeros(2, 3, 4, 6), [0, 1], [0, 0])],
            ValueError,
            r"shape \(288,\), expected \(4, D\) for the 2 images and their mirrors",
        ),
        ("model", [], TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_bad_input(model: Any, batches: Any, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        extract_features(model, batches, progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model() -> None:
    model = make_model().cuda()
    images, pids, camids = make_data()
    loader = DataLoader(TensorDataset(images, pids, camids), batch_size=3)
    feats = extract_features(model, loader, progress=False)
    assert feats.features.device.type == "cpu"
    expected = manual(make_model(), images, True, True)
    torch.testing.assert_close(feats.features, expected, atol=1e-4, rtol=1e-4)
    amp = extract_features(model, loader, amp=True, progress=False)
    torch.testing.assert_close(amp.features, expected, atol=2e-2, rtol=2e-2)
    for mode in ("bf16", "fp16"):
        half = extract_features(model, loader, amp=mode, channels_last=True, progress=False)  # type: ignore[arg-type]
        assert half.features.device.type == "cpu" and half.features.dtype == torch.float32
        torch.testing.assert_close(half.features, expected, atol=3e-2, rtol=3e-2)


class Recorder(nn.Module):
    """Wraps a model and records what each forward call saw."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, bool, torch.dtype | None]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.calls.append(
            (x.shape[0], x.is_contiguous(memory_format=torch.channels_last), autocast)
        )
        out: torch.Tensor = self.inner(x)
        return out


def test_flip_runs_as_one_batch_of_2b() -> None:
    model = Recorder(make_model())
    images, pids, camids = make_data(7)
    loader = DataLoader(TensorDataset(images, pids, camids), batch_size=3)
    feats = extract_features(model, loader, progress=False)
    assert [c[0] for c in model.calls] == [6, 6, 2]  # one forward per batch: images + mirrors
    torch.testing.assert_close(feats.features, manual(make_model(), images, True, True))
    model.calls.clear()
    extract_features(model, loader, flip=False, progress=False)
    assert [c[0] for c in model.calls] == [3, 3, 1]


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_modes_on_cpu(amp: str, dtype: torch.dtype) -> None:
    model = Recorder(make_model())
    images, pids, camids = make_data(4)
    loader = DataLoader(TensorDataset(images, pids, camids), batch_size=4)
    feats = extract_features(model, loader, amp=amp, progress=False)  # type: ignore[arg-type]
    assert model.calls == [(8, False, dtype)]
    assert feats.features.dtype == torch.float32
    torch.testing.assert_close(
        feats.features, manual(make_model(), images, True, True), atol=0.05, rtol=0.05
    )
    model.calls.clear()
    extract_features(model, loader, amp=None, progress=False)
    assert model.calls == [(8, False, None)]


def test_channels_last_input() -> None:
    model = Recorder(make_model())
    images, pids, camids = make_data(4)
    loader = DataLoader(TensorDataset(images, pids, camids), batch_size=4)
    feats = extract_features(model, loader, channels_last=True, progress=False)
    assert model.calls == [(8, True, None)]
    torch.testing.assert_close(feats.features, manual(make_model(), images, True, True))


def test_bad_amp_is_refused_before_any_work() -> None:
    model = Recorder(make_model())
    images, pids, camids = make_data(2)
    with pytest.raises(
        ValueError, match=r"amp must be one of \('bf16', 'fp16'\), None or a bool, got 'fp32'"
    ):
        extract_features(model, [(images, pids, camids)], amp="fp32", progress=False)  # type: ignore[arg-type]
    assert model.calls == []
