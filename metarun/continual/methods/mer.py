"""Meta-Experience Replay (Riemer et al., ICLR 2019, "Learning to Learn without Forgetting by
Maximizing Transfer and Minimizing Interference"), algorithm 1 as the authors' code runs it
(github.com/mattriemer/MER, ``model/meralg1.py``)."""

from __future__ import annotations

import torch
from torch import nn

from metarun.continual.methods.base import (
    ContinualLearner,
    StreamCapabilities,
    check_finite_loss,
    replay_buffer,
)
from metarun.tasks import CLASSIFICATION, TaskKind


class MER(ContinualLearner):
    """MER: a Reptile-style meta-update over batches of replayed examples, which favours
    weight changes whose gradients agree across examples (transfer) over those that
    disagree (interference).

    For each incoming example, with ``theta_0`` the weights before it:

    1. ``batches_per_example`` (``s``) times, from ``theta_b`` the weights before the
       batch: take a batch of the current example followed by ``replay_batch_size``
       examples drawn from the memory (uniformly, with replacement), and one SGD step of
       ``lr`` (``alpha``) on each of them in turn, one example per step; then
       ``theta <- theta_b + beta * (theta - theta_b)`` (within-batch Reptile);
    2. ``theta <- theta_0 + gamma * (theta - theta_0)`` (across-batch Reptile; the
       authors' commands use ``gamma = 1``, which keeps ``theta``);
    3. the example is offered to the reservoir memory.

    A batch of several incoming examples is processed one example after another.

    Args:
        lr: ``alpha``, the SGD step of each single-example update.
        beta: within-batch meta-learning rate.
        gamma: across-batch meta-learning rate.
        batches_per_example: ``s``.
        replay_batch_size: memories per batch (the paper's ``k - 1``).
        buffer_size: the reservoir memory.
    """

    capabilities = StreamCapabilities(single_example_steps=True)

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        lr: float = 0.1,
        beta: float = 0.01,
        gamma: float = 1.0,
        batches_per_example: int = 5,
        replay_batch_size: int = 10,
        buffer_size: int = 200,
        task: TaskKind = CLASSIFICATION,
    ):
        super().__init__(backbone, n_classes, input_shape, seed, lr, task, optimizer="sgd")
        self.beta, self.gamma = beta, gamma
        self.batches_per_example = batches_per_example
        self.replay_batch_size = replay_batch_size
        self.buffer = replay_buffer(buffer_size, input_shape, task)

    def begin_stream(self, lr: float | None, n_classes: int | None = None) -> None:
        super().begin_stream(lr, n_classes)
        self.buffer.clear()

    def observe(self, x, y, classes):
        self.train()
        weights = list(self.parameters())
        losses, correct = [], []
        for xi, yi in zip(x.split(1), y.split(1), strict=True):
            theta_0 = [w.detach().clone() for w in weights]
            for _ in range(self.batches_per_example):
                theta_b = [w.detach().clone() for w in weights]
                bx, by = xi, yi
                if len(self.buffer):
                    rx, ry = self.buffer.sample(self.replay_batch_size, self.generator)
                    bx, by = torch.cat([xi, rx]), torch.cat([yi, ry])
                for k in range(by.shape[0]):  # the current example first
                    out = self.in_play(self(bx[k : k + 1]), classes)
                    loss = self.task.loss(out, by[k : k + 1])
                    self._step(loss, "training")
                    if k == 0:
                        losses.append(loss.detach())
                        correct.append(self.task.score(out.detach(), by[:1]))
                with torch.no_grad():
                    for w, w_b in zip(weights, theta_b, strict=True):
                        w.copy_(w_b + self.beta * (w - w_b))
            if self.gamma != 1.0:
                with torch.no_grad():
                    for w, w_0 in zip(weights, theta_0, strict=True):
                        w.copy_(w_0 + self.gamma * (w - w_0))
            self.buffer.add(xi, yi, self.generator)
        loss = torch.stack(losses).mean()
        check_finite_loss(loss, "training")
        return loss.item(), torch.stack(correct).mean().item()
