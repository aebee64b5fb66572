"""The surface every algorithm shares, and small helpers they use."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from metarun.config import BatchNormMode
from metarun.data.episodes import Episode

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps query images ``(n_query, C, H, W)`` to logits ``(n_query, ways)``."""


@runtime_checkable
class MetaLearner(Protocol):
    """What the runner needs from an algorithm (implemented by ``nn.Module`` subclasses)."""

    bn_mode: BatchNormMode

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss after adapting to the support set, differentiable with respect to the
        meta-parameters, and query accuracy. Both are scalars."""
        ...

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Adapts to a support set ``(n_support, C, H, W)``, ``(n_support,)`` and returns a
        predictor for the queries. Never changes the algorithm's own state."""
        ...


@contextlib.contextmanager
def batch_norm_mode(module: nn.Module, mode: BatchNormMode) -> Iterator[None]:
    """Puts ``module`` in train mode (batch statistics) for ``transductive`` evaluation and in
    eval mode (running statistics) for ``running``, restoring its mode afterwards."""
    was_training = module.training
    module.train(mode == BatchNormMode.transductive)
    try:
        yield
    finally:
        module.train(was_training)


def buffer_copies(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's buffers, so an evaluation forward pass in train mode updates
    the copies and leaves the running statistics of the model untouched."""
    return {name: b.clone() for name, b in module.named_buffers()}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``(n, ways)`` logits whose argmax equals ``labels`` ``(n,)``."""
    return (logits.argmax(dim=-1) == labels).float().mean()
