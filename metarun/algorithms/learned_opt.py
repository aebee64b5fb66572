"""A learned optimizer for the inner loop (Andrychowicz, Denil, Gomez, Hoffman, Pfau,
Schaul, Shillingford & de Freitas, "Learning to learn by gradient descent by gradient
descent", NeurIPS 2016).

A small coordinate-wise network, shared by every weight of the learner, reads features of
each coordinate's gradient and outputs that coordinate's update, which replaces SGD's
``-fast_lr * grad``::

    theta_{t+1} = theta_t + output_scale * net(features_t)

The features are the preprocessed gradient (log/sign encoding,
:func:`~metarun.algorithms.unrolled.preprocess`) and, with ``momentum_features``, the
preprocessed bias-corrected moving averages of the gradient with decays 0.5, 0.9 and 0.99.
``network: lstm`` is the paper's two-layer LSTM (its hidden states carry the history);
``network: mlp`` is a stateless two-hidden-layer MLP (then the momentum features are its only
memory).

Meta-training unrolls ``adaptation_steps`` updates on a task's support set and minimises the
mean of the query losses after every step (the paper's sum of losses along the trajectory,
measured on held-out points of the task). ``truncation`` cuts the unroll into segments
(truncated BPTT); the paper also drops second derivatives (``first_order``). The learner's
initial weights are meta-learned with the optimizer (``meta_init: true``) or fixed at their
seeded random start (``meta_init: false``), so the optimizer alone does the adapting.
"""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.base import BatchNormMode
from metarun.algorithms.unrolled import State, UnrolledLearner, preprocess
from metarun.tasks import CLASSIFICATION, TaskKind

NETWORKS = ("lstm", "mlp")
MOMENTUM_DECAYS = (0.5, 0.9, 0.99)


class LearnedOptimizer(UnrolledLearner):
    """A coordinate-wise learned update rule around ``backbone`` and a linear head.

    Args:
        backbone: feature extractor with an ``out_features`` attribute.
        ways: classes per episode (the head's outputs for classification).
        adaptation_steps: inner steps unrolled in meta-training.
        test_adaptation_steps: inner steps at evaluation.
        network: ``lstm`` (two LSTM layers) or ``mlp`` (two hidden layers), then a linear
            output per coordinate.
        hidden_size: width of the network's layers (the paper uses 20).
        momentum_features: add the preprocessed moving averages of the gradient.
        output_scale: the network's output is multiplied by this (the paper uses 0.1).
        truncation: steps per truncated-BPTT segment; 0 back-propagates through all.
        meta_init: meta-learn the learner's initial weights; ``false`` keeps them fixed.
        first_order: feed the gradient to the network as a constant (no second derivatives).
        bn_mode: see :class:`BatchNormMode`.
        task: the loss, metric and head size of the dataset's tasks (given by the runner).
    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        adaptation_steps: int,
        test_adaptation_steps: int,
        network: str = "lstm",
        hidden_size: int = 20,
        momentum_features: bool = False,
        output_scale: float = 0.1,
        truncation: int = 0,
        meta_init: bool = True,
        first_order: bool = True,
        bn_mode: BatchNormMode | str = BatchNormMode.transductive,
        task: TaskKind = CLASSIFICATION,
    ):
        if network not in NETWORKS:
            raise ValueError(f"unknown algo.network {network!r}; choose one of {NETWORKS}")
        super().__init__(
            backbone,
            ways,
            adaptation_steps,
            test_adaptation_steps,
            first_order,
            bn_mode,
            task,
            loss_every_step=True,
            truncation=truncation,
        )
        self.network = network
        self.momentum_features = momentum_features
        self.output_scale = output_scale
        self.meta_init = meta_init
        if not meta_init:
            self.model.requires_grad_(False)
        features = 2 * (1 + (len(MOMENTUM_DECAYS) if momentum_features else 0))
        if network == "lstm":
            self.cells = nn.ModuleList(
                [nn.LSTMCell(features, hidden_size), nn.LSTMCell(hidden_size, hidden_size)]
            )
            self.body = None
        else:
            self.cells = None
            self.body = nn.Sequential(
                nn.Linear(features, hidden_size),
                nn.ReLU(),
                nn.Linear(hidden_size, hidden_size),
                nn.ReLU(),
            )
        self.out = nn.Linear(hidden_size, 1)

    def init_state(self, theta: torch.Tensor) -> State:
        """Zero LSTM states ``(n, hidden_size)`` and moving averages ``(n,)``."""
        n, zeros = theta.numel(), theta.new_zeros
        state: State = {}
        if self.cells is not None:
            for layer, cell in enumerate(self.cells):
                state[f"h{layer}"] = zeros(n, cell.hidden_size)
                state[f"c{layer}"] = zeros(n, cell.hidden_size)
        if self.momentum_features:
            for k in range(len(MOMENTUM_DECAYS)):
                state[f"m{k}"] = zeros(n)
        return state

    def update(
        self, theta: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: State, step: int
    ) -> tuple[torch.Tensor, State]:
        """``theta + output_scale * net(features)``, every tensor ``(n,)`` or
        ``(n, features)``, one row per weight; ``loss`` is not used."""
        state = dict(state)
        features = [preprocess(grad)]
        if self.momentum_features:
            for k, beta in enumerate(MOMENTUM_DECAYS):
                state[f"m{k}"] = beta * state[f"m{k}"] + (1 - beta) * grad
                features.append(preprocess(state[f"m{k}"] / (1 - beta ** (step + 1))))
        x = torch.cat(features, dim=1)  # (n, features)
        if self.cells is not None:
            for layer, cell in enumerate(self.cells):
                h, c = cell(x, (state[f"h{layer}"], state[f"c{layer}"]))
                state[f"h{layer}"], state[f"c{layer}"] = h, c
                x = h
        else:
            x = self.body(x)
        return theta + self.output_scale * self.out(x).squeeze(1), state
