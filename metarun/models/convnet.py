"""A plain stack of 3x3 convolutions with chosen widths, strides, pooling and normalisation:
the representation networks of the meta-continual papers (OML's RLN, ANML's prediction and
neuromodulatory networks) at any width."""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("none", "batch", "instance")


class ConvNet(nn.Module):
    """``[conv 3x3 (no padding) -> norm -> ReLU -> optional 2x2 max-pool]`` per entry of
    ``channels``, then flatten.

    ANML's networks (Beaulieu et al. 2020) are ``channels=[256, 256, 256]``,
    ``pools=[true, true, false]`` with per-image normalisation (``norm=instance``: ANML
    normalises every image on its own, in training and at test); OML's at 28x28 (ANML's
    re-implementation) is six convolutions of 256 with strides ``[1, 1, 1, 2, 1, 2]`` and
    no normalisation.

    Args:
        input_shape: ``(C, H, W)``.
        channels: output channels of each convolution.
        strides: stride of each convolution (default 1).
        pools: whether each block ends with a 2x2 max-pool (default none).
        norm: ``none``, ``batch`` (BatchNorm2d) or ``instance`` (InstanceNorm2d with an
            affine transform: per-image normalisation).
        init: ``default`` (PyTorch's) or ``kaiming_normal`` (fan-in, ReLU gain, zero
            biases: OML's and ANML's code).

    Shapes:
        ``(n, C, H, W)`` -> ``(n, out_features)``.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: tuple[int, ...] = (256, 256, 256),
        strides: tuple[int, ...] | None = None,
        pools: tuple[bool, ...] | None = None,
        norm: str = "none",
        init: str = "default",
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model=convnet takes images (C, H, W), got inputs {input_shape}")
        if norm not in NORMS:
            raise ValueError(f"model.norm={norm!r}: choose one of {', '.join(NORMS)}")
        if init not in ("default", "kaiming_normal"):
            raise ValueError(f"model.init={init!r}: choose default or kaiming_normal")
        strides = list(strides) if strides is not None else [1] * len(channels)
        pools = list(pools) if pools is not None else [False] * len(channels)
        if not len(channels) == len(strides) == len(pools) or not channels:
            raise ValueError(
                f"model.channels, strides and pools must have one entry per block, got "
                f"{list(channels)}, {strides}, {pools}"
            )
        self.init = init
        layers: list[nn.Module] = []
        c, h, w = input_shape
        for out, stride, pool in zip(channels, strides, pools, strict=True):
            conv = nn.Conv2d(c, out, 3, stride=stride)
            self._init(conv)
            layers.append(conv)
            if norm == "batch":
                layers.append(nn.BatchNorm2d(out))
            elif norm == "instance":
                layers.append(nn.InstanceNorm2d(out, affine=True))
            layers.append(nn.ReLU())
            h, w = (h - 3) // stride + 1, (w - 3) // stride + 1
            if pool:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(
                    f"model=convnet: {input_shape[1]}x{input_shape[2]} images shrink to "
                    f"nothing after {len(layers)} layers; use fewer blocks, strides or pools"
                )
            c = out
        layers.append(nn.Flatten())
        self.layers = nn.Sequential(*layers)
        self.out_features = c * h * w
        self.out_shape = (self.out_features,)

    def _init(self, layer: nn.Module) -> None:
        if self.init == "kaiming_normal":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def init_linear(self, layer: nn.Linear) -> None:
        """Initialises a head put on this network as the network's own layers."""
        self._init(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
