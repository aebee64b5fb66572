"""Structured config schemas of the ``scenario`` group and of the continual ``algo`` options,
registered with the others by :data:`metarun.config.SCHEMAS`. Standard library and
OmegaConf only, so ``metarun --help`` stays fast."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from metarun.options import at_least, choice, positive


@dataclass
class SplitMNISTConfig:
    _target_: str = "metarun.continual.scenarios.split_mnist"
    root: str | None = MISSING
    incremental: str = choice("class", "task")
    classes_per_task: int = at_least(1)
    shuffle_classes: bool = MISSING
    seed: int = at_least(0)
    epochs: int = at_least(1)
    batch_size: int = at_least(1)
    train_per_task: int | None = at_least(1, None)
    variant: str = choice("mnist", "fashion_mnist")
    download: bool = MISSING


@dataclass
class PermutedMNISTConfig:
    _target_: str = "metarun.continual.scenarios.permuted_mnist"
    root: str | None = MISSING
    n_tasks: int = at_least(1)
    seed: int = at_least(0)
    epochs: int = at_least(1)
    batch_size: int = at_least(1)
    train_per_task: int | None = at_least(1, None)
    variant: str = choice("mnist", "fashion_mnist")
    download: bool = MISSING


@dataclass
class OmniglotContinualConfig:
    _target_: str = "metarun.continual.scenarios.omniglot_continual"
    root: str | None = MISSING
    cache_dir: str | None = MISSING
    n_classes: int = at_least(1)
    train_shots: int = at_least(1)
    seed: int = at_least(0)
    epochs: int = at_least(1)
    batch_size: int = at_least(1)
    image_size: int = at_least(4)
    download: bool = MISSING


@dataclass
class SinusoidStreamConfig:
    _target_: str = "metarun.continual.scenarios.sinusoid_stream"
    n_tasks: int = at_least(1)  # functions in the stream (and width of the one-hot id)
    train_per_task: int = at_least(1)
    test_per_task: int = at_least(1)
    meta_functions: int = at_least(0)  # OML's meta-training set; 0 for none
    amplitude: list[float] = MISSING  # [low, high]
    phase: list[float] = MISSING  # [low, high], radians
    x_range: list[float] = MISSING  # [low, high]
    seed: int = at_least(0)
    epochs: int = at_least(1)
    batch_size: int = at_least(1)


@dataclass
class NaiveConfig:
    _target_: str = "metarun.continual.methods.Naive"
    _partial_: bool = True
    lr: float = positive()


@dataclass
class JointConfig(NaiveConfig):
    _target_: str = "metarun.continual.methods.Joint"


@dataclass
class ERConfig:
    _target_: str = "metarun.continual.methods.ExperienceReplay"
    _partial_: bool = True
    lr: float = positive()
    buffer_size: int = at_least(1)
    replay_batch_size: int = at_least(1)


@dataclass
class EWCConfig:
    _target_: str = "metarun.continual.methods.EWC"
    _partial_: bool = True
    lr: float = positive()
    ewc_lambda: float = at_least(0.0)
    fisher_samples: int = at_least(1)


@dataclass
class OMLConfig:
    _target_: str = "metarun.continual.methods.OML"
    _partial_: bool = True
    fast_lr: float = positive()
    meta_lr: float = positive()
    meta_iterations: int = at_least(0)
    trajectory_classes: int = at_least(1)
    trajectory_shots: int = at_least(1)
    query_shots: int = at_least(0)
    first_order: bool = MISSING


@dataclass
class LaMAMLConfig:
    _target_: str = "metarun.continual.methods.LaMAML"
    _partial_: bool = True
    fast_lr: float = positive()
    meta_lr: float = positive()
    adaptation_steps: int = at_least(1)
    buffer_size: int = at_least(1)
    replay_batch_size: int = at_least(1)
    first_order: bool = MISSING


SCENARIO_SCHEMAS: dict[str, type] = {
    "split_mnist": SplitMNISTConfig,
    "permuted_mnist": PermutedMNISTConfig,
    "omniglot_continual": OmniglotContinualConfig,
    "sinusoid_stream": SinusoidStreamConfig,
}
ALGO_SCHEMAS: dict[str, type] = {
    "naive": NaiveConfig,
    "joint": JointConfig,
    "er": ERConfig,
    "ewc": EWCConfig,
    "oml": OMLConfig,
    "lamaml": LaMAMLConfig,
}
