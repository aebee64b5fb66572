"""Random affine distortions of training episodes (``train.augment: affine``).

Koch, Zemel & Salakhutdinov, *Siamese Neural Networks for One-shot Image Recognition*
(ICML deep learning workshop, 2015), section 4.3: each training image is distorted by a
random affine transformation with rotation in [-10, 10] degrees, shears in [-0.3, 0.3],
scales in [0.8, 1.2] and translations in [-2, 2] pixels (of their 105-pixel images; here
2/105 of the image side), each of the four components applied with probability 0.5. The
ranges are theirs; the implementation is ours (:func:`torch.nn.functional.affine_grid`,
bilinear sampling, zeros outside the image, which is the background of Omniglot's
inverted images).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from metarun.data.episodes import Episode

ROTATION_DEG = 10.0
SHEAR = 0.3
SCALE = (0.8, 1.2)
TRANSLATE = 2.0 / 105.0  # of the image side
COMPONENT_PROBABILITY = 0.5


class Sampler(Protocol):
    def sample(self) -> Episode: ...
    def get_state(self) -> torch.Tensor: ...
    def set_state(self, state: torch.Tensor) -> None: ...


def random_affine(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 2, 3)`` random affine matrices in :func:`~torch.nn.functional.affine_grid`'s
    normalised coordinates (the identity where a component is not drawn)."""

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, n, generator=generator)

    use = torch.rand(4, n, generator=generator) < COMPONENT_PROBABILITY
    angle = torch.where(use[0], uniform(-ROTATION_DEG, ROTATION_DEG) * math.pi / 180, 0.0)
    shear = torch.where(use[1], uniform(-SHEAR, SHEAR, 2), 0.0)
    scale = torch.where(use[2], uniform(*SCALE, 2), 1.0)
    shift = torch.where(use[3], uniform(-2 * TRANSLATE, 2 * TRANSLATE, 2), 0.0)  # [-1, 1] coords
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    ones = torch.ones(n)
    shear_m = torch.stack(
        [torch.stack([ones, shear[0]], -1), torch.stack([shear[1], ones], -1)], -2
    )
    linear = rotate @ shear_m @ torch.diag_embed(scale.T)
    return torch.cat([linear, shift.T[:, :, None]], dim=2)


def distort(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine distortions of ``(n, C, H, W)`` uint8 images -> float in [0, 1]."""
    return warp(images.float().div_(255), generator)


def warp(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine distortions of ``(n, C, H, W)`` float images (each its own; the
    matrices drawn from ``generator`` on the CPU, the sampling on ``x``'s device)."""
    theta = random_affine(x.shape[0], generator).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class AffineAugmented:
    """A training sampler whose episodes' support and query images are distorted by
    :func:`distort` (each image its own transformation), drawn from its own generator.

    Args:
        sampler: the episode sampler to wrap.
        seed: seed of the distortions' generator.
    """

    def __init__(self, sampler: Sampler, seed: int):
        self.sampler = sampler
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Episode:
        ep = self.sampler.sample()
        return Episode(
            distort(ep.support_x, self.generator),
            ep.support_y,
            distort(ep.query_x, self.generator),
            ep.query_y,
            ep.classes,
        )

    def get_state(self) -> torch.Tensor:
        """The wrapped sampler's generator state followed by the distortions'."""
        return torch.cat([self.sampler.get_state(), self.generator.get_state()])

    def set_state(self, state: torch.Tensor) -> None:
        own = self.generator.get_state().numel()
        self.sampler.set_state(state[:-own].clone())
        self.generator.set_state(state[-own:].clone())
