"""The surface every algorithm shares, and small helpers they use."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from metarun.data.episodes import Episode
from metarun.options import BatchNormMode
from metarun.tasks import CLASSIFICATION, TaskKind

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps query inputs ``(n_query, *input_shape)`` to predictions: logits ``(n_query, ways)``
for classification, targets ``(n_query, outputs)`` for regression."""


@dataclass(frozen=True)
class Capabilities:
    """What an algorithm supports, declared on its class (``capabilities = Capabilities(...)``)
    and held against the config before any data is loaded
    (:func:`metarun.checks.check_meta_learning`).

    Attributes:
        task_kinds: the :class:`~metarun.tasks.TaskKind` names it learns.
        bn_modes: the values of ``algo.bn_mode`` it implements.
        engines: the values of ``algo.engine`` (``loop`` for algorithms without the option).
        engine_requires: for an engine, the ``algo.*`` values it needs (``{"vmap":
            {"bn_mode": "transductive"}}``).
        adaptation_steps: ``adapt(x, y, steps=k)`` takes a step count (``eval.report_steps``).
        fixed_ways: its output has ``algo.ways`` classes: train and eval ways must equal it.
        fixed_shots: its input sequence is sized by ``algo.shots``: train and eval shots too.
        feature_maps: it takes a backbone that keeps feature maps (``model.flatten=false``).
        episode_metrics: it reports per-episode metrics (:meth:`MetaLearner.episode_metrics`).
        inner_loop_through_backbone: its inner loop differentiates through the backbone, so
            with ``algo.first_order=false`` the backbone needs a double backward.
        trainable: it is meta-trained, so ``train.iterations >= 1``; ``False`` for one that
            has nothing to train (``algo=ensemble`` of trained runs), which runs with
            ``train.iterations=0`` only: validated once and tested.
    """

    task_kinds: tuple[str, ...] = ("classification",)
    bn_modes: tuple[str, ...] = ("transductive", "running")
    engines: tuple[str, ...] = ("loop",)
    engine_requires: dict[str, dict[str, str]] = field(default_factory=dict)
    adaptation_steps: bool = False
    fixed_ways: bool = False
    fixed_shots: bool = False
    feature_maps: bool = False
    episode_metrics: bool = False
    inner_loop_through_backbone: bool = False
    trainable: bool = True


BOTH_KINDS = ("classification", "regression")


@runtime_checkable
class MetaLearner(Protocol):
    """What the recipes need from an algorithm (implemented by ``nn.Module`` subclasses).

    ``capabilities`` (on the class) declares what it supports. ``stacks_tasks`` says whether
    :meth:`meta_loss` takes the whole meta-batch stacked by :meth:`Episode.stack` (a leading
    task dimension: MAML's ``vmap`` engine, MANN) instead of one episode at a time.
    Algorithms that declare ``adaptation_steps`` take ``adapt(..., steps=k)``; those that
    declare ``episode_metrics`` have an ``episode_metrics(episode) -> dict[str, float]``."""

    capabilities: Capabilities
    stacks_tasks: bool
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
