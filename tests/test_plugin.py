"""The layers dropped into a plain torchvision ResNet-18 classifier."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from lagnet import BatchAttentionDropBlock, LocalAttentionSystem


class PluggedResNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        r = torchvision.models.resnet18(num_classes=num_classes)
        self.trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
        self.drop = BatchAttentionDropBlock(
            threshold=0.7, generator=torch.Generator().manual_seed(0)
        )
        self.layer4 = r.layer4
        self.las = LocalAttentionSystem(512, num_attentions=4)
        self.fc = nn.Linear(512 + 512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        f = self.drop(self.trunk(x))  # attention derived from the features themselves
        f = self.layer4(f)
        las = self.las(f)
        return self.fc(torch.cat([f.mean(dim=(2, 3)), las.global_feature], dim=1))


def test_plugged_layers_train_and_loss_decreases() -> None:
    torch.manual_seed(0)
    model = PluggedResNet(4)
    x = torch.randn(8, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.las.conv.weight.grad is not None
    assert model.las.conv.weight.grad.abs().sum() > 0
    assert model.drop.eval()(x) is x
