"""What the LSTM meta-learner and the learned optimizer share: a learner (backbone and a
linear head) whose weights, flattened into one vector ``theta``, are updated in the inner
loop by a learned, coordinate-wise rule instead of SGD, and a meta-training step that
unrolls that inner loop on the support set and back-propagates a query loss through it.

The gradient preprocessing is Andrychowicz et al., "Learning to learn by gradient descent
by gradient descent", NeurIPS 2016, appendix A; both subclasses cite their own paper.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from metarun.algorithms.base import (
    BOTH_KINDS,
    BatchNormMode,
    Capabilities,
    Predictor,
    batch_norm_mode,
    buffer_copies,
    linear_head,
)
from metarun.data.episodes import Episode
from metarun.tasks import CLASSIFICATION, TaskKind

Params = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]
"""The update rule's memory between inner steps (hidden states, gates, moving averages),
one row per coordinate of ``theta``: ``(n, ...)``."""


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s log/sign encoding of values of any magnitude.

    ``x -> (log|x| / p, sign x)`` when ``|x| >= e^-p`` and ``(-1, e^p x)`` otherwise, so
    a network sees both the scale and the sign of tiny and huge gradients in a bounded
    range. Shapes: ``(...)`` -> ``(..., 2)``.
    """
    big = x.abs() >= math.exp(-p)
    log = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, -torch.ones_like(x))
    sign = torch.where(big, x.sign(), math.exp(p) * x)
    return torch.stack([log, sign], dim=-1)


class FlatParams:
    """Flattens a dict of tensors into one vector and back (views, differentiable).

    Args:
        params: the named tensors whose names, shapes and order are kept.
    """

    def __init__(self, params: Params):
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]

    def flatten(self, params: Params) -> torch.Tensor:
        """``(n,)``, ``n`` the total number of elements."""
        return torch.cat([params[name].reshape(-1) for name in self.names])

    def unflatten(self, theta: torch.Tensor) -> Params:
        chunks = torch.split(theta, self.numels)
        return {
            name: chunk.view(shape)
            for name, chunk, shape in zip(self.names, chunks, self.shapes, strict=True)
        }


