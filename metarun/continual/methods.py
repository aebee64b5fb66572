"""Continual learners: baselines and meta-continual methods. Mirrors ``configs/algo``
(``naive``, ``joint``, ``er``, ``ewc``, ``oml``, ``lamaml``).

Every method is a backbone (``model=``) with a linear head over all the scenario's classes
(one output for a regression stream). The stream loop (:mod:`metarun.continual.loop`)
calls, in order:

- :meth:`ContinualLearner.pretrain` once, for methods with a meta-training phase (OML);
- :meth:`ContinualLearner.observe` on every training batch of the current task;
- :meth:`ContinualLearner.end_task` after the last batch of a task;
- ``forward`` to score every task after every task.

Outputs not in play (see :mod:`metarun.continual.scenarios`) are masked to ``-inf``
before the softmax, in training and in scoring. The scenario's ``task``
(:class:`metarun.algorithms.base.TaskKind`) gives the loss and the metric every method
reports: cross-entropy and accuracy, or MSE and MSE for a regression stream (no masking).
Each method owns its optimiser and a seeded ``torch.Generator``; both are part of its
``state_dict`` (``get_extra_state``), so a resumed stream continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metarun.continual.buffer import ReservoirBuffer
from metarun.continual.scenarios import SineFunctions
from metarun.data.episodes import ClassPool
from metarun.errors import NonFiniteError
from metarun.tasks import CLASSIFICATION, TaskKind

Sampler = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""``sample(n)`` -> ``(x (n, C, H, W), y (n,))``: training examples of the task just learned."""


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


def _check_finite(loss: torch.Tensor, what: str) -> None:
    if not math.isfinite(loss.item()):
        raise NonFiniteError(
            f"the {what} loss is {loss.item()}; no update was applied. Lower the learning "
            f"rate (algo.lr, algo.fast_lr or algo.meta_lr), then continue from the last "
            f"checkpoint with `metarun resume=RUN algo.lr=...` or start again."
        )


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
    """

    task_kinds: tuple[str, ...] = ("classification", "regression")
    needs_meta_training: bool = False
    inner_loop_through_backbone: bool = False


class ContinualLearner(nn.Module):
    """Backbone + linear head; the base of every method (naive fine-tuning on its own).

    Args:
        backbone: maps ``(n, C, H, W)`` to ``(n, out_features)``.
        n_classes: outputs of the head (classification).
        input_shape: ``(C, H, W)`` of one example.
        seed: seeds the method's generator (replay sampling, Fisher samples, ...).
        lr: Adam learning rate of the baselines.
        task: the scenario's loss and metric (``CLASSIFICATION`` or ``REGRESSION``, whose
            head has ``task.outputs`` outputs).
    """

    capabilities = StreamCapabilities()

    cumulative = False  # joint training draws every batch from all tasks seen so far
    meta_iterations = 0  # meta-training steps before the stream (OML)

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        lr: float = 1e-3,
        task: TaskKind = CLASSIFICATION,
    ):
        super().__init__()
        self.backbone = backbone
        self.task = task
        self.head = nn.Linear(backbone.out_features, task.head_outputs(n_classes))
        self.generator = torch.Generator().manual_seed(seed)
        self.lr = lr
        self.optimizer = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

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

    def pretrain(self, pool: ClassPool | None, iteration: int, log: Callable) -> int:
        """Meta-training before the stream, resumable from ``iteration``; returns the
        number of iterations done. Nothing to do for methods without one."""
        return 0

    def loss(self, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.task.loss(self.in_play(self(x), classes), y)

    def observe(
        self, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor
    ) -> tuple[float, float]:
        """One update on a training batch ``x (n, C, H, W)``, ``y (n,)`` (regression:
        ``(n, outputs)``) with the outputs ``classes`` in play; returns ``(loss, metric)``
        on the batch (the metric is accuracy, or MSE for regression)."""
        self.train()
        logits = self.in_play(self(x), classes)
        loss = self.task.loss(logits, y) + self.penalty()
        self._step(loss, "training")
        return loss.item(), self.task.score(logits, y).item()

    def penalty(self) -> torch.Tensor | float:
        """A regulariser added to the training loss (EWC); 0 for the others."""
        return 0.0

    def _step(self, loss: torch.Tensor, what: str) -> None:
        _check_finite(loss, what)
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
        self.optimizer.load_state_dict(state["optimizer"])


class Naive(ContinualLearner):
    """Fine-tuning on each task in turn: the lower bound, which forgets."""


class Joint(ContinualLearner):
    """Joint training: each task's batches are drawn from the union of all tasks so far,
    so after the last task the model has trained on everything (the upper bound)."""

    cumulative = True


class ExperienceReplay(ContinualLearner):
    """Experience replay with a reservoir buffer (Chaudhry et al. 2019, "On Tiny Episodic
    Memories in Continual Learning"): every batch is trained together with a batch drawn
    from the buffer, then offered to the buffer.

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
    ):
        super().__init__(backbone, n_classes, input_shape, seed, lr, task)
        self.buffer = replay_buffer(buffer_size, input_shape, task)
        self.replay_batch_size = replay_batch_size

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
    ):
        super().__init__(backbone, n_classes, input_shape, seed, lr, task)
        self.ewc_lambda, self.fisher_samples = ewc_lambda, fisher_samples
        self.anchors: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def penalty(self) -> torch.Tensor | float:
        if not self.anchors:
            return 0.0
        total = 0.0
        params = dict(self.named_parameters())
        for fisher, theta in self.anchors:
            total = total + sum(
                (fisher[n].to(params[n].device) * (params[n] - theta[n].to(params[n].device)))
                .pow(2)
                .sum()
                for n in fisher
            )
        return self.ewc_lambda / 2 * total

    def end_task(self, sample: Sampler, classes: torch.Tensor) -> None:
        x, _ = sample(self.fisher_samples)
        x = x.to(self.head.weight.device)
        params = {n: p.detach() for n, p in self.named_parameters()}
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
        fisher = {n: f / x.shape[0] for n, f in fisher.items()}
        self.anchors.append((fisher, {n: p.clone() for n, p in params.items()}))
        self.train(was_training)

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "anchors": self.anchors}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.anchors = state["anchors"]


