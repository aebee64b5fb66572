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
        pool_blocks: how many of the blocks, from the first, end with the max-pool; the
            embedding of Relation Networks (Sung et al. 2018) pools in the first two only.
        flatten: flatten the output; ``False`` keeps the feature maps (Relation Networks).

    Shapes:
        ``(n, C, H, W)`` -> ``(n, out_features)``; ``out_features`` is 64 for 28x28 inputs
        and 1600 for 84x84 with ``hidden=64``. ``out_shape`` is ``(out_features,)``, or
        ``(hidden, H', W')`` with ``flatten=False`` (``(64, 7, 7)`` for 28x28 inputs and
        ``pool_blocks=2``).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        hidden: int = 64,
        bn_momentum: float = 0.1,
        pool_blocks: int = 4,
        flatten: bool = True,
    ):
        super().__init__()
        channels, height, width = input_shape
        blocks = []
        for i in range(4):
            blocks += [
                nn.Conv2d(channels if i == 0 else hidden, hidden, kernel_size=3, padding=1),
                nn.BatchNorm2d(hidden, momentum=bn_momentum),
                nn.ReLU(),
                nn.MaxPool2d(2) if i < pool_blocks else nn.Identity(),  # same layer names
            ]
            if i < pool_blocks:
                height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"Conv4 needs images of at least 16x16 pixels, got {input_shape}")
        self.features = nn.Sequential(*blocks, nn.Flatten() if flatten else nn.Identity())
        self.out_features = hidden * height * width
        self.out_shape = (self.out_features,) if flatten else (hidden, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
