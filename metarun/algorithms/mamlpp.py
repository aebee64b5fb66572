"""MAML++ (Antoniou, Edwards & Storkey, "How to Train Your MAML", ICLR 2019): switches on
MAML, each on its own.

``multi_step_loss`` (MSL): the meta-loss is a weighted sum of the query losses after every
    inner step, not only the last. The weights start uniform (``1/N`` for ``N`` steps) and
    are annealed linearly, over the first ``msl_anneal_tasks`` meta-training tasks, to
    ``0.03/N`` for every step but the last, which takes the rest (the paper's floor).
``learn_step_lrs`` (LSLR): a learnable inner learning rate per parameter tensor (layer) and
    per step, starting at ``fast_lr``; evaluation steps beyond ``adaptation_steps`` reuse
    the last step's rate.
``first_order_until_tasks`` (derivative-order annealing): first-order meta-gradients for the
    first that many meta-training tasks, second order afterwards (``0``: always as
    ``first_order`` says).

The counter of meta-training tasks (``tasks_seen``) is a buffer, so a resumed run continues
the annealing where it stopped. Not implemented here: per-step batch-norm statistics and
biases (BNRS/BNWB) and the cosine annealing of the meta learning rate (a runner schedule).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from metarun.algorithms.base import CLASSIFICATION, BatchNormMode, TaskKind
from metarun.algorithms.maml import MAML, Params
from metarun.data.episodes import Episode

MSL_FLOOR = 0.03  # times 1/N: the final weight of each non-final step's query loss


class MAMLPlusPlus(MAML):
    """MAML with the MAML++ switches; with all of them off it is exactly :class:`MAML`.

    Args:
        backbone, ways, fast_lr, adaptation_steps, test_adaptation_steps, first_order,
            bn_mode, task: as :class:`MAML`.
        multi_step_loss: weighted query losses after every inner step (MSL).
        msl_anneal_tasks: meta-training tasks over which the MSL weights are annealed.
        learn_step_lrs: learnable per-layer, per-step inner learning rates (LSLR).
        first_order_until_tasks: first-order meta-gradients for the first that many tasks.
        engine: only ``loop`` (the switches live in this class's own inner loop).
    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        fast_lr: float,
        adaptation_steps: int,
        test_adaptation_steps: int,
        first_order: bool = False,
        bn_mode: BatchNormMode | str = BatchNormMode.transductive,
        task: TaskKind = CLASSIFICATION,
        multi_step_loss: bool = False,
        msl_anneal_tasks: int = 1,
        learn_step_lrs: bool = False,
        first_order_until_tasks: int = 0,
        engine: str = "loop",
    ):
        if engine != "loop":
            raise ValueError(
                f"algo=mamlpp runs its switches in its own inner loop; algo.engine={engine} "
                f"is not supported: use algo.engine=loop."
            )
        super().__init__(
            backbone,
            ways,
            fast_lr,
            adaptation_steps,
            test_adaptation_steps,
            first_order,
            bn_mode,
            task,
        )
        if msl_anneal_tasks < 1:
            raise ValueError(f"msl_anneal_tasks must be >= 1, got {msl_anneal_tasks}")
        self.multi_step_loss = multi_step_loss
        self.msl_anneal_tasks = msl_anneal_tasks
        self.first_order_until_tasks = first_order_until_tasks
        self.step_lrs = (
            nn.ParameterList(
                nn.Parameter(torch.full((adaptation_steps,), float(fast_lr)))
                for _ in self.model.parameters()
            )
            if learn_step_lrs
            else None
        )
        self.register_buffer("tasks_seen", torch.zeros((), dtype=torch.long))

    def inner_update(self, params: Params, grads: tuple[torch.Tensor, ...], step: int) -> Params:
        """SGD with ``fast_lr``, or with the learned rate of each tensor at this step."""
        if self.step_lrs is None:
            return super().inner_update(params, grads, step)
        updates = zip(params.items(), grads, self.step_lrs, strict=True)
        return {n: p - lrs[min(step, lrs.numel() - 1)] * g for (n, p), g, lrs in updates}

    def msl_weights(self) -> torch.Tensor:
        """``(adaptation_steps,)`` weights of the per-step query losses at this point of
        training (they sum to 1)."""
        n = self.adaptation_steps
        done = min(int(self.tasks_seen) / self.msl_anneal_tasks, 1.0)
        early = (1 - done) / n + done * MSL_FLOOR / n
        weights = torch.full((n,), early)
        weights[-1] = 1 - (n - 1) * early
        return weights

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ways(episode.ways)
        second_order = not self.first_order and int(self.tasks_seen) >= self.first_order_until_tasks
        weights = self.msl_weights() if self.multi_step_loss else None
        if self.training and torch.is_grad_enabled():
            self.tasks_seen += 1
        buffers = dict(self.model.named_buffers())
        params: Params = dict(self.model.named_parameters())
        loss = torch.zeros((), device=episode.query_x.device)
        for step in range(self.adaptation_steps):
            support = functional_call(self.model, (params, buffers), (episode.support_x,))
            support_loss = self.task.loss(support, episode.support_y)
            grads = torch.autograd.grad(
                support_loss, tuple(params.values()), create_graph=second_order
            )
            params = self.inner_update(params, grads, step)
            if weights is not None and step < self.adaptation_steps - 1:
                query = functional_call(self.model, (params, buffers), (episode.query_x,))
                loss = loss + weights[step] * self.task.loss(query, episode.query_y)
        predictions = functional_call(self.model, (params, buffers), (episode.query_x,))
        final = self.task.loss(predictions, episode.query_y)
        loss = final if weights is None else loss + weights[-1] * final
        return loss, self.task.score(predictions, episode.query_y)
