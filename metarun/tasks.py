"""What a dataset's tasks ask of a learner: classification or regression.

Data (a dataset or a scenario declares its kind), algorithms and continual methods (they
take the kind's loss and metric) and the recipes (they name and rank the metric) all import
this module; it imports nothing of metarun, so none of them has to import another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TaskKind:
    """The loss, the metric and the head size of a kind of task. The dataset declares it
    (``dataset.task``, ``scenario.task``) and the recipe hands it to the learner, so no
    learner branches on the dataset.

    Attributes:
        name: ``classification`` or ``regression`` (what capabilities name).
        metric: the metric's tag suffix (``train/<metric>``, ``test/<metric>``).
        higher_is_better: direction of the metric, for picking the best validation.
        loss: ``(predictions, targets) -> scalar`` minimised in the inner and outer loops.
        score: ``(predictions, targets) -> scalar`` reported as the metric.
        outputs: outputs of a learner's head; ``None`` means one per way (class).
    """

    name: str
    metric: str
    higher_is_better: bool
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    outputs: int | None

    def head_outputs(self, ways: int) -> int:
        return ways if self.outputs is None else self.outputs


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``(n, ways)`` logits whose argmax equals ``labels`` ``(n,)``."""
    return (logits.argmax(dim=-1) == labels).float().mean()


def mean_squared_error(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over ``(n, outputs)`` of the squared differences (the MAML paper's regression loss)."""
    return F.mse_loss(predictions, targets)


CLASSIFICATION = TaskKind("classification", "acc", True, F.cross_entropy, accuracy, outputs=None)
"""Few-shot classification: cross-entropy, accuracy, a ``ways``-way head."""
REGRESSION = TaskKind("regression", "mse", False, mean_squared_error, mean_squared_error, outputs=1)
"""Few-shot regression of one target (e.g. sinusoids): MSE loss and metric, one output."""

TASK_KINDS = {kind.name: kind for kind in (CLASSIFICATION, REGRESSION)}
