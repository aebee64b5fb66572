"""A fully connected backbone (Santoro et al. 2016 use 256-128-64-64 on flattened Omniglot)."""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("default", "xavier_uniform", "kaiming_normal")


class MLP(nn.Module):
    """Flatten, then ``[Linear, BatchNorm1d, ReLU]`` per hidden size.

    Args:
        input_shape: ``(C, H, W)``, or ``(d,)`` for vector inputs.
        hidden_sizes: width of each layer; the last one is ``out_features``.
        batch_norm: put a BatchNorm1d after each linear layer.
        init_std: ``None`` keeps PyTorch's initialisation; a number draws the weights of
            every linear layer, and of the head an algorithm puts on the MLP
            (:meth:`init_linear`), from a normal distribution with this standard deviation
            truncated at two of them, with zero biases (MAML's reference code: 0.01).
        init: ``default`` (PyTorch's, or ``init_std``), ``xavier_uniform`` (GEM's and MER's
            MLP) or ``kaiming_normal`` (fan-in, ReLU gain: La-MAML's), with zero biases; for
            every linear layer and the head, like ``init_std``.

    Shapes:
        ``(n, *input_shape)`` -> ``(n, hidden_sizes[-1])``.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden_sizes: tuple[int, ...] = (256, 128, 64, 64),
        batch_norm: bool = True,
        init_std: float | None = None,
        init: str = "default",
    ):
        super().__init__()
        if not hidden_sizes:
            raise ValueError("MLP needs at least one hidden size")
        if init_std is not None and init_std <= 0:
            raise ValueError(
                f"model.init_std={init_std}: give a positive standard deviation, or null"
            )
        if init not in INITS:
            raise ValueError(f"model.init={init!r}: choose one of {', '.join(INITS)}")
        if init != "default" and init_std is not None:
            raise ValueError(f"model.init={init} and model.init_std={init_std}: give one of them")
        self.init_std, self.init = init_std, init
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden_sizes:
            linear = nn.Linear(width, size)
            self.init_linear(linear)
            layers.append(linear)
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nn.ReLU())
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def init_linear(self, layer: nn.Linear) -> None:
        """Initialises ``layer`` as this MLP's own linear layers (see ``init_std``)."""
        if self.init_std is not None:
            nn.init.trunc_normal_(
                layer.weight, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std
            )
        elif self.init == "xavier_uniform":
            nn.init.xavier_uniform_(layer.weight)
        elif self.init == "kaiming_normal":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        else:
            return
        nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
