"""The surface every algorithm shares, and small helpers they use."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from metarun.config import BatchNormMode
from metarun.data.episodes import Episode

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps query inputs ``(n_query, *input_shape)`` to predictions: logits ``(n_query, ways)``
for classification, targets ``(n_query, outputs)`` for regression."""


@runtime_checkable
class MetaLearner(Protocol):
    """What the runner needs from an algorithm (implemented by ``nn.Module`` subclasses).

    An algorithm that computes a whole meta-batch in one call sets ``stacks_tasks = True``;
    the runner then hands :meth:`meta_loss` the meta-batch stacked by :meth:`Episode.stack`
    (a leading task dimension) instead of one episode at a time."""

    bn_mode: BatchNormMode

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss after adapting to the support set, differentiable with respect to the
        meta-parameters, and the task's metric on the query set (accuracy or MSE, see
        :class:`TaskKind`). Both are scalars."""
        ...

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Adapts to a support set ``(n_support, *input_shape)`` with targets
        ``(n_support,)`` (labels) or ``(n_support, outputs)`` (regression) and returns a
        predictor for the queries. Never changes the algorithm's own state."""
        ...


def mean_squared_error(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over ``(n, outputs)`` of the squared differences (the MAML paper's regression loss)."""
    return F.mse_loss(predictions, targets)


@dataclass(frozen=True)
class TaskKind:
    """What a dataset's tasks ask of an algorithm; the dataset declares it (``dataset.task``)
    and the runner hands it to the algorithm, so no algorithm branches on the dataset.

    Attributes:
        metric: the metric's tag suffix (``train/<metric>``, ``test/<metric>``).
        higher_is_better: direction of the metric, for picking the best validation.
        loss: ``(predictions, targets) -> scalar`` minimised in the inner and outer loops.
        score: ``(predictions, targets) -> scalar`` reported as the metric.
        outputs: outputs of the algorithm's head; ``None`` means one per way (classes).
    """

    metric: str
    higher_is_better: bool
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    outputs: int | None

    def head_outputs(self, ways: int) -> int:
        return ways if self.outputs is None else self.outputs


@contextlib.contextmanager
def batch_norm_mode(module: nn.Module, mode: BatchNormMode) -> Iterator[None]:
    """Puts ``module`` in train mode (batch statistics) for ``transductive`` evaluation and in
    eval mode (running statistics) for ``running``, restoring its mode afterwards."""
    was_training = module.training
    module.train(mode == BatchNormMode.transductive)
    try:
        yield
    finally:
        module.train(was_training)


def buffer_copies(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's buffers, so an evaluation forward pass in train mode updates
    the copies and leaves the running statistics of the model untouched."""
    return {name: b.clone() for name, b in module.named_buffers()}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``(n, ways)`` logits whose argmax equals ``labels`` ``(n,)``."""
    return (logits.argmax(dim=-1) == labels).float().mean()


CLASSIFICATION = TaskKind("acc", True, F.cross_entropy, accuracy, outputs=None)
"""Few-shot classification: cross-entropy, accuracy, a ``ways``-way head."""
REGRESSION = TaskKind("mse", False, mean_squared_error, mean_squared_error, outputs=1)


def linear_head(backbone: nn.Module, outputs: int) -> nn.Linear:
    """The linear layer an algorithm puts on ``backbone``'s flat features, initialised as the
    backbone initialises its own where it says how (``init_linear``: MLP's ``init_std``);
    refuses a backbone that keeps feature maps (``model.flatten=false``, which only Relation
    Networks use)."""
    shape = tuple(getattr(backbone, "out_shape", (backbone.out_features,)))
    if len(shape) != 1:
        raise ValueError(
            f"this algorithm puts a linear head on flat features, but the backbone keeps "
            f"feature maps of shape {shape}: set model.flatten=true (feature maps are for "
            f"algo=relation)."
        )
    head = nn.Linear(shape[0], outputs)
    if hasattr(backbone, "init_linear"):
        backbone.init_linear(head)
    return head


def require_classification(task: TaskKind, how: str) -> None:
    """Refuses a regression task for an algorithm that only classifies; ``how`` says why
    (e.g. ``"ProtoNet classifies by distance to class prototypes"``)."""
    if task is not CLASSIFICATION:
        raise ValueError(
            f"{how}, so it has no form for {task.metric} tasks; use a gradient-based "
            "algorithm such as algo=maml."
        )


"""Few-shot regression of one target (e.g. sinusoids): MSE loss and metric, one output."""