class OML(ContinualLearner):
    """Online-aware Meta-Learning (Javed & White 2019, "Meta-Learning Representations for
    Continual Learning"): the backbone is a representation (RLN) meta-learned so that the
    linear head (PLN) can learn a stream online, one example at a time, without
    interference; in the stream the backbone is frozen and only the head learns.

    Meta-training step: draw ``trajectory_classes`` classes of the meta-training pool,
    give them random head outputs and reset those rows of the head to zero; train the head
    on a trajectory of ``trajectory_shots`` drawings per class, class after class, one
    SGD step of ``fast_lr`` per example; the meta-loss is the loss of the adapted head on
    the trajectory and on ``query_shots`` other drawings of the same classes (so forgetting
    the early classes of the trajectory is penalised). Its gradient reaches the backbone
    and the head's initial weights through every inner step (second order); Adam with
    ``meta_lr``. The paper's remember set is drawn from the trajectory's classes here.

    On a regression stream (``scenario=sinusoid_stream``) the meta-training set holds
    functions (:class:`metarun.continual.scenarios.SineFunctions`): a trajectory is
    ``trajectory_classes`` functions with the ids ``0, 1, ...``, ``trajectory_shots``
    points of each learned function after function in SGD steps of the stream's batch
    size (as the paper's regression protocol does), and ``query_shots`` other points per
    function; the loss is the MSE and the head, one output shared by all functions, is not
    reset.

    Args:
        fast_lr: SGD step of the head, per example (per batch in a regression stream), in
            meta-training and in the stream.
        meta_lr: Adam learning rate of the meta-update.
        meta_iterations: meta-training steps before the stream.
        trajectory_classes, trajectory_shots, query_shots: the shape of one meta-step
            (classes, or functions, per trajectory; examples of each in the trajectory;
            other examples of each in the meta-loss).
        first_order: drop the second-order terms of the inner steps.
    """

    capabilities = StreamCapabilities(needs_meta_training=True)

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        fast_lr: float = 0.03,
        meta_lr: float = 1e-3,
        meta_iterations: int = 1000,
        trajectory_classes: int = 5,
        trajectory_shots: int = 5,
        query_shots: int = 5,
        first_order: bool = False,
        task: TaskKind = CLASSIFICATION,
    ):
        if task.outputs is None and trajectory_classes > n_classes:
            raise ValueError(
                f"trajectory_classes={trajectory_classes} exceeds the head's {n_classes} "
                f"outputs; lower algo.trajectory_classes"
            )
        super().__init__(backbone, n_classes, input_shape, seed, lr=meta_lr, task=task)
        self.fast_lr, self.meta_iterations, self.first_order = fast_lr, meta_iterations, first_order
        self.shape = (trajectory_classes, trajectory_shots, query_shots)

    def _meta_batch(self, pool: ClassPool | SineFunctions):
        """One trajectory: ``x (n, C, H, W)``, targets ``y (n,)`` (or ``(n, 1)``), the
        inner step of each example ``step (n,)`` (``-1``: not in the trajectory, only in
        the meta-loss), and ``reset (n_outputs,)``, the head rows to zero first."""
        ways, shots, queries = self.shape
        g = self.generator
        device = self.head.weight.device
        if isinstance(pool, SineFunctions):
            x, y, step = pool.trajectory(ways, shots, queries, g)
            reset = torch.zeros(self.head.out_features, dtype=torch.bool)
            return x.to(device), y.to(device), step.to(device), reset.to(device)
        classes = torch.randperm(pool.n_classes, generator=g)[:ways]
        units = torch.randperm(self.head.out_features, generator=g)[:ways]
        picked = []
        for c in classes.tolist():
            items = pool.class_items[c][: int(pool.counts[c])]
            if items.numel() < shots + queries:
                raise ValueError(
                    f"meta-training class {pool.class_names[c]} has {items.numel()} images, "
                    f"fewer than trajectory_shots + query_shots = {shots + queries}"
                )
            picked.append(items[torch.randperm(items.numel(), generator=g)[: shots + queries]])
        items = torch.stack(picked)  # (ways, shots + queries)
        x = pool.images[items.flatten()].float().div_(255).to(device)
        y = units.repeat_interleave(shots + queries).to(device)
        is_traj = torch.arange(shots + queries).repeat(ways) < shots
        step = torch.where(is_traj, is_traj.cumsum(0) - 1, -1)  # one example per step
        reset = torch.zeros(self.head.out_features, dtype=torch.bool)
        reset[units] = True
        return x, y, step.to(device), reset.to(device)

    def pretrain(
        self, pool: ClassPool | SineFunctions | None, iteration: int, log: Callable
    ) -> int:
        if pool is None:
            raise ValueError(
                "OML meta-trains its representation on background classes before the stream, "
                "and this scenario has none: use scenario=omniglot_continual (or "
                "sinusoid_stream with scenario.meta_functions > 0), or a method without a "
                "meta-training phase (naive, joint, er, ewc, lamaml)."
            )
        self.train()
        for it in range(iteration, self.meta_iterations):
            x, y, step, reset = self._meta_batch(pool)
            feats = self.backbone(x)
            w = self.head.weight.masked_fill(reset[:, None], 0.0)
            b = self.head.bias.masked_fill(reset, 0.0)
            for s in range(int(step.max()) + 1):  # in trajectory order: task after task
                k = step == s
                loss = self.task.loss(F.linear(feats[k], w, b), y[k])
                gw, gb = torch.autograd.grad(loss, (w, b), create_graph=not self.first_order)
                w, b = w - self.fast_lr * gw, b - self.fast_lr * gb
            predictions = F.linear(feats, w, b)
            meta_loss = self.task.loss(predictions, y)
            self._step(meta_loss, "meta-training")
            query = step < 0
            metric = self.task.score(predictions[query], y[query]).item()
            if log(it + 1, meta_loss.item(), metric):
                return it + 1
        return self.meta_iterations

    def observe(self, x, y, classes):
        """One SGD step of ``fast_lr`` on the head; the representation stays frozen."""
        self.eval()
        with torch.no_grad():
            feats = self.backbone(x)
        logits = self.in_play(self.head(feats), classes)
        loss = self.task.loss(logits, y)
        _check_finite(loss, "training")
        gw, gb = torch.autograd.grad(loss, (self.head.weight, self.head.bias))
        with torch.no_grad():
            self.head.weight -= self.fast_lr * gw
            self.head.bias -= self.fast_lr * gb
        return loss.item(), self.task.score(logits, y).item()


