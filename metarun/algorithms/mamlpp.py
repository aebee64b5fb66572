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
``per_step_bn`` (BNRS + BNWB): every batch-norm layer gets its own running statistics and
    its own weight and bias per inner step. The support pass of inner step ``k`` and the
    query pass after that step use set ``k`` (as in the paper's code); evaluation steps
    beyond ``adaptation_steps`` reuse the last set. The per-step weights and biases are
    meta-learned by the outer loop and not adapted in the inner loop (the paper's default),
    so the model's own batch-norm weights and biases are unused and frozen.

The counter of meta-training tasks (``tasks_seen``) is a buffer, so a resumed run continues
the annealing where it stopped. The paper's cosine annealing of the meta learning rate is
the runner's ``train.lr_schedule=cosine`` (``experiment=mamlpp_omniglot_5w1s`` uses it).
"""

from __future__ import annotations

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
)
from metarun.algorithms.maml import MAML, Params
from metarun.data.episodes import Episode
from metarun.tasks import CLASSIFICATION, TaskKind

MSL_FLOOR = 0.03  # times 1/N: the final weight of each non-final step's query loss


class StepBatchNorm(nn.Module):
    """One set of batch-norm weights, biases and running statistics per inner step
    (MAML++'s BNWB and BNRS) for every batch-norm layer of ``model``.

    Each batch-norm parameter or buffer of ``model`` (named as in the model, e.g.
    ``0.features.1.weight``) gets a copy per step stacked on a new first dimension:
    ``(steps, C)`` weights, biases, means and variances, ``(steps,)`` batch counters, all
    starting at the model's values. State-dict keys replace the dots by ``-``.

    Args:
        model: the network whose batch-norm layers are replicated.
        steps: the number of sets (the inner steps of meta-training).
    """

    def __init__(self, model: nn.Module, steps: int):
        super().__init__()
        self.steps = steps
        self.param_names: list[str] = []
        self.buffer_names: list[str] = []
        self.weights = nn.ParameterDict()
        for prefix, module in model.named_modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            for name, p in module.named_parameters(recurse=False):
                self.param_names.append(f"{prefix}.{name}")
                self.weights[_key(f"{prefix}.{name}")] = nn.Parameter(_per_step(p, steps))
            for name, b in module.named_buffers(recurse=False):
                self.buffer_names.append(f"{prefix}.{name}")
                self.register_buffer(_key(f"{prefix}.{name}"), _per_step(b, steps))
        if not self.param_names and not self.buffer_names:
            backbone = model[0] if isinstance(model, nn.Sequential) else model
            raise ValueError(
                f"algo.per_step_bn=true needs a model with batch-norm layers, and "
                f"{type(backbone).__name__} has none: set algo.per_step_bn=false (or use a "
                f"model with batch norm, e.g. model=conv4)."
            )

    def at(self, step: int, buffers: Params) -> tuple[Params, Params]:
        """The batch-norm parameters and buffers of inner step ``step`` (from 0; steps past
        the last set reuse it), keyed by the model's names: views into the stacked weights
        and into ``buffers`` (this module's buffers by name, or copies of them), so a
        forward pass in train mode updates that step's running statistics in place."""
        k = min(step, self.steps - 1)
        params = {name: self.weights[_key(name)][k] for name in self.param_names}
        return params, {name: buffers[_key(name)][k] for name in self.buffer_names}


def _key(name: str) -> str:
    return name.replace(".", "-")


def _per_step(t: torch.Tensor, steps: int) -> torch.Tensor:
    return t.detach().unsqueeze(0).repeat(steps, *[1] * t.dim()).clone()


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
        per_step_bn: per-step batch-norm statistics, weights and biases (BNRS + BNWB).

    Attributes:
        step_lrs: with ``learn_step_lrs``, one ``(adaptation_steps,)`` rate tensor per tensor
            the inner loop adapts, in the order of :meth:`inner_params`.
        step_bn: with ``per_step_bn``, the per-step batch-norm sets (:class:`StepBatchNorm`).
    """

    capabilities = Capabilities(
        task_kinds=BOTH_KINDS,
        adaptation_steps=True,
        fixed_ways=True,
        inner_loop_through_backbone=True,
    )

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
        per_step_bn: bool = False,
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
        self.step_bn = StepBatchNorm(self.model, adaptation_steps) if per_step_bn else None
        if self.step_bn is not None:  # replaced by the per-step copies
            for name, p in self.model.named_parameters():
                if name in self.step_bn.param_names:
                    p.requires_grad_(False)
        self.step_lrs = (
            nn.ParameterList(
                nn.Parameter(torch.full((adaptation_steps,), float(fast_lr)))
                for _ in self.inner_params()
            )
            if learn_step_lrs
            else None
        )
        self.register_buffer("tasks_seen", torch.zeros((), dtype=torch.long))

    def inner_params(self) -> Params:
        """The tensors the inner loop adapts: every parameter of the model, except the
        batch-norm weights and biases when they are per step (``per_step_bn``)."""
        skip = set(self.step_bn.param_names) if self.step_bn is not None else set()
        return {n: p for n, p in self.model.named_parameters() if n not in skip}

    def run_model(
        self, params: Params, buffers: Params, step_buffers: Params, step: int, x: torch.Tensor
    ) -> torch.Tensor:
        """The model on ``x`` with the adapted ``params`` and its ``buffers``; with
        ``per_step_bn``, batch norm uses the weights, biases and statistics (from
        ``step_buffers``, the buffers of :attr:`step_bn` or copies) of inner step ``step``."""
        if self.step_bn is not None:
            bn_params, bn_buffers = self.step_bn.at(step, step_buffers)
            params, buffers = params | bn_params, buffers | bn_buffers
        return functional_call(self.model, (params, buffers), (x,))

    def adapted_params(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        create_graph: bool,
        buffers: Params,
        step_buffers: Params | None = None,
    ) -> Params:
        """As :meth:`MAML.adapted_params`, from :meth:`inner_params`; ``step_buffers``
        defaults to the per-step statistics themselves (updated in train mode)."""
        if step_buffers is None:
            step_buffers = self._step_buffers()
        params = self.inner_params()
        for step in range(steps):
            loss = self.task.loss(self.run_model(params, buffers, step_buffers, step, x), y)
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)
            params = self.inner_update(params, grads, step)
        return params

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """As :meth:`MAML.adapt`; the queries go through batch norm with the set of the
        last step taken. Running statistics are copied, never changed."""
        if self.task.outputs is None:
            self._check_ways(int(support_y.max()) + 1)
        steps = self.test_adaptation_steps if steps is None else steps
        buffers = buffer_copies(self.model)
        step_buffers = buffer_copies(self.step_bn) if self.step_bn is not None else {}
        with torch.enable_grad(), batch_norm_mode(self.model, self.bn_mode):
            params = self.adapted_params(support_x, support_y, steps, False, buffers, step_buffers)
        params = {name: p.detach() for name, p in params.items()}
        last = max(steps - 1, 0)

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self.model, self.bn_mode):
                return self.run_model(params, buffers, step_buffers, last, query_x)

        return predict

    def _step_buffers(self) -> Params:
        return dict(self.step_bn.named_buffers()) if self.step_bn is not None else {}

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
        buffers, step_buffers = dict(self.model.named_buffers()), self._step_buffers()
        params = self.inner_params()
        loss = torch.zeros((), device=episode.query_x.device)
        for step in range(self.adaptation_steps):
            support = self.run_model(params, buffers, step_buffers, step, episode.support_x)
            support_loss = self.task.loss(support, episode.support_y)
            grads = torch.autograd.grad(
                support_loss, tuple(params.values()), create_graph=second_order
            )
            params = self.inner_update(params, grads, step)
            if weights is not None and step < self.adaptation_steps - 1:
                query = self.run_model(params, buffers, step_buffers, step, episode.query_x)
                loss = loss + weights[step] * self.task.loss(query, episode.query_y)
        last = self.adaptation_steps - 1
        predictions = self.run_model(params, buffers, step_buffers, last, episode.query_x)
        final = self.task.loss(predictions, episode.query_y)
        loss = final if weights is None else loss + weights[-1] * final
        return loss, self.task.score(predictions, episode.query_y)
