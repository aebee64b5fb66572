"""The surface every continual method shares, and the helpers they use.

A method is a backbone (``model=``) with a linear head over the scenario's classes (one
output for a regression stream). The continual recipe (:mod:`metarun.recipes.continual`)
calls, in order:

- :meth:`ContinualLearner.pretrain` once, for methods with a meta-training phase;
- :meth:`ContinualLearner.observe` on every training batch of the current task;
- :meth:`ContinualLearner.end_task` after the last batch of a task;
- ``forward`` to score every task after every task.

The meta-continual benchmark (:mod:`metarun.continual.meta_test`) runs many short streams
after one meta-training: before each it restores the meta-trained state and calls
:meth:`ContinualLearner.begin_stream`. A method whose stream learning touches only a head
on features that stay fixed declares ``frozen_embedding``: the benchmark then computes
:meth:`ContinualLearner.embed` once per image and streams the features through
:meth:`ContinualLearner.observe_embedded` and :meth:`ContinualLearner.predict_embedded`.

Outputs not in play (see :mod:`metarun.continual.scenarios`) are masked to ``-inf`` before
the softmax, in training and in scoring. The scenario's ``task``
(:class:`metarun.tasks.TaskKind`) gives the loss and the metric every method reports:
cross-entropy and accuracy, or MSE and MSE for a regression stream (no masking). Each
method owns its optimiser and a seeded ``torch.Generator``; both are part of its
``state_dict`` (``get_extra_state``), so a resumed stream continues exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from metarun.continual.buffer import ReservoirBuffer
from metarun.data.episodes import ClassPool
from metarun.errors import NonFiniteError
from metarun.tasks import CLASSIFICATION, TaskKind

Sampler = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""``sample(n)`` -> ``(x (n, C, H, W), y (n,))``: training examples of the task just learned."""

MetaLog = Callable[[int, float, float], bool]
"""``log(iteration, loss, metric) -> stop``: called after each meta-training step; the
recipe checkpoints there and answers whether to stop (a signal or the time budget)."""


def replay_buffer(size: int, input_shape: tuple[int, ...], task: TaskKind) -> ReservoirBuffer:
    """A reservoir that stores labels (classification) or ``(outputs,)`` float targets."""
    if task.outputs is None:
        return ReservoirBuffer(size, input_shape)
    return ReservoirBuffer(size, input_shape, (task.outputs,), torch.float32)


