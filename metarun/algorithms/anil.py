"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature
Reuse? Towards Understanding the Effectiveness of MAML", ICLR 2020).

MAML whose inner loop adapts only the linear head: the body (the backbone) maps the
support and query sets to features once per episode, the head takes ``adaptation_steps``
SGD steps on the support features, and the query loss of the adapted head is
back-propagated through the inner steps into the head's initialisation and through the
features into the body. The body is therefore learned by the outer loop alone.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from metarun.algorithms.base import (
    BOTH_KINDS,
    Capabilities,
    Predictor,
    batch_norm_mode,
    buffer_copies,
)
from metarun.algorithms.maml import MAML, Params
from metarun.data.episodes import Episode


class ANIL(MAML):
    """ANIL: MAML's arguments (see :class:`MAML`), with the inner loop on the head only.

    The model is ``model = Sequential(body, head)``; :attr:`body` and :attr:`head` name
    its two parts.
    """

    capabilities = Capabilities(task_kinds=BOTH_KINDS, adaptation_steps=True, fixed_ways=True)

    @property
    def body(self) -> torch.nn.Module:
        return self.model[0]

    @property
    def head(self) -> torch.nn.Module:
        return self.model[1]

    def adapted_head(
        self, features: torch.Tensor, y: torch.Tensor, steps: int, create_graph: bool
    ) -> Params:
        """The head's weights after ``steps`` inner steps on ``(n, out_features)`` support
        features; the body is not touched."""
        params = dict(self.head.named_parameters())
        return self.inner_loop(self.head, params, {}, features, y, steps, create_graph)

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ways(episode.ways)
        support = self.body(episode.support_x)  # (n_support, out_features)
        head = self.adapted_head(
            support, episode.support_y, self.adaptation_steps, not self.first_order
        )
        predictions = functional_call(self.head, head, (self.body(episode.query_x),))
        return (
            self.task.loss(predictions, episode.query_y),
            self.task.score(predictions, episode.query_y),
        )

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        if self.task.outputs is None:
            self._check_ways(int(support_y.max()) + 1)
        steps = self.test_adaptation_steps if steps is None else steps
        buffers = buffer_copies(self.body)

        def features(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self.body, self.bn_mode):
                return functional_call(self.body, buffers, (x,))

        with torch.enable_grad():
            head = self.adapted_head(features(support_x), support_y, steps, False)
        head = {name: p.detach() for name, p in head.items()}

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return functional_call(self.head, head, (features(query_x),))

        return predict
