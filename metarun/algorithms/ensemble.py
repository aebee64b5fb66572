"""An ensemble of trained runs: the mean of their class probabilities (``algo=ensemble``).

Each member is a trained run (its ``best.pt``, else ``last.pt``) or a checkpoint file of
any classification algorithm. At evaluation every member adapts to the support set
through its own ``adapt`` and the ensemble's logits are the log of the members' mean
softmax probabilities, so its prediction is the class of highest mean probability. Nothing
is trained (``train.iterations=0``): the members' weights are held in the ensemble's state
dict, so its checkpoint is self-contained for evaluation (``metarun test=``,
``metarun-lake``) but rebuilding the members' architectures reads their checkpoints'
configs from ``members``.

All members must have been trained on the ensemble's dataset split and image size (a
member trained on other classes could have seen the ensemble's test classes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from metarun.algorithms.base import (
    BatchNormMode,
    Capabilities,
    Predictor,
    require_classification,
)
from metarun.data.episodes import Episode
from metarun.tasks import CLASSIFICATION, TaskKind


def read_members(
    members: list[str], split: str | None, image_size: int | None
) -> list[tuple[Path, dict[str, Any], DictConfig]]:
    """Each member's checkpoint file, its contents and its checked config (every
    ``_target_`` metarun's own: :func:`metarun.checkpoint.saved_config`). A run folder gives
    its ``checkpoints/best.pt`` (``last.pt`` if it has none). Builds nothing, so the checks
    (:mod:`metarun.checks`) call it before any data is loaded.

    Raises:
        ValueError: fewer than two members, a task-stream run, or a member trained on
            another split or image size.
        FileNotFoundError: a member that is neither a run folder with a checkpoint nor a file.
    """
    from metarun import checkpoint

    if len(members) < 2:
        raise ValueError(
            f"algo.members lists {len(members)} run(s); an ensemble needs at least two."
        )
    read = []
    for member in members:
        try:
            path = checkpoint.pick(Path(member))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"ensemble member {member}: {err}") from None
        state = checkpoint.load(path)
        cfg = checkpoint.saved_config(state, path)
        if state.get("recipe") == "continual" or cfg.get("scenario") is not None:
            raise ValueError(
                f"ensemble member {path} is a task-stream (lifelong) run; members must be "
                f"meta-learning runs."
            )
        trained_on = (cfg.dataset.get("split"), cfg.dataset.get("image_size"))
        if trained_on != (split, image_size):
            raise ValueError(
                f"ensemble member {path} was trained with dataset.split={trained_on[0]} at "
                f"image_size={trained_on[1]}, the ensemble runs with split={split} at "
                f"{image_size}: members must match the ensemble's dataset (a member trained "
                f"on other classes may have seen its test classes). Set dataset.split and "
                f"dataset.image_size to the members'."
            )
        read.append((path, state, cfg))
    return read


class Ensemble(nn.Module):
    """The mean class probabilities of trained runs.

    Args:
        members: run folders or checkpoint files (at least two).
        split: the dataset split every member must have been trained on.
        image_size: the image side every member must have been trained at.
        backbone: the recipe's backbone of ``model``; unused (each member has its own).
        task: the dataset's task kind; classification only.
    """

    # Nothing to train: train.iterations must be 0 (checked before any data is loaded).
    capabilities = Capabilities(trainable=False)
    stacks_tasks = False

    def __init__(
        self,
        members: list[str],
        split: str | None,
        image_size: int | None,
        backbone: nn.Module | None = None,
        task: TaskKind = CLASSIFICATION,
    ):
        require_classification(task, "an ensemble averages class probabilities")
        super().__init__()
        from hydra.utils import instantiate

        models = []
        for _, state, cfg in read_members(members, split, image_size):
            size = int(cfg.dataset.image_size)
            shape = tuple(int(n) for n in state.get("input_shape", (1, size, size)))
            backbone_of_member = instantiate(cfg.model)(input_shape=shape)
            model = instantiate(cfg.algo)(backbone=backbone_of_member, task=task)
            model.load_state_dict(state["algo"])
            models.append(model)
        modes = {m.bn_mode for m in models}
        if len(modes) != 1:
            raise ValueError(
                f"ensemble members evaluate with different bn_mode "
                f"({sorted(m.value for m in modes)}); use members with one batch-norm mode."
            )
        self.members = nn.ModuleList(models)
        self.bn_mode = BatchNormMode(modes.pop())

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(
            "an ensemble of trained runs is not trained itself: set train.iterations=0."
        )

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        predictors = [member.adapt(support_x, support_y) for member in self.members]
        log_n = math.log(len(predictors))

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            """Log of the mean softmax probability: ``(n_query, ways)``."""
            logp = torch.stack([p(query_x).float().log_softmax(dim=-1) for p in predictors])
            return torch.logsumexp(logp, dim=0) - log_n

        return predict