class UnrolledLearner(nn.Module):
    """A learner adapted by a learned update rule (:meth:`update`), meta-trained through
    the unrolled inner loop.

    Meta-training (:meth:`meta_loss`): ``adaptation_steps`` updates on the support set from
    the initial weights, then the query loss (after the last step, or averaged over every
    step when ``loss_every_step``). With ``first_order`` the gradient and loss fed to the
    update rule are constants (no second derivatives, as both papers do). With
    ``truncation > 0`` the unroll is cut every that many steps (truncated BPTT): the
    weights and the rule's state are detached there, so each segment's losses reach the
    rule only through that segment.

    Args:
        backbone: feature extractor with an ``out_features`` attribute.
        ways: classes per episode (the head's outputs for classification).
        adaptation_steps: inner steps in meta-training.
        test_adaptation_steps: inner steps at evaluation.
        first_order: feed the gradient and loss to the rule as constants.
        bn_mode: see :class:`BatchNormMode`.
        task: the loss, metric and head size of the dataset's tasks (given by the runner).
        loss_every_step: meta-loss = mean of the query losses after every step.
        truncation: steps per truncated-BPTT segment; 0 back-propagates through all.
    """

    capabilities = Capabilities(
        task_kinds=BOTH_KINDS,
        adaptation_steps=True,
        fixed_ways=True,
        inner_loop_through_backbone=True,
    )
    stacks_tasks = False

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        adaptation_steps: int,
        test_adaptation_steps: int,
        first_order: bool,
        bn_mode: BatchNormMode | str,
        task: TaskKind = CLASSIFICATION,
        loss_every_step: bool = False,
        truncation: int = 0,
    ):
        super().__init__()
        if adaptation_steps < 1:
            raise ValueError(f"algo.adaptation_steps must be >= 1, got {adaptation_steps}")
        if truncation < 0:
            raise ValueError(f"algo.truncation must be >= 0 (0: no truncation), got {truncation}")
        head = linear_head(backbone, task.head_outputs(ways))
        self.model = nn.Sequential(backbone, head)
        self.ways = ways
        self.adaptation_steps = adaptation_steps
        self.test_adaptation_steps = test_adaptation_steps
        self.first_order = first_order
        self.bn_mode = BatchNormMode(bn_mode)
        self.task = task
        self.loss_every_step = loss_every_step
        self.truncation = truncation
        self.flat = FlatParams(dict(self.model.named_parameters()))

    def init_state(self, theta: torch.Tensor) -> State:
        """The rule's memory before the first step, for weights ``theta`` ``(n,)``."""
        raise NotImplementedError

    def update(
        self, theta: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: State, step: int
    ) -> tuple[torch.Tensor, State]:
        """One inner step: the new weights ``(n,)`` and memory, from the weights ``theta``
        ``(n,)``, the support loss's gradient ``grad`` ``(n,)`` and the loss (a scalar)."""
        raise NotImplementedError

    def initial_theta(self) -> torch.Tensor:
        """The learner's initial weights ``(n,)``, differentiable with respect to the model's
        parameters when those are meta-learned."""
        theta = self.flat.flatten(dict(self.model.named_parameters()))
        return theta if theta.requires_grad else theta.detach().requires_grad_()

    def run_model(self, theta: torch.Tensor, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        """The learner with weights ``theta`` on ``x`` ``(n_x, *input_shape)``."""
        return functional_call(self.model, (self.flat.unflatten(theta), buffers), (x,))

    def step(
        self,
        theta: torch.Tensor,
        state: State,
        x: torch.Tensor,
        y: torch.Tensor,
        buffers: Params,
        step: int,
        differentiable: bool,
    ) -> tuple[torch.Tensor, State]:
        """The support loss and its gradient at ``theta``, then one :meth:`update`."""
        loss = self.task.loss(self.run_model(theta, buffers, x), y)
        second_order = differentiable and not self.first_order
        (grad,) = torch.autograd.grad(loss, theta, create_graph=second_order)
        if not second_order:
            grad, loss = grad.detach(), loss.detach()
        if differentiable:
            return self.update(theta, grad, loss, state, step)
        with torch.no_grad():
            theta, state = self.update(theta, grad, loss, state, step)
        return theta.requires_grad_(), state

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ways(episode.ways)
        buffers = dict(self.model.named_buffers())
        theta = self.initial_theta()
        state = self.init_state(theta)
        losses = []
        for step in range(self.adaptation_steps):
            theta, state = self.step(
                theta, state, episode.support_x, episode.support_y, buffers, step, True
            )
            last = step == self.adaptation_steps - 1
            if self.loss_every_step or last:
                predictions = self.run_model(theta, buffers, episode.query_x)
                losses.append(self.task.loss(predictions, episode.query_y))
            if self.truncation and (step + 1) % self.truncation == 0 and not last:
                theta = theta.detach().requires_grad_()
                state = {name: s.detach() for name, s in state.items()}
        return torch.stack(losses).mean(), self.task.score(predictions, episode.query_y)

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """See :class:`MetaLearner`; ``steps`` overrides ``test_adaptation_steps`` (0 gives
        the initial weights)."""
        if self.task.outputs is None:
            self._check_ways(int(support_y.max()) + 1)
        steps = self.test_adaptation_steps if steps is None else steps
        buffers = buffer_copies(self.model)
        with torch.enable_grad(), batch_norm_mode(self.model, self.bn_mode):
            theta = self.initial_theta().detach().requires_grad_()
            state = self.init_state(theta)
            for step in range(steps):
                theta, state = self.step(theta, state, support_x, support_y, buffers, step, False)
        theta = theta.detach()

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self.model, self.bn_mode):
                return self.run_model(theta, buffers, query_x)

        return predict

    def _check_ways(self, ways: int) -> None:
        if self.task.outputs is None and ways != self.ways:
            raise ValueError(
                f"{type(self).__name__}'s head has {self.ways} outputs but the episode has "
                f"{ways} ways: train.ways and eval.ways must be equal for this algorithm."
            )
