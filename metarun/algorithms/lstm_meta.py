"""The LSTM meta-learner (Ravi & Larochelle, "Optimization as a Model for Few-Shot
Learning", ICLR 2017).

The inner loop's update rule is a coordinate-wise two-layer LSTM, shared by every weight of
the learner. The first layer is an ordinary LSTM cell whose input, per coordinate, is the
preprocessed gradient and the preprocessed support loss (Andrychowicz et al.'s log/sign
encoding, :func:`~metarun.algorithms.unrolled.preprocess`). The second layer is the
meta-learner cell: its cell state *is* the learner's flattened weights ``theta``, and its
update is gradient descent with a learned input gate (the learning rate) and forget gate
(a shrinkage of the weights)::

    f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F)
    i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I)
    theta_t = f_t * theta_{t-1} - i_t * grad_t

where ``h_t`` is the first layer's output for that coordinate (an encoding of the gradient
and the loss). The initial cell state, the learner's initial weights, is meta-learned with
the LSTM. The learner is trained through the unrolled episode: ``adaptation_steps`` updates
on the support set, then the query loss back-propagated to the LSTM and the initial weights.
``first_order`` (the paper's choice) treats the gradient and loss inputs as constants.

As in the paper, ``b_F`` starts large (``f ~ 1``: keep the weights) and ``b_I`` small (a
small learning rate), and batch norm in the learner uses batch statistics
(``bn_mode: transductive``). The meta-gradient's norm clipping at 0.25 of the authors'
released code is the runner's ``train.grad_clip`` (set by
``experiment=lstm_meta_omniglot_5w1s``). Not reproduced: the paper's several support
mini-batches per step (each step here uses the whole support set).
"""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.base import BatchNormMode
from metarun.algorithms.unrolled import State, UnrolledLearner, preprocess
from metarun.tasks import CLASSIFICATION, TaskKind

INPUT_FEATURES = 4  # preprocessed gradient (2) and preprocessed loss (2)


class LSTMMetaLearner(UnrolledLearner):
    """Ravi & Larochelle's meta-learner around ``backbone`` followed by a linear head.

    Args:
        backbone: feature extractor with an ``out_features`` attribute.
        ways: classes per episode (the head's outputs for classification).
        adaptation_steps: inner steps (meta-learner updates) in meta-training.
        test_adaptation_steps: inner steps at evaluation.
        hidden_size: width of the first LSTM layer (the paper uses 20).
        first_order: feed the gradient and loss as constants (no second derivatives).
        bn_mode: see :class:`BatchNormMode`; the paper's setting is ``transductive``.
        task: the loss, metric and head size of the dataset's tasks (given by the runner).
        forget_bias: ``[low, high]`` of the uniform start of ``b_F``.
        input_bias: ``[low, high]`` of the uniform start of ``b_I``.

    Attributes:
        input_lstm: the first layer, an ``nn.LSTMCell(4, hidden_size)`` run with one row
            per coordinate of ``theta``.
        forget_weight, input_weight: ``(hidden_size + 2,)`` weights of the two gates over
            ``[h_t, theta_{t-1}, previous gate]``; ``forget_bias``, ``input_bias``: ``()``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        adaptation_steps: int,
        test_adaptation_steps: int,
        hidden_size: int = 20,
        first_order: bool = True,
        bn_mode: BatchNormMode | str = BatchNormMode.transductive,
        task: TaskKind = CLASSIFICATION,
        forget_bias: tuple[float, float] = (4.0, 6.0),
        input_bias: tuple[float, float] = (-5.0, -4.0),
    ):
        super().__init__(
            backbone, ways, adaptation_steps, test_adaptation_steps, first_order, bn_mode, task
        )
        self.input_lstm = nn.LSTMCell(INPUT_FEATURES, hidden_size)
        self.forget_weight = nn.Parameter(torch.empty(hidden_size + 2).uniform_(-0.01, 0.01))
        self.input_weight = nn.Parameter(torch.empty(hidden_size + 2).uniform_(-0.01, 0.01))
        self.forget_bias = nn.Parameter(torch.empty(()).uniform_(*forget_bias))
        self.input_bias = nn.Parameter(torch.empty(()).uniform_(*input_bias))

    def init_state(self, theta: torch.Tensor) -> State:
        """Zero hidden and cell states ``(n, hidden_size)`` and zero previous gates
        ``(n,)``."""
        n, hidden = theta.numel(), self.input_lstm.hidden_size
        zeros = theta.new_zeros
        return {"h": zeros(n, hidden), "c": zeros(n, hidden), "f": zeros(n), "i": zeros(n)}

    def update(
        self, theta: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: State, step: int
    ) -> tuple[torch.Tensor, State]:
        """``theta_t = f_t * theta_{t-1} - i_t * grad_t`` with the gates of the module
        docstring; every tensor is ``(n,)`` or ``(n, features)``, one row per weight."""
        n = theta.numel()
        inputs = torch.cat([preprocess(grad), preprocess(loss).expand(n, 2)], dim=1)  # (n, 4)
        h, c = self.input_lstm(inputs, (state["h"], state["c"]))
        f = torch.sigmoid(
            self._gate_input(h, theta, state["f"]) @ self.forget_weight + self.forget_bias
        )
        i = torch.sigmoid(
            self._gate_input(h, theta, state["i"]) @ self.input_weight + self.input_bias
        )
        return f * theta - i * grad, {"h": h, "c": c, "f": f, "i": i}

    @staticmethod
    def _gate_input(h: torch.Tensor, theta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``[h_t, theta_{t-1}, gate_{t-1}]``: ``(n, hidden_size + 2)``."""
        return torch.cat([h, theta.unsqueeze(1), gate.unsqueeze(1)], dim=1)
