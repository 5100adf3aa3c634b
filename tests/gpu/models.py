"""Models the GPU tests compile (none of them was used to develop the GPU schedules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import TransformerBlock, randomize_bn


class TwoHiddenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(40, 72), nn.Linear(72, 64), nn.Linear(64, 7)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class SmallResNet(nn.Module):
    """Conv + BatchNorm + a residual add + global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c1, self.bn1 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.down, self.bn3 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 6)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))
        x = F.max_pool2d(F.relu(self.bn3(self.down(x))), 2, 2)
        return self.fc(x.mean((2, 3)))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw, self.bn1 = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32)
        self.pw, self.bn2 = nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.avg_pool2d(F.relu(self.bn1(self.dw(x))), 2)
        x = F.relu(self.bn2(self.pw(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BinaryBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.hardtanh(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.hardtanh(y + (x if self.short is None else self.short(x)))


class BinaryResNet(nn.Module):
    """ResNet-ish binary CNN (CIFAR-sized input): stem, ``widths`` stages of ``depth`` blocks each,
    head (``widths=(64, 128, 256, 512), depth=2``: ResNet-18's layers)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64), classes: int = 10, depth: int = 1) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(depth):
                blocks.append(BinaryBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.hardtanh(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TiledCNN(nn.Module):
    """Convs and linears whose filters a ``tiled:p=4`` scheme divides (row-aligned tiles)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 6)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


MODELS = {
    "mlp": (TwoHiddenMLP, (4, 40)),
    "resnet": (SmallResNet, (2, 3, 10, 10)),
    "depthwise": (Depthwise, (2, 3, 8, 8)),
    "binary_resnet": (BinaryResNet, (2, 3, 16, 16)),
    "tiled_cnn": (TiledCNN, (3, 3, 8, 8)),
    "transformer": (TransformerBlock, (2, 8, 16)),  # (batch, tokens, features): sizes of B * 8
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    cls, shape = MODELS[name]
    return randomize_bn(cls(), seed=3), torch.randn(*shape)
