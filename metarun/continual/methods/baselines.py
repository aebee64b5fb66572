"""The baselines every stream is compared with: naive fine-tuning (the lower bound), joint
training (the upper bound), experience replay and elastic weight consolidation."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from metarun.continual.methods.base import (
    ContinualLearner,
    Sampler,
    masked_logits,
    replay_buffer,
)
from metarun.tasks import CLASSIFICATION, TaskKind


class Naive(ContinualLearner):
    """Fine-tuning on each task in turn: the lower bound, which forgets."""


class Joint(ContinualLearner):
    """Joint training: each task's batches are drawn from the union of all tasks so far,
    so after the last task the model has trained on everything (the upper bound). In the
    meta-continual benchmark, where each class is a task, it sees the same images in a
    shuffled (i.i.d.) order instead (:mod:`metarun.continual.meta_test`)."""

    cumulative = True


class ExperienceReplay(ContinualLearner):
    """Experience replay with a reservoir buffer (Chaudhry et al. 2019, "On Tiny Episodic
    Memories in Continual Learning"): every batch is trained together with a batch drawn
    from the buffer, then offered to the buffer. With ``optimizer=sgd`` and a stream of
    single examples this is MER's "ER" baseline (Riemer et al. 2019, algorithm 4).

    Args:
        buffer_size: examples kept (the reservoir).
        replay_batch_size: replayed examples per step.
    """

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        lr: float = 1e-3,
        buffer_size: int = 500,
        replay_batch_size: int = 128,
        task: TaskKind = CLASSIFICATION,
        optimizer: str = "adam",
    ):
        super().__init__(backbone, n_classes, input_shape, seed, lr, task, optimizer)
        self.buffer = replay_buffer(buffer_size, input_shape, task)
        self.replay_batch_size = replay_batch_size

    def begin_stream(self, lr: float | None, n_classes: int | None = None) -> None:
        super().begin_stream(lr, n_classes)
        self.buffer.clear()

    def observe(self, x, y, classes):
        self.train()
        n = y.shape[0]
        if len(self.buffer):
            rx, ry = self.buffer.sample(self.replay_batch_size, self.generator)
            inputs, labels = torch.cat([x, rx]), torch.cat([y, ry])
        else:
            inputs, labels = x, y
        logits = self.in_play(self(inputs), classes)
        loss = self.task.loss(logits, labels)
        self._step(loss, "training")
        self.buffer.add(x, y, self.generator)
        return loss.item(), self.task.score(logits[:n], y).item()


class EWC(ContinualLearner):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): after each task, the diagonal
    Fisher information ``F_t`` of the parameters at their values ``theta_t``; later tasks
    pay ``ewc_lambda / 2 * sum_t sum_i F_t,i (theta_i - theta_t,i)^2``.

    The sum over tasks is kept as three running sums, exactly: with ``A = sum_t F_t`` and
    ``mu = sum_t F_t theta_t / A``, the penalty is ``ewc_lambda / 2 * (sum_i A_i (theta_i -
    mu_i)^2 + K)``, ``K = sum_t F_t theta_t^2 - A mu^2`` a constant; so the cost of a step
    does not grow with the number of tasks (a stream of 600 one-class tasks included).

    The Fisher is the mean squared gradient of the log-likelihood of the model's own
    predicted label, one example at a time (``torch.func.vmap``), over ``fisher_samples``
    training examples of the task, with the task's outputs in play. For regression the
    model is read as a Gaussian of unit variance around its prediction ``f(x)``, whose
    Fisher is the expected squared gradient of the log-likelihood over targets drawn from
    it: the squared gradient of ``f(x)`` itself.

    Args:
        ewc_lambda: strength of the penalty.
        fisher_samples: examples used to estimate each task's Fisher.
    """

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        lr: float = 1e-3,
        ewc_lambda: float = 100.0,
        fisher_samples: int = 500,
        task: TaskKind = CLASSIFICATION,
        optimizer: str = "adam",
    ):
        super().__init__(backbone, n_classes, input_shape, seed, lr, task, optimizer)
        self.ewc_lambda, self.fisher_samples = ewc_lambda, fisher_samples
        self.fisher_sum: dict[str, torch.Tensor] = {}  # A
        self.anchor: dict[str, torch.Tensor] = {}  # mu
        self.constant = 0.0  # K
        self.tasks_seen = 0

    def begin_stream(self, lr: float | None, n_classes: int | None = None) -> None:
        super().begin_stream(lr, n_classes)
        self.fisher_sum, self.anchor, self.constant, self.tasks_seen = {}, {}, 0.0, 0

    def penalty(self) -> torch.Tensor | float:
        if not self.fisher_sum:
            return 0.0
        params = dict(self.named_parameters())
        total = sum(
            (a * (params[n] - self.anchor[n]).pow(2)).sum() for n, a in self.fisher_sum.items()
        )
        return self.ewc_lambda / 2 * (total + self.constant)

    def end_task(self, sample: Sampler, classes: torch.Tensor) -> None:
        x, _ = sample(self.fisher_samples)
        params = {n: p.detach() for n, p in self.named_parameters()}
        fisher = self.fisher(x.to(self.head.weight.device), classes, params)
        for n, f in fisher.items():  # fold F_t, theta_t into the running sums
            theta = params[n].double()
            f = f.double()
            a_old = self.fisher_sum.get(n, torch.zeros_like(f))
            b = a_old * self.anchor.get(n, torch.zeros_like(f)) + f * theta
            a = a_old + f
            mu = torch.where(a > 0, b / a.clamp(min=1e-300), torch.zeros_like(b))
            # K gains sum F theta^2 + A_old mu_old^2 - A mu^2 (all but the new mu terms)
            added = (f * theta.pow(2)).sum() + (a_old * self.anchor.get(n, 0.0) ** 2).sum()
            self.constant += float(added - (a * mu.pow(2)).sum())
            self.fisher_sum[n], self.anchor[n] = a.float(), mu.float()
        self.tasks_seen += 1

    def fisher(
        self, x: torch.Tensor, classes: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The diagonal empirical Fisher of each parameter over the examples ``x``."""
        buffers = dict(self.named_buffers())
        was_training = self.training
        self.eval()

        def log_likelihood(p: dict, xi: torch.Tensor) -> torch.Tensor:
            logits = functional_call(self, (p, buffers), (xi.unsqueeze(0),))
            # the log-probability of the predicted label is the largest one
            return masked_logits(logits, classes).log_softmax(-1).max()

        def prediction(p: dict, xi: torch.Tensor) -> torch.Tensor:
            # regression, one output: N(f(x), 1) has Fisher E[(d log p / d theta)^2] = (df/dtheta)^2
            return functional_call(self, (p, buffers), (xi.unsqueeze(0),)).sum()

        per_example = log_likelihood if self.task.outputs is None else prediction
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        for chunk in x.split(100):
            grads = vmap(grad(per_example), in_dims=(None, 0))(params, chunk)
            for n, g in grads.items():
                fisher[n] += g.pow(2).sum(0)
        self.train(was_training)
        return {n: f / x.shape[0] for n, f in fisher.items()}

    def get_extra_state(self) -> dict:
        return {
            **super().get_extra_state(),
            "fisher_sum": self.fisher_sum,
            "anchor": self.anchor,
            "constant": self.constant,
            "tasks_seen": self.tasks_seen,
        }

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.fisher_sum, self.anchor = state["fisher_sum"], state["anchor"]
        self.constant, self.tasks_seen = state["constant"], state["tasks_seen"]
