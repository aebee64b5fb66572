"""La-MAML (Gupta, Yadav & Paull, NeurIPS 2020, "Look-ahead Meta Learning for Continual
Learning"), as its authors' MNIST code runs it (github.com/montrealrobotics/La-MAML,
``model/lamaml.py``; compared update by update in docs/LIFELONG.md)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from metarun.continual.methods.base import (
    ContinualLearner,
    StreamCapabilities,
    check_finite_loss,
    replay_buffer,
)
from metarun.tasks import CLASSIFICATION, TaskKind


class LaMAML(ContinualLearner):
    """La-MAML: online meta-learning on the stream itself, with a learnable learning rate
    per parameter (``alpha``) and a reservoir replay memory.

    For each incoming batch, ``glances`` times:

    1. shuffle the batch; draw a meta-batch: the batch plus ``replay_batch_size`` examples
       of the memory (drawn before this batch enters it);
    2. inner loop from the current weights ``theta``: one step per ``inner_batch_size``
       examples of the batch (one example per step, as the authors' code), ``theta' =
       theta' - relu(alpha) * grad``; on the first glance each example joins the memory
       after its step; after every inner step, the meta-batch loss at ``theta'``;
    3. the meta-loss is the mean of those losses (look-ahead at every step, not only the
       last); its gradients for ``theta`` and ``alpha`` are clipped, each to a global norm
       of ``grad_clip_norm``;
    4. ``alpha <- alpha - meta_lr * grad_alpha`` (``learn_lr``), then ``theta <- theta -
       relu(alpha) * grad_theta`` (the asynchronous update; with ``sync_update``, plain
       SGD at ``weight_lr`` instead: the paper's C-MAML and Sync variants).

    ``first_order`` treats the inner gradients as constants (the authors' MNIST runs).

    Args:
        fast_lr: initial value of every ``alpha`` (the authors' ``alpha_init``).
        meta_lr: SGD learning rate of ``alpha`` (``opt_lr``).
        glances: meta-updates per incoming batch.
        inner_batch_size: examples per inner step.
        buffer_size, replay_batch_size: the memory and the examples replayed per meta-batch.
        grad_clip_norm: the global-norm clip of each meta-gradient; ``None`` for none.
        learn_lr: meta-learn ``alpha`` (false: fixed step sizes, C-MAML).
        sync_update: update ``theta`` by SGD at ``weight_lr`` instead of ``relu(alpha)``.
        weight_lr: the SGD learning rate of ``theta`` with ``sync_update`` (``opt_wt``).
        first_order: drop the second-order terms of the inner steps.
    """

    capabilities = StreamCapabilities(inner_loop_through_backbone=True)

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        fast_lr: float = 0.15,
        meta_lr: float = 0.3,
        glances: int = 5,
        inner_batch_size: int = 1,
        buffer_size: int = 200,
        replay_batch_size: int = 10,
        grad_clip_norm: float | None = 2.0,
        learn_lr: bool = True,
        sync_update: bool = False,
        weight_lr: float = 0.1,
        first_order: bool = True,
        task: TaskKind = CLASSIFICATION,
    ):
        super().__init__(backbone, n_classes, input_shape, seed, task=task)
        self.weight_names = [n for n, _ in self.named_parameters()]
        self.alphas = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, fast_lr)) for p in self.parameters()]
        )
        self.lr = meta_lr  # the learning rate of the alphas' optimiser
        self.optimizer = self.make_optimizer()
        self.buffer = replay_buffer(buffer_size, input_shape, task)
        self.glances, self.inner_batch_size = glances, inner_batch_size
        self.replay_batch_size = replay_batch_size
        self.grad_clip_norm, self.learn_lr = grad_clip_norm, learn_lr
        self.sync_update, self.weight_lr = sync_update, weight_lr
        self.first_order = first_order

    def make_optimizer(self) -> torch.optim.Optimizer:
        if "alphas" not in self._modules:  # the base class's call, before the alphas exist
            return super().make_optimizer()
        return torch.optim.SGD(self.alphas.parameters(), lr=self.lr)

    def begin_stream(self, lr: float | None, n_classes: int | None = None) -> None:
        super().begin_stream(lr, n_classes)
        self.buffer.clear()

    def observe(self, x, y, classes):
        self.train()
        weights = [p for n, p in self.named_parameters() if n in self.weight_names]
        names = self.weight_names
        for glance in range(self.glances):
            order = torch.randperm(y.shape[0], generator=self.generator).to(y.device)
            xs, ys = x[order], y[order]
            if len(self.buffer):
                rx, ry = self.buffer.sample(self.replay_batch_size, self.generator)
                meta_x, meta_y = torch.cat([xs, rx]), torch.cat([ys, ry])
            else:
                meta_x, meta_y = xs, ys
            fast = list(weights)
            losses = []
            for cx, cy in zip(
                xs.split(self.inner_batch_size), ys.split(self.inner_batch_size), strict=True
            ):
                params = dict(zip(names, fast, strict=True))
                out = self.in_play(functional_call(self, params, (cx,)), classes)
                inner = self.task.loss(out, cy)
                grads = torch.autograd.grad(inner, fast, create_graph=not self.first_order)
                fast = [w - a.relu() * g for w, a, g in zip(fast, self.alphas, grads, strict=True)]
                if glance == 0:
                    self.buffer.add(cx.detach(), cy, self.generator)
                logits = self.in_play(
                    functional_call(self, dict(zip(names, fast, strict=True)), (meta_x,)), classes
                )
                losses.append(self.task.loss(logits, meta_y))
            meta_loss = torch.stack(losses).mean()
            check_finite_loss(meta_loss, "meta")
            grads = torch.autograd.grad(meta_loss, [*weights, *self.alphas])
            w_grads, a_grads = list(grads[: len(weights)]), list(grads[len(weights) :])
            if self.grad_clip_norm:
                for group in (w_grads, a_grads):
                    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in group]))
                    scale = (self.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
                    group[:] = [g * scale for g in group]
            if self.learn_lr:
                self.optimizer.zero_grad(set_to_none=True)
                for a, g in zip(self.alphas, a_grads, strict=True):
                    a.grad = g
                self.optimizer.step()
            with torch.no_grad():
                for w, a, g in zip(weights, self.alphas, w_grads, strict=True):
                    w -= (self.weight_lr if self.sync_update else a.relu()) * g
        n = y.shape[0]
        return meta_loss.item(), self.task.score(logits[:n], ys).item()
