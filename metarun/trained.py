"""The one place a meta-learner is built from a config, for a new run or from a checkpoint.

``metarun.load(RUN)`` (:func:`load`) returns a trained run's algorithm ready to adapt to new
tasks; ``metarun test=RUN`` and ``metarun-lake`` go through the same :func:`read` and
:func:`build_learner`, so a trained model is rebuilt one way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from metarun import checkpoint
from metarun.errors import ConfigError
from metarun.hardware import Hardware
from metarun.tasks import TASK_KINDS, TaskKind


def build_learner(
    cfg: DictConfig, hardware: Hardware, input_shape: tuple[int, ...], task: TaskKind
) -> Any:
    """The algorithm of ``cfg.algo`` on the backbone of ``cfg.model`` (compiled if
    ``hardware.compile``), for inputs of ``input_shape`` and tasks of kind ``task``, on
    ``hardware``'s device."""
    backbone = hardware.compile_backbone(instantiate(cfg.model)(input_shape=input_shape))
    return hardware.prepare(instantiate(cfg.algo)(backbone=backbone, task=task))


@dataclass
class Saved:
    """A checkpoint read from disk with its checked config.

    Attributes:
        path: the checkpoint file.
        state: what :func:`metarun.checkpoint.load` returned.
        config: its config, every ``_target_`` checked to be metarun's own.
    """

    path: Path
    state: dict[str, Any]
    config: DictConfig

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])

    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input; read from the dataset for checkpoints older than the
        field (which loads the dataset)."""
        if "input_shape" in self.state:
            return tuple(int(n) for n in self.state["input_shape"])
        return tuple(instantiate(self.config.dataset).image_shape)

    def task(self) -> TaskKind:
        if "task" in self.state:
            return TASK_KINDS[self.state["task"]]
        from metarun.checks import task_of_dataset

        return task_of_dataset(self.config.dataset)


def read(target: Path | str) -> Saved:
    """The checkpoint of ``target`` (a run folder: its ``best.pt``, else ``last.pt``; or a
    ``.pt`` file) with its config checked. A task-stream run is refused: its learner is not
    a meta-learner."""
    path = checkpoint.pick(Path(target))
    state = checkpoint.load(path)
    config = checkpoint.saved_config(state, path)
    if state.get("recipe") == "continual" or config.get("scenario") is not None:
        raise ConfigError(
            f"{path} is a task-stream (lifelong) run: its results.json holds its evaluation "
            f"after every task; this needs a meta-learning run."
        )
    return Saved(path, state, config)


@dataclass
class Trained:
    """A trained meta-learner, ready to ``adapt`` to new tasks.

    Attributes:
        algo: the algorithm (in eval mode) with the checkpoint's weights.
        config: the run's config.
        task: the task kind it was trained on.
        input_shape: the shape of one input it takes.
        checkpoint: the file it was loaded from.
        iteration: the training iteration of that checkpoint.
    """

    algo: Any
    config: DictConfig
    task: TaskKind
    input_shape: tuple[int, ...]
    checkpoint: Path
    iteration: int


def load(target: Path | str, device: str = "auto", hardware: Hardware | None = None) -> Trained:
    """The trained algorithm of a run folder (``best.pt``, else ``last.pt``) or of a
    checkpoint file, on ``device`` (or ``hardware``; the run's own precision settings are
    not reused, as the machine may differ)."""
    saved = read(target)
    hardware = hardware or Hardware(device)
    algo = restore(saved, hardware)
    return Trained(
        algo, saved.config, saved.task(), saved.input_shape(), saved.path, saved.iteration
    )


def restore(saved: Saved, hardware: Hardware, config: DictConfig | None = None) -> Any:
    """The algorithm of ``config`` (the saved one by default) with the saved weights, in
    eval mode on ``hardware``."""
    cfg = config if config is not None else saved.config
    algo = build_learner(cfg, hardware, saved.input_shape(), saved.task())
    algo.load_state_dict(saved.state["algo"])
    return algo.eval()
