"""The ResNet-12 backbone of few-shot learning papers.

Four residual blocks with 64-160-320-640 channels, as in TADAM (Oreshkin, Rodríguez &
Lacoste, NeurIPS 2018) and MetaOptNet (Lee, Maji, Ravichandran & Soatto, CVPR 2019).
Each block is three 3x3 convolutions with BatchNorm (LeakyReLU 0.1 after the first two),
a 1x1 convolution + BatchNorm shortcut, LeakyReLU after the sum, and a 2x2 max-pool.
MetaOptNet's DropBlock regulariser is not included.

The model is a plain ``nn.Module`` without in-place tricks, so MAML can run it with
``torch.func.functional_call`` and differentiate through its inner loop.
"""

from __future__ import annotations

import torch
from torch import nn

STANDARD_CHANNELS = (64, 160, 320, 640)


class ResidualBlock(nn.Module):
    """conv-BN-LeakyReLU, conv-BN-LeakyReLU, conv-BN, plus a 1x1 conv-BN shortcut; then
    LeakyReLU and max-pool 2. ``(n, in_ch, H, W)`` -> ``(n, out_ch, H // 2, W // 2)``."""

    def __init__(self, in_ch: int, out_ch: int, bn_momentum: float, slope: float = 0.1):
        super().__init__()

        def conv_bn(cin: int, kernel: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, out_ch, kernel, padding=kernel // 2, bias=False)
            return [conv, nn.BatchNorm2d(out_ch, momentum=bn_momentum)]

        self.body = nn.Sequential(
            *conv_bn(in_ch, 3),
            nn.LeakyReLU(slope),
            *conv_bn(out_ch, 3),
            nn.LeakyReLU(slope),
            *conv_bn(out_ch, 3),
        )
        self.shortcut = nn.Sequential(*conv_bn(in_ch, 1))
        self.out = nn.Sequential(nn.LeakyReLU(slope), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """Four :class:`ResidualBlock` s, then global average pooling (or flattening).

    Args:
        input_shape: ``(C, H, W)`` of the images, e.g. ``(3, 84, 84)`` or ``(3, 32, 32)``.
        channels: output channels of the four blocks; ``(64, 160, 320, 640)`` is the
            standard width.
        avg_pool: average the final feature map over space (``out_features =
            channels[-1]``); ``False`` flattens it (``channels[-1] * 5 * 5 = 16000`` at
            84x84, as MetaOptNet does).
        bn_momentum: momentum of the BatchNorm running statistics.

    Shapes:
        ``(n, C, H, W)`` -> ``(n, out_features)``.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        channels: tuple[int, ...] | list[int] = STANDARD_CHANNELS,
        avg_pool: bool = True,
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"ResNet12 has 4 blocks; got {len(channels)} channel widths")
        in_ch, height, width = input_shape
        blocks = []
        for out_ch in channels:
            blocks.append(ResidualBlock(in_ch, out_ch, bn_momentum))
            in_ch, height, width = out_ch, height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"ResNet12 needs images of at least 16x16 pixels, got {input_shape}")
        head: nn.Module = nn.AdaptiveAvgPool2d(1) if avg_pool else nn.Identity()
        self.features = nn.Sequential(*blocks, head, nn.Flatten())
        self.out_features = in_ch if avg_pool else in_ch * height * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
