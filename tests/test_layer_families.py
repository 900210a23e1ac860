"""LAS and BA-DropBlock on ConvNeXt, MobileNetV3 and EfficientNet feature maps.

Each family's first stages (random init, no download) give a channels-last feature map of odd
size; a LAS and a BA-DropBlock on it feed a small classifier, which must learn a fixed batch in
a few steps, and the layers must compile with ``fullgraph=True`` in training mode.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import Tensor, nn

from lagnet.layers import BatchAttentionDropBlock, GlobalPool, LocalAttentionSystem


def convnext_trunk() -> nn.Module:
    # stem (stride 4) and stage 1: 96 channels
    return torchvision.models.convnext_tiny().features[:2]


def mobilenet_trunk() -> nn.Module:
    # up to the first stride-16 block: 40 channels
    return torchvision.models.mobilenet_v3_small().features[:5]


def efficientnet_trunk() -> nn.Module:
    # stem and the first three MBConv stages: 40 channels at stride 8
    return torchvision.models.efficientnet_b0().features[:4]


# builder and input size: feature maps of 9x7 (ConvNeXt), 5x3 (MobileNet), 9x6 (EfficientNet)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, int]]] = {
    "convnext_tiny": (convnext_trunk, (36, 28)),
    "mobilenet_v3_small": (mobilenet_trunk, (68, 44)),
    "efficientnet_b0": (efficientnet_trunk, (68, 44)),
}


class AttentionHead(nn.Module):
    """LAS + BA-DropBlock on a feature map, then one linear classifier on both descriptors."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.las = LocalAttentionSystem(channels, num_attentions=4)
        self.drop = BatchAttentionDropBlock(threshold=0.6)
        self.pool = GlobalPool()
        self.fc = nn.Linear(2 * channels, num_classes)

    def forward(self, f: Tensor) -> Tensor:
        las = self.las(f)
        dropped = self.pool(self.drop(f, las.attention_maps))
        return self.fc(torch.cat([las.global_feature, dropped], dim=1))


class Plugged(nn.Module):
    def __init__(self, trunk: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = AttentionHead(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


@pytest.fixture(scope="module", autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layers_train_and_compile_in_other_families(family: str) -> None:
    torch.manual_seed(0)
    build, (height, width) = FAMILIES[family]
    trunk = build().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    images = torch.randn(8, 3, height, width).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    with torch.no_grad():
        f = trunk.eval()(images)
    assert f.is_contiguous(memory_format=torch.channels_last)
    assert f.shape[2] % 2 == 1 or f.shape[3] % 2 == 1, f.shape  # an odd spatial size
    model = Plugged(trunk.train(), f.shape[1], 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    conv_grad = model.head.las.conv.weight.grad
    assert conv_grad is not None and conv_grad.abs().sum() > 0

    # The layers compile as one graph (no graph break), in training mode, with gradients.
    # aot_eager traces forward and backward like inductor but skips code generation, which
    # would cost about 15 s per family here; test_attention/test_dropblock run inductor.
    head = model.head
    feats = f.detach().requires_grad_()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    out = compiled(feats)
    nn.functional.cross_entropy(out, labels).backward()
    assert out.shape == (8, 4)
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert feats.grad.abs().sum() > 0
