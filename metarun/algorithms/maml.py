"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

The inner loop takes ``adaptation_steps`` SGD steps of size ``fast_lr`` on the support
loss, with the model's parameters held in a dict and applied by
``torch.func.functional_call`` (no module is modified). The meta-gradient flows through
the inner steps (second order); ``first_order=True`` drops the second-order terms
(FOMAML), so the query gradient at the adapted weights is applied to the initial weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metarun.algorithms.base import (
    BatchNormMode,
    Predictor,
    accuracy,
    batch_norm_mode,
    buffer_copies,
)
from metarun.data.episodes import Episode

Params = dict[str, torch.Tensor]


class MAML(nn.Module):
    """MAML / FOMAML on ``backbone`` followed by a linear ``ways``-way head.

    Args:
        backbone: feature extractor with an ``out_features`` attribute.
        ways: classes per episode (the head's outputs); training and evaluation episodes
            must both have this many.
        fast_lr: inner-loop step size.
        adaptation_steps: inner steps in meta-training.
        test_adaptation_steps: inner steps at evaluation.
        first_order: FOMAML (no second-order terms).
        bn_mode: see :class:`BatchNormMode`; the paper's code is ``transductive``.
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
    ):
        super().__init__()
        self.model = nn.Sequential(backbone, nn.Linear(backbone.out_features, ways))
        self.ways = ways
        self.fast_lr = fast_lr
        self.adaptation_steps = adaptation_steps
        self.test_adaptation_steps = test_adaptation_steps
        self.first_order = first_order
        self.bn_mode = BatchNormMode(bn_mode)

    def adapted_params(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        create_graph: bool,
        buffers: Params,
    ) -> Params:
        """Runs ``steps`` inner SGD steps on ``(x, y)`` from the current weights.

        With ``create_graph=True`` the result is a differentiable function of the initial
        weights (second order); otherwise the inner gradients are treated as constants.
        """
        params: Params = dict(self.model.named_parameters())
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(self.model, (params, buffers), (x,)), y)
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)
            updates = zip(params.items(), grads, strict=True)
            params = {name: p - self.fast_lr * g for (name, p), g in updates}
        return params

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ways(episode.ways)
        buffers = dict(self.model.named_buffers())
        params = self.adapted_params(
            episode.support_x,
            episode.support_y,
            self.adaptation_steps,
            create_graph=not self.first_order,
            buffers=buffers,
        )
        logits = functional_call(self.model, (params, buffers), (episode.query_x,))
        return F.cross_entropy(logits, episode.query_y), accuracy(logits, episode.query_y)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        self._check_ways(int(support_y.max()) + 1)
        buffers = buffer_copies(self.model)
        with torch.enable_grad(), batch_norm_mode(self.model, self.bn_mode):
            params = self.adapted_params(
                support_x, support_y, self.test_adaptation_steps, False, buffers
            )
        params = {name: p.detach() for name, p in params.items()}

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self.model, self.bn_mode):
                return functional_call(self.model, (params, buffers), (query_x,))

        return predict

    def _check_ways(self, ways: int) -> None:
        if ways != self.ways:
            raise ValueError(
                f"MAML's head has {self.ways} outputs but the episode has {ways} ways: "
                f"train.ways and eval.ways must be equal for MAML."
            )