class LaMAML(ContinualLearner):
    """La-MAML (Gupta, Yadav & Paull 2020, "Look-ahead Meta Learning for Continual
    Learning"): online meta-learning on the stream itself, with a learnable learning rate
    per parameter (``alpha``) and a reservoir replay buffer.

    For each batch: split it into ``adaptation_steps`` chunks and take one SGD step per
    chunk from the current weights with step sizes ``alpha``; the meta-loss is the loss of
    the adapted weights on the batch plus a batch from the buffer. First ``alpha`` moves
    down its meta-gradient (SGD, ``meta_lr``), then the weights move down theirs scaled by
    ``max(alpha, 0)`` (the paper's asynchronous update), then the batch joins the buffer.

    Args:
        fast_lr: initial value of every ``alpha``.
        meta_lr: learning rate of ``alpha``.
        adaptation_steps: inner steps (chunks) per batch.
        buffer_size, replay_batch_size: the replay memory and the examples replayed.
        first_order: drop the second-order terms of the inner steps.
    """

    capabilities = StreamCapabilities(inner_loop_through_backbone=True)

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        fast_lr: float = 0.1,
        meta_lr: float = 0.3,
        adaptation_steps: int = 5,
        buffer_size: int = 500,
        replay_batch_size: int = 128,
        first_order: bool = False,
        task: TaskKind = CLASSIFICATION,
    ):
        super().__init__(backbone, n_classes, input_shape, seed, task=task)
        names = [n for n, _ in self.named_parameters()]
        self.alphas = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, fast_lr)) for p in self.parameters()]
        )
        self.weight_names = names
        self.lr = meta_lr  # the learning rate of the alphas' optimiser
        self.optimizer = torch.optim.SGD(self.alphas.parameters(), lr=meta_lr)
        self.buffer = replay_buffer(buffer_size, input_shape, task)
        self.adaptation_steps, self.replay_batch_size = adaptation_steps, replay_batch_size
        self.first_order = first_order

    def observe(self, x, y, classes):
        self.train()
        n = y.shape[0]
        params = dict(self.named_parameters())
        weights = {name: params[name] for name in self.weight_names}
        fast = dict(weights)
        for cx, cy in zip(
            x.chunk(self.adaptation_steps), y.chunk(self.adaptation_steps), strict=True
        ):
            logits = self.in_play(functional_call(self, fast, (cx,)), classes)
            loss = self.task.loss(logits, cy)
            grads = torch.autograd.grad(
                loss, list(fast.values()), create_graph=not self.first_order
            )
            steps = zip(fast.items(), self.alphas, grads, strict=True)
            fast = {name: w - a * g for (name, w), a, g in steps}
        if len(self.buffer):
            rx, ry = self.buffer.sample(self.replay_batch_size, self.generator)
            x_meta, y_meta = torch.cat([x, rx]), torch.cat([y, ry])
        else:
            x_meta, y_meta = x, y
        logits = self.in_play(functional_call(self, fast, (x_meta,)), classes)
        meta_loss = self.task.loss(logits, y_meta)
        _check_finite(meta_loss, "meta")
        grads = torch.autograd.grad(meta_loss, [*weights.values(), *self.alphas])
        w_grads, a_grads = grads[: len(weights)], grads[len(weights) :]
        self.optimizer.zero_grad(set_to_none=True)
        for a, g in zip(self.alphas, a_grads, strict=True):
            a.grad = g
        self.optimizer.step()
        with torch.no_grad():
            for w, a, g in zip(weights.values(), self.alphas, w_grads, strict=True):
                w -= a.clamp(min=0) * g
        self.buffer.add(x, y, self.generator)
        return meta_loss.item(), self.task.score(logits[:n], y).item()
