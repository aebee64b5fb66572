"""A fully connected backbone (Santoro et al. 2016 use 256-128-64-64 on flattened Omniglot)."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then ``[Linear, BatchNorm1d, ReLU]`` per hidden size.

    Args:
        input_shape: ``(C, H, W)``, or ``(d,)`` for vector inputs.
        hidden_sizes: width of each layer; the last one is ``out_features``.
        batch_norm: put a BatchNorm1d after each linear layer.

    Shapes:
        ``(n, *input_shape)`` -> ``(n, hidden_sizes[-1])``.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden_sizes: tuple[int, ...] = (256, 128, 64, 64),
        batch_norm: bool = True,
    ):
        super().__init__()
        if not hidden_sizes:
            raise ValueError("MLP needs at least one hidden size")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden_sizes:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nn.ReLU())
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
