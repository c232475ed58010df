"""CIFAR ResNets (He et al. 2016) with basic blocks and projection shortcuts, widths settable per stage and
per block."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; a 1x1 conv + BatchNorm shortcut where the shape changes."""

    def __init__(self, in_planes: int, inner: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; `stage_widths` sets the residual stream, `inner_widths` each block's
    inner conv."""

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        in_channels: int = 3,
        stage_widths: tuple[int, ...] = STAGE_WIDTHS,
        inner_widths: list[int] | None = None,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        if len(stage_widths) != 3:
            raise ValueError(f"a CIFAR ResNet has 3 stages, got {len(stage_widths)} widths")
        if inner_widths is not None and len(inner_widths) != 3 * n:
            raise ValueError(f"resnet{depth} has {3 * n} blocks, got {len(inner_widths)} inner widths")
        self.conv1 = nn.Conv2d(in_channels, stage_widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_widths[0])
        in_planes = stage_widths[0]
        block_index = 0
        for stage, planes in enumerate(stage_widths):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                inner = planes if inner_widths is None else inner_widths[block_index]
                blocks.append(BasicBlock(in_planes, inner, planes, stride))
                in_planes = planes
                block_index += 1
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
