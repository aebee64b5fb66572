"""Structured config schemas of the ``scenario`` group and of the continual ``algo`` options,
registered with the others by :data:`metarun.config.SCHEMAS`. Standard library and
OmegaConf only, so ``metarun --help`` stays fast."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class SplitMNISTConfig:
    _target_: str = "metarun.continual.scenarios.split_mnist"
    root: str | None = MISSING
    incremental: str = MISSING  # class | task
    classes_per_task: int = MISSING
    shuffle_classes: bool = MISSING
    seed: int = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    train_per_task: int | None = None
    variant: str = MISSING  # mnist | fashion_mnist
    download: bool = MISSING


@dataclass
class PermutedMNISTConfig:
    _target_: str = "metarun.continual.scenarios.permuted_mnist"
    root: str | None = MISSING
    n_tasks: int = MISSING
    seed: int = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    train_per_task: int | None = None
    variant: str = MISSING
    download: bool = MISSING


@dataclass
class OmniglotContinualConfig:
    _target_: str = "metarun.continual.scenarios.omniglot_continual"
    root: str | None = MISSING
    cache_dir: str | None = MISSING
    n_classes: int = MISSING
    train_shots: int = MISSING
    seed: int = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    image_size: int = MISSING
    download: bool = MISSING


@dataclass
class SinusoidStreamConfig:
    _target_: str = "metarun.continual.scenarios.sinusoid_stream"
    n_tasks: int = MISSING  # functions in the stream (and width of the one-hot id)
    train_per_task: int = MISSING
    test_per_task: int = MISSING
    meta_functions: int = MISSING  # OML's meta-training set; 0 for none
    amplitude: list[float] = MISSING  # [low, high]
    phase: list[float] = MISSING  # [low, high], radians
    x_range: list[float] = MISSING  # [low, high]
    seed: int = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING


@dataclass
class NaiveConfig:
    _target_: str = "metarun.continual.methods.Naive"
    _partial_: bool = True
    lr: float = MISSING


@dataclass
class JointConfig(NaiveConfig):
    _target_: str = "metarun.continual.methods.Joint"


@dataclass
class ERConfig:
    _target_: str = "metarun.continual.methods.ExperienceReplay"
    _partial_: bool = True
    lr: float = MISSING
    buffer_size: int = MISSING
    replay_batch_size: int = MISSING


@dataclass
class EWCConfig:
    _target_: str = "metarun.continual.methods.EWC"
    _partial_: bool = True
    lr: float = MISSING
    ewc_lambda: float = MISSING
    fisher_samples: int = MISSING


@dataclass
class OMLConfig:
    _target_: str = "metarun.continual.methods.OML"
    _partial_: bool = True
    fast_lr: float = MISSING
    meta_lr: float = MISSING
    meta_iterations: int = MISSING
    trajectory_classes: int = MISSING
    trajectory_shots: int = MISSING
    query_shots: int = MISSING
    first_order: bool = MISSING


@dataclass
class LaMAMLConfig:
    _target_: str = "metarun.continual.methods.LaMAML"
    _partial_: bool = True
    fast_lr: float = MISSING
    meta_lr: float = MISSING
    adaptation_steps: int = MISSING
    buffer_size: int = MISSING
    replay_batch_size: int = MISSING
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
