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

import torch
from torch import nn

from metarun.algorithms.base import (
    CLASSIFICATION,
    BatchNormMode,
    Predictor,
    TaskKind,
    require_classification,
)
from metarun.data.episodes import Episode


def member_checkpoint(path: str) -> Path:
    """A run folder's ``checkpoints/best.pt`` (``last.pt`` if it has none), or ``path``
    itself when it is a file."""
    target = Path(path).expanduser().resolve()
    if target.is_file():
        return target
    for name in ("best.pt", "last.pt"):
        if (target / "checkpoints" / name).is_file():
            return target / "checkpoints" / name
    raise FileNotFoundError(
        f"ensemble member {path}: no checkpoints/best.pt or checkpoints/last.pt there. Give "
        f"a run folder that metarun wrote, or a checkpoint file (.pt)."
    )


class Ensemble(nn.Module):
    """The mean class probabilities of trained runs.

    Args:
        members: run folders or checkpoint files (at least two).
        split: the dataset split every member must have been trained on.
        image_size: the image side every member must have been trained at.
        backbone: the runner's backbone of ``model``; unused (each member has its own).
        task: the dataset's task kind; classification only.
    """

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
        from omegaconf import OmegaConf

        from metarun import checkpoint

        if len(members) < 2:
            raise ValueError(
                f"algo.members lists {len(members)} run(s); an ensemble needs at least two."
            )
        models = []
        for path in members:
            ckpt_path = member_checkpoint(path)
            cfg = OmegaConf.create(checkpoint.load(ckpt_path)["config"])
            trained_on = (cfg.dataset.get("split"), cfg.dataset.get("image_size"))
            if trained_on != (split, image_size):
                raise ValueError(
                    f"ensemble member {ckpt_path} was trained with dataset.split="
                    f"{trained_on[0]} at image_size={trained_on[1]}, the ensemble runs with "
                    f"split={split} at {image_size}: members must match the ensemble's "
                    f"dataset (a member trained on other classes may have seen its test "
                    f"classes). Set dataset.split and dataset.image_size to the members'."
                )
            size = int(cfg.dataset.image_size)
            member_backbone = instantiate(cfg.model)(input_shape=(1, size, size))
            model = instantiate(cfg.algo)(backbone=member_backbone, task=task)
            model.load_state_dict(checkpoint.load(ckpt_path)["algo"])
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
            "an ensemble of trained runs is not trained itself: set train.iterations=0 "
            "(experiment=lake_ensemble does)."
        )

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        predictors = [member.adapt(support_x, support_y) for member in self.members]
        log_n = math.log(len(predictors))

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            """Log of the mean softmax probability: ``(n_query, ways)``."""
            logp = torch.stack([p(query_x).float().log_softmax(dim=-1) for p in predictors])
            return torch.logsumexp(logp, dim=0) - log_n

        return predict
