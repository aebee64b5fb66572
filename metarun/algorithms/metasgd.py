"""Meta-SGD (Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning", arXiv:1707.09835, 2017).

MAML with a learned inner update: every parameter ``p`` has a learning-rate tensor ``a``
of its own shape, and an inner step is ``p - a * g`` (elementwise), so the meta-learner
chooses both the step size and the direction of each coordinate. The rates are
meta-parameters, trained by the outer loop together with the initialisation (they appear
in ``algo.parameters()``, so the runner's optimiser updates them). Everything else,
the loss from the dataset's task kind and the evaluation, is MAML's.
"""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.base import BatchNormMode
from metarun.algorithms.maml import MAML, Params
from metarun.tasks import CLASSIFICATION, TaskKind


class MetaSGD(MAML):
    """Meta-SGD on ``backbone`` followed by a linear head.

    Args:
        backbone: feature extractor with an ``out_features`` attribute.
        ways: classes per episode (the head's outputs for classification).
        fast_lr: the value every learning rate starts at (when ``fast_lr_range`` is unset).
        adaptation_steps: inner steps in meta-training (the paper uses one).
        test_adaptation_steps: inner steps at evaluation.
        first_order: drop the second-order terms (the rates still get gradients).
        bn_mode: see :class:`BatchNormMode`.
        task: the loss, metric and head size of the dataset's tasks (given by the runner).
        fast_lr_range: ``[low, high]``: start each rate uniformly at random in this range
            instead (the paper's random initialisation of the rates).
        engine: ``loop`` or ``vmap``, as for :class:`MAML` (both use :meth:`inner_update`).

    Attributes:
        lrs: one learning-rate tensor per model parameter, shaped like it, in the order of
            ``model.named_parameters()``.
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
        fast_lr_range: tuple[float, float] | None = None,
        engine: str = "loop",
    ):
        super().__init__(
            backbone,
            ways,
            fast_lr,
            adaptation_steps,
            test_adaptation_steps,
            first_order,
            bn_mode,
            task,
            engine,
        )
        rates = []
        for p in self.model.parameters():
            if fast_lr_range is None:
                rate = torch.full_like(p, fast_lr)
            else:
                low, high = fast_lr_range
                rate = torch.empty_like(p).uniform_(low, high)
            rates.append(nn.Parameter(rate))
        self.lrs = nn.ParameterList(rates)

    def inner_update(self, params: Params, grads: tuple[torch.Tensor, ...], step: int) -> Params:
        """``p - a * g`` with the learned elementwise rates ``a``."""
        updates = zip(params.items(), grads, self.lrs, strict=True)
        return {name: p - lr * g for (name, p), g, lr in updates}
