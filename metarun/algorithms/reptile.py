"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms",
arXiv:1803.02999, 2018).

Per task, the inner loop trains a copy of the weights with ``adaptation_steps`` steps of
SGD or Adam on minibatches of the support set, giving adapted weights ``w``. The outer
update moves the initialisation ``theta`` toward them: ``theta + eps * mean_i(w_i - theta)``
over the meta-batch.

How the runner applies it: the outer update is not the gradient of a loss, so
:meth:`Reptile.meta_loss` returns a surrogate whose gradient with respect to ``theta`` is
``theta - w`` (the "Reptile gradient") and whose value is the query loss of the adapted
weights (what gets logged and checked for NaN). The runner divides each task's surrogate by
the meta-batch size and calls ``backward()``, so ``theta.grad = mean_i(theta - w_i)``, and its
optimiser then steps: plain SGD with learning rate ``eps`` is exactly the interpolation
above (the batched version; ``meta_batch_size=1`` is the serial version), and Adam on the
Reptile gradient is the variant the paper also describes. Nothing in the loop is specific
to Reptile.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn
from torch.func import functional_call

from metarun.algorithms.base import (
    BOTH_KINDS,
    BatchNormMode,
    Capabilities,
)
from metarun.algorithms.maml import MAML, Params
from metarun.data.episodes import Episode
from metarun.tasks import CLASSIFICATION, TaskKind


class InnerOptimizer(str, Enum):
    sgd = "sgd"
    adam = "adam"


class Reptile(MAML):
    """Reptile on ``backbone`` followed by a linear head.

    Args:
        backbone: feature extractor with an ``out_features`` attribute.
        ways: classes per episode (the head's outputs for classification).
        fast_lr: inner learning rate (SGD step or Adam's learning rate).
        adaptation_steps: inner steps per task in meta-training.
        test_adaptation_steps: inner steps at evaluation.
        inner_optimizer: ``sgd``, or ``adam`` (the paper's choice for few-shot
            classification, with ``beta1 = 0``; its moments restart with every task).
        inner_batch_size: support examples per inner step, drawn without replacement and
            cycled; ``None`` uses the whole support set each step.
        bn_mode: ``transductive`` (batch statistics of the query set, the paper's
            transductive setting) or ``running``; see :class:`BatchNormMode`.
        task: the loss, metric and head size of the dataset's tasks (given by the runner).
    """

    capabilities = Capabilities(task_kinds=BOTH_KINDS, adaptation_steps=True, fixed_ways=True)

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        fast_lr: float,
        adaptation_steps: int,
        test_adaptation_steps: int,
        inner_optimizer: InnerOptimizer | str = InnerOptimizer.sgd,
        inner_batch_size: int | None = None,
        bn_mode: BatchNormMode | str = BatchNormMode.transductive,
        task: TaskKind = CLASSIFICATION,
    ):
        super().__init__(
            backbone,
            ways,
            fast_lr,
            adaptation_steps,
            test_adaptation_steps,
            first_order=True,
            bn_mode=bn_mode,
            task=task,
        )
        self.inner_optimizer = InnerOptimizer(inner_optimizer)
        if inner_batch_size is not None and inner_batch_size < 1:
            raise ValueError(f"inner_batch_size must be >= 1 or null, got {inner_batch_size}")
        self.inner_batch_size = inner_batch_size
        self.adam_betas, self.adam_eps = (0.0, 0.999), 1e-8

    def adapted_params(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        create_graph: bool,
        buffers: Params,
    ) -> Params:
        """Adapted weights after ``steps`` inner steps; detached from the initialisation
        (Reptile never differentiates through the inner loop; ``create_graph`` is unused)."""
        params = {n: p.detach().requires_grad_() for n, p in self.model.named_parameters()}
        moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
        batches = self._minibatches(x.shape[0], steps, x.device)
        for step, idx in enumerate(batches):
            xb, yb = (x, y) if idx is None else (x[idx], y[idx])
            loss = self.task.loss(functional_call(self.model, (params, buffers), (xb,)), yb)
            grads = torch.autograd.grad(loss, tuple(params.values()))
            with torch.no_grad():
                if self.inner_optimizer == InnerOptimizer.sgd:
                    new = self.inner_update(params, grads, step)
                else:
                    new = self._adam_step(params, grads, moments, step + 1)
            params = {n: p.requires_grad_() for n, p in new.items()}
        return {n: p.detach() for n, p in params.items()}

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """A surrogate whose gradient is ``theta - w`` and whose value is the query loss of
        the adapted weights ``w`` (see the module docstring); and the query metric."""
        self._check_ways(episode.ways)
        buffers = dict(self.model.named_buffers())
        adapted = self.adapted_params(
            episode.support_x, episode.support_y, self.adaptation_steps, False, buffers
        )
        with torch.no_grad():
            predictions = functional_call(self.model, (adapted, buffers), (episode.query_x,))
            query_loss = self.task.loss(predictions, episode.query_y)
            metric = self.task.score(predictions, episode.query_y)
        distance = sum(
            0.5 * (p - adapted[n]).pow(2).sum() for n, p in self.model.named_parameters()
        )
        return distance - distance.detach() + query_loss, metric

    def _minibatches(self, n: int, steps: int, device: torch.device) -> list[torch.Tensor | None]:
        """Index tensors of the inner steps: the support set shuffled and cycled in chunks of
        ``inner_batch_size`` (``None`` entries: the whole set)."""
        if self.inner_batch_size is None or self.inner_batch_size >= n:
            return [None] * steps
        batches: list[torch.Tensor | None] = []
        order = torch.empty(0, dtype=torch.long)
        while len(batches) < steps:
            if order.numel() < self.inner_batch_size:
                order = torch.cat([order, torch.randperm(n)])
            batches.append(order[: self.inner_batch_size].to(device))
            order = order[self.inner_batch_size :]
        return batches

    def _adam_step(
        self,
        params: Params,
        grads: tuple[torch.Tensor, ...],
        moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
        t: int,
    ) -> Params:
        """One Adam step (Kingma & Ba 2015) with bias correction; updates ``moments``."""
        (beta1, beta2), new = self.adam_betas, {}
        for (name, p), g in zip(params.items(), grads, strict=True):
            m, v = moments[name]
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            moments[name] = (m, v)
            m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
            new[name] = p - self.fast_lr * m_hat / (v_hat.sqrt() + self.adam_eps)
        return new
