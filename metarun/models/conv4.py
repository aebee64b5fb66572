"""The 4-block convolutional backbone of Vinyals et al. (2016), used by MAML and ProtoNets."""

from __future__ import annotations

import torch
from torch import nn


class Conv4(nn.Module):
    """4 x [conv 3x3 (``hidden`` channels), BatchNorm, ReLU, max-pool 2], then flatten.

    Args:
        input_shape: ``(C, H, W)`` of the images, e.g. ``(1, 28, 28)`` or ``(3, 84, 84)``.
        hidden: channels of every block.
        bn_momentum: momentum of the BatchNorm running statistics.

    Shapes:
        ``(n, C, H, W)`` -> ``(n, out_features)``; ``out_features`` is 64 for 28x28 inputs
        and 1600 for 84x84 with ``hidden=64``.
    """

    def __init__(
        self, input_shape: tuple[int, int, int], hidden: int = 64, bn_momentum: float = 0.1
    ):
        super().__init__()
        channels, height, width = input_shape
        blocks = []
        for i in range(4):
            blocks += [
                nn.Conv2d(channels if i == 0 else hidden, hidden, kernel_size=3, padding=1),
                nn.BatchNorm2d(hidden, momentum=bn_momentum),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"Conv4 needs images of at least 16x16 pixels, got {input_shape}")
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.out_features = hidden * height * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
