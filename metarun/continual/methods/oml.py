"""OML (Javed & White, NeurIPS 2019, "Meta-Learning Representations for Continual
Learning"), as the authors' code after its July 2020 fix runs it
(github.com/khurramjaved96/mrcl, ``oml_omniglot.py``, ``model/meta_learner.py``;
compared step by step in docs/LIFELONG.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.continual.methods.base import (
    MetaLog,
    StreamCapabilities,
    draw_items,
    pool_images,
    require_meta_training,
)
from metarun.continual.methods.online_head import OnlineHead
from metarun.continual.scenarios import SineFunctions
from metarun.data.episodes import ClassPool
from metarun.tasks import CLASSIFICATION, TaskKind


class OML(OnlineHead):
    """Online-aware Meta-Learning: the backbone is a representation (RLN) meta-learned so
    that a linear head (PLN) learns a stream online, one example at a time, without
    interfering with what it learned before; in the stream the backbone is frozen and a
    fresh head learns (Adam at ``lr``, as the authors' evaluation).

    A meta-training step (classification), as the authors' code:

    1. draw ``trajectory_classes`` classes from the second half of the meta-training
       classes (the trajectory classes) and draw their head rows afresh (Kaiming-normal,
       biases kept);
    2. inner loop: ``trajectory_shots`` drawings of each class, class after class, one SGD
       step of ``fast_lr`` per image on the head only (the representation of each image
       computed once);
    3. meta-loss: the cross-entropy, over all head outputs, of the adapted head on
       ``remember_size`` images drawn from the first half of the classes (whose rows are
       never reset: "classes learned before") and on ``query_shots`` other drawings of each
       trajectory class; its gradient reaches the representation and the head's initial
       weights through every inner step (second order unless ``first_order``); Adam at
       ``meta_lr`` on everything.

    Head rows are class-indexed, so the head has at least as many outputs as there are
    meta-training classes (the scenario sizes it).

    On a regression stream (``scenario=sinusoid_stream``) the meta-training set holds
    functions (:class:`metarun.continual.scenarios.SineFunctions`): a trajectory is
    ``trajectory_classes`` functions with the ids ``0, 1, ...``, ``trajectory_shots`` points
    of each, learned function after function in SGD steps of the stream's batch size, and
    ``query_shots`` other points per function; the loss is the MSE, on trajectory and query
    points, and the head (one output shared by all functions) is not reset.

    Args:
        lr: the continual-phase learning rate of the head.
        fast_lr: SGD step of the head in the inner loop.
        meta_lr: Adam learning rate of the meta-update.
        meta_iterations: meta-training steps.
        trajectory_classes, trajectory_shots, query_shots: one step's classes, their
            inner-loop drawings and their meta-loss drawings.
        remember_size: meta-loss images of other classes.
        first_order: drop the second-order terms of the inner steps.
        meta_max_minutes: a time budget for meta-training.
        stream_optimizer: ``adam`` (the authors' evaluation) or ``sgd`` for the head.
        stream_outputs: ``all`` (the authors' evaluation: the stream's loss is the
            cross-entropy over every output of the head, as in meta-training) or ``seen``
            (over the classes seen so far).
    """

    capabilities = StreamCapabilities(needs_meta_training=True, frozen_embedding=True)

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        lr: float = 1e-3,
        fast_lr: float = 0.03,
        meta_lr: float = 1e-4,
        meta_iterations: int = 20000,
        trajectory_classes: int = 3,
        trajectory_shots: int = 5,
        query_shots: int = 5,
        remember_size: int = 15,
        first_order: bool = False,
        meta_max_minutes: float | None = None,
        stream_optimizer: str = "adam",
        stream_outputs: str = "all",
        task: TaskKind = CLASSIFICATION,
    ):
        super().__init__(
            backbone, n_classes, input_shape, seed, lr, meta_lr, stream_optimizer,
            stream_outputs, task,
        )  # fmt: skip
        self.fast_lr, self.first_order = fast_lr, first_order
        self.meta_iterations, self.meta_max_minutes = meta_iterations, meta_max_minutes
        self.shape = (trajectory_classes, trajectory_shots, query_shots)
        self.remember_size = remember_size

    def _redraw_rows(self, rows: torch.Tensor) -> None:
        """Draws the head's weight rows ``rows`` afresh (Kaiming-normal), biases kept."""
        with torch.no_grad():
            fresh = torch.empty(rows.numel(), self.head.in_features, device=rows.device)
            nn.init.kaiming_normal_(fresh, nonlinearity="relu")
            self.head.weight[rows] = fresh.to(self.head.weight.dtype)

    def _classification_step(self, pool: ClassPool) -> tuple[torch.Tensor, float]:
        ways, shots, queries = self.shape
        half = pool.n_classes // 2
        if pool.n_classes > self.head.out_features or half < ways:
            raise ValueError(
                f"OML needs a head row per meta-training class ({pool.n_classes}; the head "
                f"has {self.head.out_features}) and at least {2 * ways} classes"
            )
        g = self.generator
        classes = half + torch.randperm(pool.n_classes - half, generator=g)[:ways]
        items = draw_items(pool, classes, shots + queries, g)  # (ways, shots + queries)
        device = self.head.weight.device
        self._redraw_rows(classes.to(device))
        traj = pool_images(pool, items[:, :shots], self)
        traj_y = classes.repeat_interleave(shots).to(device)
        remember = torch.randint(half, (self.remember_size,), generator=g)
        remember_items = torch.stack(
            [
                pool.class_items[c][torch.randint(int(pool.counts[c]), (), generator=g)]
                for c in remember
            ]
        )
        meta_x = torch.cat(
            [pool_images(pool, remember_items, self), pool_images(pool, items[:, shots:], self)]
        )
        meta_y = torch.cat([remember, classes.repeat_interleave(queries)]).to(device)
        feats = self.backbone(traj)
        w, b = self.head.weight, self.head.bias
        for k in range(feats.shape[0]):  # one image per step, class after class
            loss = F.cross_entropy(F.linear(feats[k : k + 1], w, b), traj_y[k : k + 1])
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=not self.first_order)
            w, b = w - self.fast_lr * gw, b - self.fast_lr * gb
        logits = F.linear(self.backbone(meta_x), w, b)
        meta_loss = F.cross_entropy(logits, meta_y)
        acc = (logits[-ways * queries :].argmax(1) == meta_y[-ways * queries :]).float().mean()
        return meta_loss, acc.item()

    def _function_step(self, pool: SineFunctions) -> tuple[torch.Tensor, float]:
        ways, shots, queries = self.shape
        device = self.head.weight.device
        x, y, step = (t.to(device) for t in pool.trajectory(ways, shots, queries, self.generator))
        feats = self.backbone(x)
        w, b = self.head.weight, self.head.bias
        for s in range(int(step.max()) + 1):  # in trajectory order: function after function
            k = step == s
            loss = self.task.loss(F.linear(feats[k], w, b), y[k])
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=not self.first_order)
            w, b = w - self.fast_lr * gw, b - self.fast_lr * gb
        predictions = F.linear(feats, w, b)
        query = step < 0
        return self.task.loss(predictions, y), self.task.score(predictions[query], y[query]).item()

    def pretrain(self, pool: ClassPool | SineFunctions | None, iteration: int, log: MetaLog) -> int:
        require_meta_training(pool, "OML")
        self.train()
        for it in range(iteration, self.meta_iterations):
            with self.autocast():
                if isinstance(pool, SineFunctions):
                    meta_loss, metric = self._function_step(pool)
                else:
                    meta_loss, metric = self._classification_step(pool)
            self._step(meta_loss, "meta-training")
            if log(it + 1, meta_loss.item(), metric):
                return it + 1
        return self.meta_iterations

    def reset_head(self) -> None:
        if self.task.outputs is not None:  # regression: the shared output is kept
            return
        super().reset_head()
