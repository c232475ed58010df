"""VGG-19 with BatchNorm in the CIFAR variant of Network Slimming / EigenDamage, widths settable per conv layer."""

from __future__ import annotations

import torch
from torch import nn

VGG19_WIDTHS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
)


class CifarVGG(nn.Module):
    """Conv-BN-ReLU stacks with max pooling, global average pooling and one linear classifier."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, conv_widths: list[int] | None = None
    ) -> None:
        super().__init__()
        plan = list(VGG19_WIDTHS)
        n_convs = sum(1 for v in plan if v != "M")
        if conv_widths is not None:
            if len(conv_widths) != n_convs:
                raise ValueError(f"vgg19 has {n_convs} conv layers, got {len(conv_widths)} widths")
            widths = iter(conv_widths)
            plan = [v if v == "M" else next(widths) for v in plan]
        layers: list[nn.Module] = []
        channels = in_channels
        for v in plan:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [
                    nn.Conv2d(channels, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(),
                ]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
