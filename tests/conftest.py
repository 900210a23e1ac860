from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from lagnet.checkpoint import save_checkpoint
from lagnet.data import generate_synthetic_market
from lagnet.model import build_lagnet
from lagnet.presets import SYNTHETIC_SIZES

CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Run a test on the CPU and, when present, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` synthetic Market-1501 folder (seed 0) that the command tests run on."""
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate_synthetic_market(root, seed=0, **SYNTHETIC_SIZES["tiny"])
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run checkpoint in the layout `lagnet train` writes, with untrained weights."""
    torch.manual_seed(0)
    model = build_lagnet(8, backbone="resnet18", num_attentions=4)
    path = tmp_path_factory.mktemp("weights") / "best.pth"
    config = {"num_classes": 8, "backbone": "resnet18", "variant": "paper",
              "num_attentions": 4, "height": 64, "width": 32}  # fmt: skip
    save_checkpoint({"model": model.state_dict(), "model_config": config}, path)
    return path


@pytest.fixture(scope="module")
def market_crops(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Real JPEG crops at Market-1501's size (128x64) from the synthetic writer, sorted."""
    root = tmp_path_factory.mktemp("market") / "synthetic"
    generate_synthetic_market(
        root,
        num_train_ids=3,
        num_test_ids=2,
        images_per_id_per_cam=2,
        num_cameras=2,
        num_distractors=0,
        num_junk=0,
    )
    return sorted(str(p) for p in (root / "bounding_box_train").glob("*.jpg"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything opens a network connection (`pytest.mark.usefixtures`)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
