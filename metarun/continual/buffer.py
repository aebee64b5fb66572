"""A replay memory filled by reservoir sampling (Vitter 1985), as used by experience replay
(Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning") and La-MAML."""

from __future__ import annotations

import torch
from torch import nn


class ReservoirBuffer(nn.Module):
    """Keeps ``size`` examples such that, after ``n`` examples have streamed past, each of
    them is in the buffer with probability ``size / n``, whatever their order.

    The contents and the count are module buffers, so they travel in ``state_dict`` and a
    resumed run replays exactly what an uninterrupted one would.

    Args:
        size: capacity in examples.
        input_shape: ``(C, H, W)`` of one example.
        target_shape: shape of one target: ``()`` for a label, ``(1,)`` for a regression
            target.
        target_dtype: ``torch.long`` for labels, a float type for regression targets.
    """

    def __init__(
        self,
        size: int,
        input_shape: tuple[int, ...],
        target_shape: tuple[int, ...] = (),
        target_dtype: torch.dtype = torch.long,
    ):
        super().__init__()
        if size < 1:
            raise ValueError(f"the replay buffer needs size >= 1, got {size}")
        self.size = size
        self.register_buffer("x", torch.zeros(size, *input_shape))
        self.register_buffer("y", torch.zeros(size, *target_shape, dtype=target_dtype))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return min(int(self.seen), self.size)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Offers a batch ``x (n, C, H, W)``, ``y (n, *target_shape)`` to the reservoir, in
        order: the ``k``-th example of the stream takes slot ``k`` while there is room, then a
        uniform slot in ``0..k`` (kept only when that slot is below ``size``)."""
        n, seen = y.shape[0], int(self.seen)
        positions = torch.arange(seen, seen + n)
        slots = (torch.rand(n, generator=generator) * (positions + 1)).long()
        slots = torch.where(positions < self.size, positions, slots)
        for k in torch.nonzero(slots < self.size).flatten().tolist():
            self.x[slots[k]] = x[k]
            self.y[slots[k]] = y[k]
        self.seen += n

    @torch.no_grad()
    def clear(self) -> None:
        """Empties the reservoir (a new stream starts)."""
        self.x.zero_()
        self.y.zero_()
        self.seen.zero_()

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples drawn uniformly with replacement: ``(x (n, C, H, W), y (n, ...))``."""
        idx = torch.randint(len(self), (n,), generator=generator).to(self.y.device)
        return self.x[idx], self.y[idx]
