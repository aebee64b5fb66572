"""The one place a meta-learner is built from a config, for a new run or from a checkpoint.

``metarun.load(RUN)`` (:func:`load`) returns a trained run's algorithm ready to adapt to new
tasks (:meth:`Trained.predict`); ``metarun test=RUN``, ``metarun-lake`` and ``metarun
adapt`` go through the same :func:`read` and :func:`build_learner`, so a trained model is
rebuilt one way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
        hardware: the device and precision it computes on.
    """

    algo: Any
    config: DictConfig
    task: TaskKind
    input_shape: tuple[int, ...]
    checkpoint: Path
    iteration: int
    hardware: Hardware

    @property
    def fixed_ways(self) -> int | None:
        """The number of classes every support set must have (the algorithm's output size,
        ``algo.ways``, for algorithms that declare ``fixed_ways``), else ``None``."""
        if type(self.algo).capabilities.fixed_ways and self.task.outputs is None:
            return int(self.config.algo.get("ways", self.config.train.ways))
        return None

    @property
    def fixed_shots(self) -> int | None:
        """The number of examples every support class must have (``algo.shots``, for
        algorithms that declare ``fixed_shots``: SNAIL's sequence length), else ``None``."""
        if type(self.algo).capabilities.fixed_shots:
            return int(self.config.algo.get("shots", self.config.train.shots))
        return None

    def check_support(self, counts: Sequence[int], names: Sequence[str] | None = None) -> None:
        """Refuses a classification support set that the algorithm cannot take, before
        anything is computed: a class without examples, a number of classes other than a
        fixed output's, a number of examples per class other than a fixed sequence's.
        ``counts`` holds each class's number of examples, in label order; ``names`` their
        names, for the message.

        Raises:
            ValueError: naming the problem, the class and the fix.
        """
        names = list(names) if names is not None else [f"label {i}" for i in range(len(counts))]
        algo = type(self.algo).__name__
        empty = [name for name, n in zip(names, counts, strict=True) if n == 0]
        if empty:
            raise ValueError(
                f"the support set's class {empty[0]} has no examples"
                f"{f' (and {len(empty) - 1} more classes)' if len(empty) > 1 else ''}: "
                f"every class needs at least one. Add examples to it, or remove it."
            )
        ways = self.fixed_ways
        if ways is not None and len(counts) != ways:
            raise ValueError(
                f"{algo} was trained with a {ways}-way output (algo.ways={ways}), so it "
                f"takes support sets of exactly {ways} classes, and this one has "
                f"{len(counts)} ({', '.join(names[:10])}{' ...' if len(names) > 10 else ''}). "
                f"Give {ways} classes, or train a run with train.ways={len(counts)} (or an "
                f"algorithm without a fixed output size, such as algo=protonet)."
            )
        shots = self.fixed_shots
        wrong = [(n, c) for n, c in zip(names, counts, strict=True) if c != shots]
        if shots is not None and wrong:
            listed = ", ".join(f"{n} ({c})" for n, c in wrong[:5])
            raise ValueError(
                f"{algo}'s sequences are sized for {shots} examples per class (algo.shots="
                f"{shots}), so every support class needs exactly {shots}; {len(wrong)} do "
                f"not (examples in brackets): {listed}. Give {shots} per class."
            )

    def predict(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Adapts to a support set and predicts the queries, as the test episodes do
        (:func:`metarun.evaluation.predict_queries`): on :attr:`hardware`'s device and in
        its precision, uint8 inputs scaled to [0, 1], all queries in one batch.

        Args:
            support_x: ``(n_support, *input_shape)`` uint8 (images, scaled to [0, 1]) or
                float inputs, prepared as the run's dataset prepared its own.
            support_y: ``(n_support,)`` labels ``0 .. ways-1`` (classification) or
                ``(n_support, outputs)`` targets (regression).
            query_x: ``(n_query, *input_shape)`` inputs.
            steps: adaptation steps, for algorithms that declare ``adaptation_steps``
                (default: the run's ``test_adaptation_steps``).

        Returns:
            ``(n_query, ways)`` class scores (the algorithm's logits; the prediction is the
            highest) or ``(n_query, outputs)`` predicted targets, float32 on the CPU.

        Raises:
            ValueError: inputs of another shape than :attr:`input_shape`, or a support set
                the algorithm cannot take (:meth:`check_support`).
        """
        from metarun.data.episodes import Episode
        from metarun.evaluation import predict_queries

        for name, x in (("support_x", support_x), ("query_x", query_x)):
            if tuple(x.shape[1:]) != self.input_shape or x.shape[0] == 0:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}; this run takes (n, "
                    f"{', '.join(map(str, self.input_shape))}) with n >= 1"
                )
        if len(support_y) != len(support_x):
            raise ValueError(f"{len(support_x)} support inputs but {len(support_y)} targets")
        classes = torch.zeros(1, dtype=torch.long)
        if self.task.outputs is None:
            support_y = support_y.long()
            self.check_support(torch.bincount(support_y).tolist())
            classes = torch.arange(int(support_y.max()) + 1)
        query_y = torch.zeros(len(query_x), dtype=torch.long)  # unused: nothing is scored
        episode = Episode(support_x, support_y, query_x, query_y, classes)
        hardware = self.hardware
        episode = episode.to(hardware.device, hardware.memory_format)
        self.algo.eval()
        return predict_queries(self.algo, episode, hardware, steps).float().cpu()


def load(target: Path | str, device: str = "auto", hardware: Hardware | None = None) -> Trained:
    """The trained algorithm of a run folder (``best.pt``, else ``last.pt``) or of a
    checkpoint file, on ``device`` (or ``hardware``; the run's own precision settings are
    not reused, as the machine may differ)."""
    saved = read(target)
    hardware = hardware or Hardware(device)
    algo = restore(saved, hardware)
    return Trained(
        algo,
        saved.config,
        saved.task(),
        saved.input_shape(),
        saved.path,
        saved.iteration,
        hardware,
    )


def restore(saved: Saved, hardware: Hardware, config: DictConfig | None = None) -> Any:
    """The algorithm of ``config`` (the saved one by default) with the saved weights, in
    eval mode on ``hardware``."""
    cfg = config if config is not None else saved.config
    algo = build_learner(cfg, hardware, saved.input_shape(), saved.task())
    algo.load_state_dict(saved.state["algo"])
    return algo.eval()
