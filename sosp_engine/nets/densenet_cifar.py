"""DenseNet-40 (growth 12, no bottleneck, no compression) as used by Network Slimming, growth settable per block."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class DenseLayer(nn.Module):
    """BN-ReLU-Conv3x3 whose output is concatenated to its input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class CifarDenseNet(nn.Module):
    """DenseNet-(3n+4) with three dense blocks; `growth_rates` gives each block's growth rate."""

    def __init__(
        self,
        depth: int = 40,
        num_classes: int = 10,
        in_channels: int = 3,
        growth_rates: tuple[int, int, int] = (12, 12, 12),
    ) -> None:
        super().__init__()
        if (depth - 4) % 3 != 0:
            raise ValueError(f"DenseNet depth must be 3n+4 (e.g. 40), got {depth}")
        n = (depth - 4) // 3
        if len(growth_rates) != 3:
            raise ValueError(f"a CIFAR DenseNet has 3 blocks, got {len(growth_rates)} growth rates")
        planes = 2 * growth_rates[0]
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        for b, growth in enumerate(growth_rates):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth))
                planes += growth
            setattr(self, f"block{b + 1}", nn.Sequential(*layers))
            if b < 2:
                setattr(self, f"trans{b + 1}", Transition(planes, planes))
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.trans1(self.block1(out))
        out = self.trans2(self.block2(out))
        out = self.block3(out)
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)