def masked_logits(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(n, n_classes)`` logits with every output outside ``classes`` ``(k,)`` set to -inf."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[classes.to(logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def check_finite_loss(loss: torch.Tensor, what: str) -> None:
    """Refuses a NaN or infinite loss before any update is applied."""
    if not math.isfinite(loss.item()):
        raise NonFiniteError(
            f"the {what} loss is {loss.item()}; no update was applied. Lower the learning "
            f"rate (algo.lr, algo.fast_lr or algo.meta_lr), then continue from the last "
            f"checkpoint with `metarun resume=RUN algo.lr=...` or start again."
        )


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """``adam`` or ``sgd`` (plain, no momentum) over ``params`` at ``lr``. Adam runs as one
    fused kernel per step where torch has it (CPU from torch 2.4, CUDA): the same update up
    to rounding, and a stream takes one step per example, so its cost is the optimiser's
    (docs/LIFELONG.md: about 3 times faster on a 792 x 2304 head)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=_fusable(params) or None)
    raise ValueError(f"algo.optimizer={name!r}: choose adam or sgd")


def _fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused Adam for ``params`` (floating point, on CPU or CUDA)."""
    cpu_ok = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    return bool(params) and all(
        p.dtype.is_floating_point
        and (p.device.type == "cuda" or (p.device.type == "cpu" and cpu_ok))
        for p in params
    )


def require_meta_training(pool: object, method: str) -> None:
    """Refuses to meta-train without meta-training data (the checks refuse such a config
    earlier; this guards direct Python use)."""
    if pool is None:
        raise ValueError(
            f"{method} meta-trains on classes (or functions) held out of the stream, and this "
            f"scenario has none: use scenario=omniglot_continual or omniglot_meta_continual "
            f"(or sinusoid_stream with scenario.meta_functions > 0)."
        )


def pool_images(
    pool: ClassPool,
    items: torch.Tensor,
    like: nn.Module,
    distort_with: torch.Generator | None = None,
) -> torch.Tensor:
    """The pool's images ``items`` (any shape of indices, flattened) as floats in [0, 1] on
    ``like``'s device, in its memory format (NHWC when its convolutions are); with
    ``distort_with``, each image randomly distorted (:func:`metarun.data.augment.distort`,
    the distortions drawn from that generator)."""
    x = pool.images[items.flatten()].to(next(like.parameters()).device)
    if distort_with is None:
        x = x.float().div_(255)
    else:
        from metarun.data.augment import distort

        x = distort(x, distort_with)
    conv = next((p for p in like.parameters() if p.dim() == 4), None)
    if x.dim() == 4 and conv is not None and conv.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def draw_items(
    pool: ClassPool, classes: torch.Tensor, per_class: int, generator: torch.Generator
) -> torch.Tensor:
    """``(len(classes), per_class)`` pool image indices, a draw without replacement within
    each class."""
    picked = []
    for c in classes.tolist():
        items = pool.class_items[c][: int(pool.counts[c])]
        if items.numel() < per_class:
            raise ValueError(
                f"meta-training class {pool.class_names[c]} has {items.numel()} images, "
                f"fewer than the {per_class} a meta-training step takes from it"
            )
        picked.append(items[torch.randperm(items.numel(), generator=generator)[:per_class]])
    return torch.stack(picked)


def draw_classes(
    pool: ClassPool, ways: int, grouped: bool, generator: torch.Generator
) -> torch.Tensor:
    """``ways`` distinct meta-training classes of ``pool``: uniformly at random, or
    (``grouped``) whole groups of the pool (Omniglot: an alphabet, each rotation its own) in
    random order, each group's classes shuffled, until ``ways`` are taken; so most of a
    class's rivals in the episode are classes of its own group."""
    if not grouped:
        return torch.randperm(pool.n_classes, generator=generator)[:ways]
    if pool.groups is None:
        raise ValueError(
            "algo.episode_classes=grouped draws episodes group by group, and this "
            "meta-training pool does not record the group (alphabet) of its classes. Use "
            "algo.episode_classes=random."
        )
    names = sorted(pool.group_classes)
    picked, taken = [], 0
    for g in torch.randperm(len(names), generator=generator).tolist():
        members = torch.tensor(pool.group_classes[names[g]])
        picked.append(members[torch.randperm(members.numel(), generator=generator)])
        taken += members.numel()
        if taken >= ways:
            break
    return torch.cat(picked)[:ways]


def decayed(lr: float, iteration: int, every: int, gamma: float = 0.5) -> float:
    """``lr`` times ``gamma`` every ``every`` iterations (0: never), as a function of the
    iteration, so a resumed meta-training continues the schedule."""
    return lr * gamma ** (iteration // every) if every else lr


@dataclass(frozen=True)
class StreamCapabilities:
    """What a continual method supports, declared on its class and held against the config
    before any data is loaded (:func:`metarun.checks.check_continual`).

    Attributes:
        task_kinds: the :class:`~metarun.tasks.TaskKind` names of the streams it learns.
        needs_meta_training: it meta-trains on data held out of the stream (the scenario
            must provide it).
        inner_loop_through_backbone: it differentiates through gradient steps taken in the
            backbone, so with ``algo.first_order=false`` the backbone needs a double backward.
        frozen_embedding: in the stream only a head learns, on features of a part that
            stays fixed (:meth:`ContinualLearner.embed`); the meta-continual benchmark then
            embeds each image once.
        stream_lr: it has a learning rate for the continual phase (``lr``), which the
            meta-continual benchmark selects on held-out streams; ``False`` for learners
            with nothing to tune (class means, exact Bayesian updates).
        single_example_steps: it takes gradient steps on single examples, so the model must
            not use batch normalisation.
    """

    task_kinds: tuple[str, ...] = ("classification", "regression")
    needs_meta_training: bool = False
    inner_loop_through_backbone: bool = False
    frozen_embedding: bool = False
    stream_lr: bool = True
    single_example_steps: bool = False


class ContinualLearner(nn.Module):
    """Backbone + linear head; the base of every method (naive fine-tuning on its own).

    Args:
        backbone: maps ``(n, C, H, W)`` to ``(n, out_features)``.
        n_classes: outputs of the head (classification).
        input_shape: ``(C, H, W)`` of one example.
        seed: seeds the method's generator (replay sampling, Fisher samples, ...).
        lr: learning rate of the optimiser.
        task: the scenario's loss and metric (``CLASSIFICATION`` or ``REGRESSION``, whose
            head has ``task.outputs`` outputs).
        optimizer: ``adam`` or ``sgd`` (plain SGD, as GEM's and MER's baselines).
    """

    capabilities = StreamCapabilities()

    cumulative = False  # joint training draws every batch from all tasks seen so far
    meta_iterations = 0  # meta-training steps before the stream
    meta_max_minutes: float | None = None  # a time budget for them (the recipe keeps it)

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        lr: float = 1e-3,
        task: TaskKind = CLASSIFICATION,
        optimizer: str = "adam",
    ):
        super().__init__()
        self.backbone = backbone
        self.task = task
        self.head = nn.Linear(backbone.out_features, task.head_outputs(n_classes))
        if hasattr(backbone, "init_linear"):  # the backbone's own initialisation (model.init)
            backbone.init_linear(self.head)
        self.generator = torch.Generator().manual_seed(seed)
        self.lr = lr
        self.optimizer_name = optimizer
        self.optimizer = self.make_optimizer()
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_name, self.parameters(), self.lr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` -> logits ``(n, n_classes)`` (regression: ``(n, outputs)``)."""
        return self.head(self.backbone(x))

    def in_play(self, outputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits with the outputs outside ``classes`` masked (classification); regression
        predictions unchanged."""
        return masked_logits(outputs, classes) if self.task.outputs is None else outputs

    def training_tasks(self, task: int) -> list[int]:
        """The tasks whose training data the batches of ``task`` are drawn from."""
        return list(range(task + 1)) if self.cumulative else [task]

    def pretrain(self, pool: ClassPool | None, iteration: int, log: MetaLog) -> int:
        """Meta-training before the stream, resumable from ``iteration``; returns the
        number of iterations done. Nothing to do for methods without one.

        Each step's forward pass runs under ``self.autocast()`` (the run's mixed precision,
        set by the recipe), entered and left once per step: inside one autocast region torch
        keeps the low-precision copies of the weights it cast first, so a region spanning
        several optimiser steps would keep computing with the first step's weights."""
        return 0

    def begin_stream(self, lr: float | None, n_classes: int | None = None) -> None:
        """Starts a fresh stream of the meta-continual benchmark (the recipe has restored
        the state after meta-training): the continual phase learns at ``lr`` (``None``:
        the configured one) with a fresh optimiser. ``n_classes``: the stream's labels are
        below it (``None``: any output may be in play); a learner may train only those
        outputs."""
        if lr is not None:
            self.lr = lr
        self.optimizer = self.make_optimizer()

    def loss(self, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.task.loss(self.in_play(self(x), classes), y)

    def observe(
        self, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor
    ) -> tuple[float | None, float]:
        """One update on a training batch ``x (n, C, H, W)``, ``y (n,)`` (regression:
        ``(n, outputs)``) with the outputs ``classes`` in play; returns ``(loss, metric)``
        on the batch (the metric is accuracy, or MSE for regression; the loss is ``None``
        for a learner that minimises none in the stream)."""
        self.train()
        logits = self.in_play(self(x), classes)
        loss = self.task.loss(logits, y) + self.penalty()
        self._step(loss, "training")
        return loss.item(), self.task.score(logits, y).item()

    # --- frozen-embedding methods (capabilities.frozen_embedding) ---------------------

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed features the stream learns on, ``(n, d)``."""
        self.eval()
        return self.backbone(x)

    def observe_embedded(
        self, z: torch.Tensor, y: torch.Tensor, classes: torch.Tensor, score: bool = True
    ) -> tuple[float | None, float]:
        """:meth:`observe` on features from :meth:`embed`. With ``score=False`` the caller
        has no use for the metric (the meta-continual benchmark scores after the stream):
        a learner that computes its scores only for it may skip them and return NaN."""
        raise NotImplementedError(f"{type(self).__name__} does not learn on fixed features")

    def predict_embedded(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, n_classes)`` from features ``(n, d)``."""
        return self.head(z)

    # --------------------------------------------------------------------------------------

    def penalty(self) -> torch.Tensor | float:
        """A regulariser added to the training loss (EWC); 0 for the others."""
        return 0.0

    def _step(self, loss: torch.Tensor, what: str) -> None:
        check_finite_loss(loss, what)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def end_task(self, sample: Sampler, classes: torch.Tensor) -> None:
        """Called after the last batch of a task, with a sampler of its training data."""

    def reset_learning_rates(self) -> None:
        """Puts the configured learning rate (``lr``) back into the optimiser after a
        checkpoint's state was loaded (a resumed run may have lowered it)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state(), "optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.optimizer = self.make_optimizer()  # the optimiser the state was saved from
        self.optimizer.load_state_dict(state["optimizer"])
