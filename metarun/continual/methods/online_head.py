"""Learners whose continual phase trains only a linear head, online, on a representation
that stays fixed: the pretrained-representation baseline here, and the meta-learned
representations of OML and ANML (:mod:`metarun.continual.methods.oml`,
:mod:`metarun.continual.methods.anml`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.continual.methods.base import (
    ContinualLearner,
    MetaLog,
    StreamCapabilities,
    decayed,
    make_optimizer,
    pool_images,
    require_meta_training,
)
from metarun.data.episodes import ClassPool
from metarun.tasks import CLASSIFICATION, TaskKind


class OnlineHead(ContinualLearner):
    """The stream part shared by these learners: at the start of a stream the head is drawn
    afresh (its own initialisation: Kaiming-normal rows and zero biases for OML's and ANML's
    networks) and learns every example with ``stream_optimizer`` (Adam, as OML's and ANML's
    evaluation code, or SGD) at the continual-phase learning rate ``lr``; the rest of the
    network is fixed (evaluated with running batch-norm statistics, where it has any).
    ``stream_outputs``: the stream's loss is the cross-entropy over every output of the head
    (``all``, as OML's and ANML's evaluation code and their meta-training inner loops; a
    class's row is pushed up from its first example on) or over the classes seen so far
    (``seen``; the first class of a stream then learns nothing until a second arrives).
    Subclasses meta-train the representation (:meth:`pretrain`) and may change what the
    head sees (:meth:`embed`)."""

    capabilities = StreamCapabilities(needs_meta_training=True, frozen_embedding=True)

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        lr: float = 1e-3,
        meta_lr: float = 1e-3,
        stream_optimizer: str = "adam",
        stream_outputs: str = "all",
        task: TaskKind = CLASSIFICATION,
    ):
        if stream_outputs not in ("all", "seen"):
            raise ValueError(f"stream_outputs={stream_outputs!r}: use 'all' or 'seen'")
        super().__init__(backbone, n_classes, input_shape, seed, lr=meta_lr, task=task)
        self.stream_lr, self.stream_optimizer = lr, stream_optimizer
        self.stream_outputs = stream_outputs
        self.meta_lr = meta_lr
        self.streaming = False
        self.stream_rows: int | None = None

    def reset_head(self) -> None:
        """Draws the head afresh."""
        with torch.no_grad():
            self.head.reset_parameters()
            if hasattr(self.backbone, "init_linear"):
                self.backbone.init_linear(self.head)

    def begin_stream(self, lr: float | None, n_classes: int | None = None) -> None:
        if lr is not None:
            self.stream_lr = lr
        self.reset_head()
        self.streaming = True
        self.stream_rows = n_classes
        self.optimizer = self.make_optimizer()

    def stream_parameters(self) -> list[nn.Parameter]:
        """What the stream trains: with ``stream_outputs="seen"``, the head's first
        ``stream_rows`` rows (weight and bias), as parameters that share the head's memory;
        otherwise the whole head. Outputs outside the stream's classes then never get a
        gradient, so neither Adam nor SGD would move them; leaving them out of the optimiser
        only saves their cost (a 792-row head at N = 10)."""
        rows = self.stream_rows
        if self.stream_outputs == "all" or rows is None or rows >= self.head.out_features:
            return list(self.head.parameters())
        return [nn.Parameter(p.detach()[:rows]) for p in (self.head.weight, self.head.bias)]

    def make_optimizer(self) -> torch.optim.Optimizer:
        if getattr(self, "streaming", False):  # also restoring a checkpoint taken in the stream
            return make_optimizer(self.stream_optimizer, self.stream_parameters(), self.stream_lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def reset_learning_rates(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.stream_lr if self.streaming else self.lr

    def observe_embedded(self, z, y, classes, score=True):  # the loss needs the scores
        self.head.train()
        weight, bias = self.optimizer.param_groups[0]["params"]  # the rows the stream trains
        logits = F.linear(z.float(), weight, bias)
        if self.stream_outputs == "seen":
            logits = self.in_play(logits, classes)
        loss = self.task.loss(logits, y)
        self._step(loss, "training")
        return loss.item(), self.task.score(logits.detach(), y).item()

    def observe(self, x, y, classes):
        return self.observe_embedded(self.embed(x), y, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).float())

    def get_extra_state(self) -> dict:
        return {
            **super().get_extra_state(),
            "streaming": self.streaming,
            "stream_rows": self.stream_rows,
        }

    def set_extra_state(self, state: dict) -> None:
        self.streaming = state.get("streaming", False)
        self.stream_rows = state.get("stream_rows")
        super().set_extra_state(state)


class Pretrained(OnlineHead):
    """A pretrained representation with an online head (the baseline of OML's paper): the
    backbone and a head over the meta-training classes are trained by plain classification
    (cross-entropy on batches of ``batch_size`` images drawn uniformly from all
    meta-training images, Adam at ``meta_lr``, halved every ``lr_decay_every`` steps); in
    the stream the backbone is frozen and a fresh head learns online.

    Args:
        lr: the continual-phase learning rate of the head.
        meta_lr, meta_iterations, batch_size, lr_decay_every: the pre-training.
        meta_max_minutes: a time budget for the pre-training.
        stream_optimizer: ``adam`` or ``sgd`` for the head in the stream.
        stream_outputs: ``all`` or ``seen`` (:class:`OnlineHead`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        lr: float = 1e-3,
        meta_lr: float = 1e-3,
        meta_iterations: int = 6000,
        batch_size: int = 256,
        lr_decay_every: int = 2000,
        meta_max_minutes: float | None = None,
        stream_optimizer: str = "adam",
        stream_outputs: str = "all",
        task: TaskKind = CLASSIFICATION,
    ):
        super().__init__(
            backbone, n_classes, input_shape, seed, lr, meta_lr, stream_optimizer,
            stream_outputs, task,
        )  # fmt: skip
        self.meta_iterations, self.meta_max_minutes = meta_iterations, meta_max_minutes
        self.batch_size, self.lr_decay_every = batch_size, lr_decay_every

    def pretrain(self, pool: ClassPool | None, iteration: int, log: MetaLog) -> int:
        require_meta_training(pool, "the pretrained baseline")
        if pool.n_classes > self.head.out_features:
            raise ValueError(
                f"{pool.n_classes} pre-training classes do not fit the head's "
                f"{self.head.out_features} outputs"
            )
        labels_of = torch.repeat_interleave(torch.arange(pool.n_classes), pool.counts)
        items_of = torch.cat(
            [pool.class_items[c][: int(pool.counts[c])] for c in range(pool.n_classes)]
        )
        self.train()
        for it in range(iteration, self.meta_iterations):
            for group in self.optimizer.param_groups:
                group["lr"] = decayed(self.lr, it, self.lr_decay_every)
            pick = torch.randint(items_of.numel(), (self.batch_size,), generator=self.generator)
            x = pool_images(pool, items_of[pick], self)
            y = labels_of[pick].to(x.device)
            with self.autocast():
                logits = self(x).float()
                loss = F.cross_entropy(logits, y)
            self._step(loss, "pre-training")
            acc = (logits.argmax(1) == y).float().mean().item()
            if log(it + 1, loss.item(), acc):
                return it + 1
        return self.meta_iterations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.streaming:
            return super().forward(x)
        return self.head(self.backbone(x))  # pre-training: batch statistics, gradients
