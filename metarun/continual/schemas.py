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
class MNISTRotationsConfig:
    _target_: str = "metarun.continual.scenarios.mnist_rotations"
    root: str | None = MISSING
    n_tasks: int = at_least(1)
    samples_per_task: int = at_least(1)  # training examples per task, a seeded draw
    min_angle: float = MISSING  # degrees; task t turns by U[min + t w, min + (t + 1) w)
    max_angle: float = MISSING
    seed: int = at_least(0)
    epochs: int = at_least(1)
    batch_size: int = at_least(1)
    download: bool = MISSING


@dataclass
class OmniglotMetaContinualConfig:
    _target_: str = "metarun.continual.scenarios.omniglot_meta_continual"
    root: str | None = MISSING
    cache_dir: str | None = MISSING
    sizes: list[int] = at_least(1)  # classes per stream
    draws: int = at_least(2)  # reported streams per size (a CI needs two)
    selection_draws: int = at_least(1)  # held-out streams per learning rate and size
    train_shots: int = at_least(1)
    lr_grid: list[float] = positive()  # continual-phase learning rates tried
    seed: int = at_least(0)
    image_size: int = at_least(4)
    download: bool = MISSING
    meta_train_rotations: bool = False  # rotated characters as more meta-training classes
    validation: bool = False  # report held-out background streams (choosing settings)


@dataclass
class NaiveConfig:
    _target_: str = "metarun.continual.methods.Naive"
    _partial_: bool = True
    lr: float = positive()
    optimizer: str = choice("adam", "sgd", default="adam")


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
    optimizer: str = choice("adam", "sgd", default="adam")


@dataclass
class MERConfig:
    _target_: str = "metarun.continual.methods.MER"
    _partial_: bool = True
    lr: float = positive()  # alpha: the SGD step of every single-example update
    beta: float = positive()  # within-batch meta-learning rate
    gamma: float = positive()  # across-batch meta-learning rate (1: none)
    batches_per_example: int = at_least(1)  # s
    replay_batch_size: int = at_least(0)  # memories per batch (k - 1)
    buffer_size: int = at_least(1)


@dataclass
class EWCConfig:
    _target_: str = "metarun.continual.methods.EWC"
    _partial_: bool = True
    lr: float = positive()
    ewc_lambda: float = at_least(0.0)
    fisher_samples: int = at_least(1)
    optimizer: str = choice("adam", "sgd", default="adam")


@dataclass
class OMLConfig:
    _target_: str = "metarun.continual.methods.OML"
    _partial_: bool = True
    lr: float = positive()  # the continual-phase learning rate of the head
    fast_lr: float = positive()  # inner-loop SGD step of the head
    meta_lr: float = positive()
    meta_iterations: int = at_least(0)
    trajectory_classes: int = at_least(1)
    trajectory_shots: int = at_least(1)
    query_shots: int = at_least(0)
    remember_size: int = at_least(0)  # meta-loss images of other classes
    first_order: bool = MISSING
    meta_max_minutes: float | None = positive(None)
    stream_optimizer: str = choice("adam", "sgd", default="adam")
    stream_outputs: str = choice("all", "seen", default="all")  # the stream loss's softmax


@dataclass
class ANMLConfig:
    _target_: str = "metarun.continual.methods.ANML"
    _partial_: bool = True
    lr: float = positive()  # the continual-phase learning rate of the head
    fast_lr: float = positive()  # inner-loop SGD step of the prediction network
    meta_lr: float = positive()
    meta_iterations: int = at_least(0)
    trajectory_shots: int = at_least(1)
    remember_size: int = at_least(0)
    nm_channels: list[int] = at_least(1)  # the neuromodulatory network's convolutions
    nm_pools: list[bool] = MISSING
    nm_norm: str = choice("none", "batch", "instance")
    first_order: bool = MISSING
    meta_max_minutes: float | None = positive(None)
    stream_optimizer: str = choice("adam", "sgd", default="adam")
    stream_outputs: str = choice("all", "seen", default="all")  # the stream loss's softmax


@dataclass
class PrototypesConfig:
    _target_: str = "metarun.continual.methods.Prototypes"
    _partial_: bool = True
    meta_lr: float = positive()
    meta_iterations: int = at_least(0)
    ways: int = at_least(1)  # classes per meta-training episode
    shots: int = at_least(1)  # support images per class
    query_shots: int = at_least(1)
    lr_decay_every: int = at_least(0)  # halve meta_lr every N episodes; 0: never
    meta_max_minutes: float | None = positive(None)
    encoder_checkpoint: str | None = None  # start from another run's encoder (best.pt)
    # an episode's classes: at random, or whole groups (Omniglot: alphabets) until full
    episode_classes: str = choice("random", "grouped", default="random")
    # affine: Koch et al.'s random affine distortions of every meta-training image
    augment: str = choice("none", "affine", default="none")


@dataclass
class SBMCLConfig(PrototypesConfig):
    _target_: str = "metarun.continual.methods.SBMCL"
    covariance: str = choice("diagonal", "shared", default="diagonal")
    alpha: float = positive()  # diagonal: the Gamma prior's initial shape (meta-learned)
    beta: float = positive()  # and rate
    kappa: float = positive()  # shared: the inverse-Wishart prior's initial strength
    scale: float = positive()  # and variance (meta-learned)


@dataclass
class PretrainedConfig:
    _target_: str = "metarun.continual.methods.Pretrained"
    _partial_: bool = True
    lr: float = positive()  # the continual-phase learning rate of the head
    meta_lr: float = positive()
    meta_iterations: int = at_least(0)
    batch_size: int = at_least(1)
    lr_decay_every: int = at_least(0)
    meta_max_minutes: float | None = positive(None)
    stream_optimizer: str = choice("adam", "sgd", default="adam")
    stream_outputs: str = choice("all", "seen", default="all")  # the stream loss's softmax


@dataclass
class LaMAMLConfig:
    _target_: str = "metarun.continual.methods.LaMAML"
    _partial_: bool = True
    fast_lr: float = positive()  # alpha_init: every per-parameter step size starts here
    meta_lr: float = positive()  # SGD learning rate of the step sizes
    glances: int = at_least(1)  # meta-updates per incoming batch
    inner_batch_size: int = at_least(1)  # examples per inner step (1: the authors' code)
    buffer_size: int = at_least(1)
    replay_batch_size: int = at_least(0)
    grad_clip_norm: float | None = positive(None)  # global-norm clip of each meta-gradient
    learn_lr: bool = MISSING  # false: fixed step sizes (C-MAML)
    sync_update: bool = MISSING  # true: SGD at weight_lr on the weights (C-MAML, Sync)
    weight_lr: float = positive()
    first_order: bool = MISSING


SCENARIO_SCHEMAS: dict[str, type] = {
    "split_mnist": SplitMNISTConfig,
    "permuted_mnist": PermutedMNISTConfig,
    "omniglot_continual": OmniglotContinualConfig,
    "sinusoid_stream": SinusoidStreamConfig,
    "mnist_rotations": MNISTRotationsConfig,
    "omniglot_meta_continual": OmniglotMetaContinualConfig,
}
ALGO_SCHEMAS: dict[str, type] = {
    "naive": NaiveConfig,
    "joint": JointConfig,
    "er": ERConfig,
    "ewc": EWCConfig,
    "oml": OMLConfig,
    "lamaml": LaMAMLConfig,
    "mer": MERConfig,
    "anml": ANMLConfig,
    "prototypes": PrototypesConfig,
    "sbmcl": SBMCLConfig,
    "pretrained": PretrainedConfig,
}
