"""A 1-D convolutional backbone for sequences (sensor signals, time series).

The 1-D counterpart of :class:`metarun.models.Conv4`: blocks of [conv, BatchNorm, ReLU,
max-pool] over time, ending with global average pooling over time as the fully
convolutional network of Wang, Yan & Oates (2017, "Time series classification from scratch
with deep neural networks") does, so that the number of features does not depend on the
length.
"""

from __future__ import annotations

import torch
from torch import nn


class Conv1D(nn.Module):
    """``blocks`` x [conv1d (``hidden`` channels, ``kernel_size``, same padding),
    BatchNorm1d, ReLU, max-pool ``pool``], then the mean over time (``global_pool``) or a
    flatten.

    Args:
        input_shape: ``(channels, length)`` of a sequence, or ``(length,)`` for one channel.
        hidden: channels of every block.
        blocks: number of blocks.
        kernel_size: width of the convolutions.
        pool: max-pool width and stride after each block (1: no pooling).
        bn_momentum: momentum of the BatchNorm running statistics.
        global_pool: average the last block's output over time; ``False`` flattens it.

    Shapes:
        ``(n, channels, length)`` (or ``(n, length)``) -> ``(n, out_features)``;
        ``out_features`` is ``hidden``, or ``hidden * (length // pool**blocks)`` without
        global pooling.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden: int = 64,
        blocks: int = 4,
        kernel_size: int = 7,
        pool: int = 2,
        bn_momentum: float = 0.1,
        global_pool: bool = True,
    ):
        super().__init__()
        if len(input_shape) not in (1, 2):
            raise ValueError(
                f"model=conv1d takes sequences of shape (channels, length) or (length,), got "
                f"examples of shape {tuple(input_shape)}; for images use model=conv4."
            )
        if blocks < 1 or hidden < 1 or kernel_size < 1 or pool < 1:
            raise ValueError(
                f"model=conv1d needs blocks, hidden, kernel_size and pool >= 1, got blocks="
                f"{blocks}, hidden={hidden}, kernel_size={kernel_size}, pool={pool}"
            )
        channels, length = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
        self.one_channel = len(input_shape) == 1
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers += [
                nn.Conv1d(channels if i == 0 else hidden, hidden, kernel_size, padding="same"),
                nn.BatchNorm1d(hidden, momentum=bn_momentum),
                nn.ReLU(),
                nn.MaxPool1d(pool) if pool > 1 else nn.Identity(),
            ]
            length //= pool
        if length < 1:
            raise ValueError(
                f"model=conv1d: sequences of length {input_shape[-1]} are too short for "
                f"{blocks} blocks that each pool by {pool}; lower model.blocks or model.pool."
            )
        self.features = nn.Sequential(*layers)
        self.global_pool = global_pool
        self.out_features = hidden if global_pool else hidden * length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_channel:
            x = x.unsqueeze(1)  # (n, length) -> (n, 1, length)
        x = self.features(x)  # (n, hidden, length')
        return x.mean(dim=-1) if self.global_pool else x.flatten(1)
