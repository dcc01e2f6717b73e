"""Model zoo: the CHITA paper's two benchmarks and the MobileNetV1 latency reference.

Zoo models take images scaled to [0, 1] in NCHW and apply their own input normalisation, so that a
checkpoint, the data loader and every exported file agree on what the input is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, with constants that are not part of the state dict."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLPNet(nn.Module):
    """784-40-20-10 MLP without biases (CHITA paper, MNIST). Returns log-probabilities."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self.norm = Normalize((0.1307,), (0.3081,))
        self.fc1 = nn.Linear(in_features, 40, bias=False)
        self.fc2 = nn.Linear(40, 20, bias=False)
        self.fc3 = nn.Linear(20, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.norm(x), 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet20(nn.Module):
    """ResNet20 for CIFAR-10 (3 stages x 3 BasicBlocks, widths 16/32/64), input (N,3,32,32) in [0,1]."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.norm = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(3):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.norm(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv_bn(cin: int, cout: int, stride: int, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017) with width multiplier ``alpha``; input (N,3,R,R) in [0,1]."""

    CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 1000, alpha: float = 1.0):
        super().__init__()
        self.norm = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        c = int(32 * alpha)
        layers: list[nn.Module] = [_conv_bn(3, c, 2)]
        for out, stride in self.CFG:
            o = int(out * alpha)
            layers += [_conv_bn(c, c, stride, groups=c), _conv_bn(c, o, 1, k=1)]
            c = o
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(self.norm(x)))
        return self.fc(torch.flatten(x, 1))


def default_prunable(module: nn.Module, name: str) -> bool:
    """Conv and Linear weights are prunable; biases, BatchNorm and everything else are not."""
    return isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Linear))


def resnet_prunable(module: nn.Module, name: str) -> bool:
    """As in the CHITA paper: every conv and fc except the 1x1 downsample shortcuts."""
    return default_prunable(module, name) and "downsample" not in name


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample, CHW
    prunable: Callable[[nn.Module, str], bool]
    description: str


ZOO: dict[str, ZooEntry] = {
    "mlpnet": ZooEntry("mlpnet", MLPNet, (1, 28, 28), default_prunable, "MLPNet 784-40-20-10 (MNIST), CHITA paper"),
    "resnet20": ZooEntry("resnet20", ResNet20, (3, 32, 32), resnet_prunable, "ResNet20 (CIFAR-10), CHITA paper"),
    "mobilenetv1": ZooEntry("mobilenetv1", MobileNetV1, (3, 224, 224), default_prunable,
                            "MobileNetV1 1.0 at 224, 1000 classes (latency reference; random init)"),
}
