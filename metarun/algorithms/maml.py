"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

The inner loop takes ``adaptation_steps`` SGD steps of size ``fast_lr`` on the support
loss, with the model's parameters held in a dict and applied by
``torch.func.functional_call`` (no module is modified). The meta-gradient flows through
the inner steps (second order); ``first_order=True`` drops the second-order terms
(FOMAML), so the query gradient at the adapted weights is applied to the initial weights.

The loss and the metric come from the dataset's :class:`~metarun.algorithms.base.TaskKind`
(cross-entropy and accuracy for classification, MSE for regression such as sinusoids).
Meta-SGD (:mod:`metarun.algorithms.metasgd`) changes only :meth:`MAML.inner_update`.
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
    linear_head,
)
from metarun.algorithms.vmap_engine import stateless_copy, vmap_meta_loss
from metarun.data.episodes import Episode
from metarun.tasks import CLASSIFICATION, TaskKind

Params = dict[str, torch.Tensor]
ENGINES = ("loop", "vmap", "l2l")


class MAML(nn.Module):
    """MAML / FOMAML on ``backbone`` followed by a linear head.

    Args:
        backbone: feature extractor with an ``out_features`` attribute.
        ways: classes per episode (the head's outputs for classification); training and
            evaluation episodes must both have this many.
        fast_lr: inner-loop step size.
        adaptation_steps: inner steps in meta-training.
        test_adaptation_steps: inner steps at evaluation.
        first_order: FOMAML (no second-order terms).
        bn_mode: see :class:`BatchNormMode`; the paper's code is ``transductive``.
        task: the loss, metric and head size of the dataset's tasks (given by the runner).
        engine: ``loop`` adapts to the tasks of a meta-batch one after another; ``vmap``
            adapts to all of them in one vectorised call
            (:mod:`metarun.algorithms.vmap_engine`; ``meta_loss`` then takes a stacked
            meta-batch); ``l2l`` runs each task through learn2learn's own implementation
            (:func:`metarun.algorithms.l2l_engine.l2l_meta_loss`). Same meta-gradient;
            which is fastest depends on the hardware and the task size
            (``docs/BENCHMARKS.md``).
    """

    capabilities = Capabilities(
        task_kinds=BOTH_KINDS,
        engines=ENGINES,
        engine_requires={"vmap": {"bn_mode": "transductive"}},
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
        engine: str = "loop",
    ):
        super().__init__()
        head = linear_head(backbone, task.head_outputs(ways))
        self.model = nn.Sequential(backbone, head)
        self.ways = ways
        self.fast_lr = fast_lr
        self.adaptation_steps = adaptation_steps
        self.test_adaptation_steps = test_adaptation_steps
        self.first_order = first_order
        self.bn_mode = BatchNormMode(bn_mode)
        self.task = task
        if engine not in ENGINES:
            raise ValueError(f"unknown algo.engine {engine!r}; choose one of {ENGINES}")
        self.engine = engine
        self.stacks_tasks = engine == "vmap"  # the runner hands over a stacked meta-batch
        if engine != "loop":
            _check_engine(self)
        if engine == "vmap":
            # Not a submodule: a structural copy run with this module's parameters.
            object.__setattr__(self, "_vmap_network", stateless_copy(self.model))
        if engine == "l2l":
            from metarun.data.learn2learn import import_learn2learn

            import_learn2learn()  # fails now, with the install command, if it is missing

    def inner_update(self, params: Params, grads: tuple[torch.Tensor, ...], step: int) -> Params:
        """One inner step from ``params`` given their support-loss ``grads``: plain SGD,
        ``p - fast_lr * g``. ``step`` counts from 0 (used by subclasses)."""
        return {
            name: p - self.fast_lr * g for (name, p), g in zip(params.items(), grads, strict=True)
        }

    def adapted_params(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        create_graph: bool,
        buffers: Params,
    ) -> Params:
        """Runs ``steps`` inner steps on ``(x, y)`` from the current weights.

        With ``create_graph=True`` the result is a differentiable function of the initial
        weights (second order); otherwise the inner gradients are treated as constants.
        """
        return self.inner_loop(
            self.model, dict(self.model.named_parameters()), buffers, x, y, steps, create_graph
        )

    def inner_loop(
        self,
        module: nn.Module,
        params: Params,
        buffers: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        create_graph: bool,
    ) -> Params:
        """``steps`` inner steps on the task loss of ``module`` run with ``params``."""
        for step in range(steps):
            loss = self.task.loss(functional_call(module, (params, buffers), (x,)), y)
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)
            params = self.inner_update(params, grads, step)
        return params

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ways(episode.ways)
        if self.engine == "vmap":  # a stacked meta-batch: (tasks, n, C, H, W)
            return vmap_meta_loss(self, self._vmap_network, episode)
        if self.engine == "l2l":
            from metarun.algorithms.l2l_engine import l2l_meta_loss

            return l2l_meta_loss(self, episode)
        buffers = dict(self.model.named_buffers())
        params = self.adapted_params(
            episode.support_x,
            episode.support_y,
            self.adaptation_steps,
            create_graph=not self.first_order,
            buffers=buffers,
        )
        predictions = functional_call(self.model, (params, buffers), (episode.query_x,))
        return (
            self.task.loss(predictions, episode.query_y),
            self.task.score(predictions, episode.query_y),
        )

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """See :class:`MetaLearner`; ``steps`` overrides ``test_adaptation_steps`` (0 gives
        the meta-learned initialisation itself)."""
        if self.task.outputs is None:
            self._check_ways(int(support_y.max()) + 1)
        steps = self.test_adaptation_steps if steps is None else steps
        buffers = buffer_copies(self.model)
        with torch.enable_grad(), batch_norm_mode(self.model, self.bn_mode):
            params = self.adapted_params(support_x, support_y, steps, False, buffers)
        params = {name: p.detach() for name, p in params.items()}

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self.model, self.bn_mode):
                return functional_call(self.model, (params, buffers), (query_x,))

        return predict

    def _check_ways(self, ways: int) -> None:
        if self.task.outputs is None and ways != self.ways:
            raise ValueError(
                f"{type(self).__name__}'s head has {self.ways} outputs but the episode has "
                f"{ways} ways: train.ways and eval.ways must be equal for this algorithm."
            )


def _check_engine(algo: MAML) -> None:
    """Raises a ``ValueError`` naming the fix when ``algo.engine`` cannot reproduce what
    ``algo`` computes: both other engines redo MAML's inner loop and normalise each task
    with its own batch statistics (no running statistics are kept)."""
    if type(algo).meta_loss is not MAML.meta_loss:
        raise ValueError(
            f"{type(algo).__name__} computes its meta-loss its own way, which "
            f"algo.engine={algo.engine} does not reproduce; use algo.engine=loop."
        )
    if algo.bn_mode != BatchNormMode.transductive:
        raise ValueError(
            f"algo.engine={algo.engine} keeps no batch-norm running statistics, so it needs "
            f"algo.bn_mode=transductive (got {algo.bn_mode.value}); use algo.engine=loop "
            f"for bn_mode=running."
        )
