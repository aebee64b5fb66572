"""Structured config schemas (Hydra ConfigStore).

The YAML files in ``configs/`` hold the values; these dataclasses hold the types and key
names, so a misspelled key or a value of the wrong type fails when the config is
composed. Group files pull their schema in through their defaults list, e.g.
``configs/algo/maml.yaml`` starts with ``- /schema/algo/maml@_here_``.

Only the standard library, Hydra and OmegaConf are imported here: ``metarun --help``
stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from metarun.continual.schemas import ALGO_SCHEMAS, SCENARIO_SCHEMAS
from metarun.options import (
    AmpMode,
    Augment,
    BatchNormMode,
    EpisodeKind,
    LrSchedule,
    MetaOptimizer,
    at_least,
    between,
    choice,
    fraction,
    positive,
)


@dataclass
class TrainConfig:
    ways: int = at_least(1)
    shots: int = at_least(1)
    query_shots: int = at_least(1)
    meta_batch_size: int = at_least(1)
    iterations: int = at_least(0)  # >= 1, or 0 for an algorithm that is not trained (checks.py)
    meta_lr: float = positive()
    optimizer: MetaOptimizer = MetaOptimizer.adam  # the meta-optimiser: adam | sgd
    lr_schedule: LrSchedule = MISSING  # step | cosine | linear
    lr_decay_every: int = at_least(0)  # step: times lr_decay_gamma every N iterations; 0 = never
    lr_decay_gamma: float = positive()
    min_lr: float = at_least(0.0)  # cosine, linear: the learning rate at the last iteration
    max_minutes: float | None = positive(None)  # end training after this many minutes of steps
    grad_clip: float | None = positive(None)  # clip the meta-gradient's norm to this; null = never
    episodes: EpisodeKind = MISSING  # standard | within_alphabet
    augment: Augment = MISSING  # none | affine (training images only)


@dataclass
class EvalConfig:
    ways: int = at_least(1)
    shots: int = at_least(1)
    query_shots: int = at_least(1)
    val_every: int = at_least(0)  # 0 = no validation during training
    val_episodes: int = at_least(0)  # >= 1 when val_every > 0 (checked with it)
    test_episodes: int = at_least(1)
    episode_seed: int = at_least(0)  # fixes the validation and test episodes for every run
    report_steps: list[int] = at_least(0)  # also test after these adaptation steps
    episodes: EpisodeKind = MISSING  # standard | within_alphabet (validation and test)
    test_views: int = at_least(0)  # test episodes also seen through N random distortions


@dataclass
class RunConfig:
    algo: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    hardware: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = at_least(0)
    log_every: int = at_least(1)
    checkpoint_every: int = at_least(1)
    data_dir: str | None = None
    cache_dir: str | None = None
    resume: str | None = None
    test: str | None = None  # a trained run to test again (metarun.runner.retest)
    scenario: Any = None  # a task stream (configs/scenario): lifelong learning instead
    logger: Any = None  # {name: backend} of configs/logger (metarun.loggers.build_loggers)


@dataclass
class MAMLConfig:
    _target_: str = "metarun.algorithms.MAML"
    _partial_: bool = True
    ways: int = at_least(1)
    fast_lr: float = at_least(0.0)
    adaptation_steps: int = at_least(0)
    test_adaptation_steps: int = at_least(0)
    first_order: bool = MISSING
    bn_mode: BatchNormMode = MISSING
    engine: str = choice("loop", "vmap", "l2l", default="loop")  # see metarun.algorithms.MAML


@dataclass
class MetaSGDConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.MetaSGD"
    fast_lr_range: list[float] | None = MISSING  # [low, high] random start; null: fast_lr


@dataclass
class MAMLPlusPlusConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.MAMLPlusPlus"
    multi_step_loss: bool = MISSING
    msl_anneal_tasks: int = at_least(1)
    learn_step_lrs: bool = MISSING
    first_order_until_tasks: int = at_least(0)
    per_step_bn: bool = MISSING  # per-step batch-norm statistics, weights and biases


@dataclass
class ANILConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.ANIL"


@dataclass
class ReptileConfig:
    _target_: str = "metarun.algorithms.Reptile"
    _partial_: bool = True
    ways: int = at_least(1)
    fast_lr: float = positive()
    adaptation_steps: int = at_least(1)
    test_adaptation_steps: int = at_least(0)
    inner_optimizer: str = choice("sgd", "adam")
    inner_batch_size: int | None = at_least(1)  # null: the whole support set per step
    bn_mode: BatchNormMode = MISSING


@dataclass
class LSTMMetaConfig:
    _target_: str = "metarun.algorithms.LSTMMetaLearner"
    _partial_: bool = True
    ways: int = at_least(1)
    adaptation_steps: int = at_least(1)
    test_adaptation_steps: int = at_least(0)
    hidden_size: int = at_least(1)
    first_order: bool = MISSING  # gradient and loss inputs as constants (the paper's choice)
    bn_mode: BatchNormMode = MISSING
    forget_bias: list[float] = MISSING  # [low, high] uniform start of the forget gate's bias
    input_bias: list[float] = MISSING  # [low, high] uniform start of the input gate's bias


@dataclass
class LearnedOptConfig:
    _target_: str = "metarun.algorithms.LearnedOptimizer"
    _partial_: bool = True
    ways: int = at_least(1)
    adaptation_steps: int = at_least(1)
    test_adaptation_steps: int = at_least(0)
    network: str = choice("lstm", "mlp")
    hidden_size: int = at_least(1)
    momentum_features: bool = MISSING
    output_scale: float = positive()
    truncation: int = at_least(0)  # steps per truncated-BPTT segment; 0 = none
    meta_init: bool = MISSING  # meta-learn the initial weights (false: fixed)
    first_order: bool = MISSING
    bn_mode: BatchNormMode = MISSING


@dataclass
class ProtoNetConfig:
    _target_: str = "metarun.algorithms.ProtoNet"
    _partial_: bool = True
    bn_mode: BatchNormMode = MISSING


@dataclass
class EnsembleConfig:
    _target_: str = "metarun.algorithms.Ensemble"
    _partial_: bool = True
    members: list[str] = MISSING  # trained runs (folders or .pt files), at least two
    split: str | None = MISSING  # the dataset split every member was trained on
    image_size: int | None = MISSING  # the image side every member was trained at


@dataclass
class MatchingConfig:
    _target_: str = "metarun.algorithms.MatchingNetworks"
    _partial_: bool = True
    fce: bool = MISSING  # full context embeddings (bidirectional LSTM, attention LSTM)
    fce_steps: int = at_least(1)  # K, the attention LSTM's reads of the support set
    bn_mode: BatchNormMode = MISSING


@dataclass
class RelationConfig:
    _target_: str = "metarun.algorithms.RelationNetworks"
    _partial_: bool = True
    relation_channels: int = at_least(1)  # channels of the relation module's conv blocks
    relation_hidden: int = at_least(1)  # units of its hidden fully connected layer
    bn_mode: BatchNormMode = MISSING


@dataclass
class SiameseConfig:
    _target_: str = "metarun.algorithms.SiameseNetworks"
    _partial_: bool = True
    embedding_size: int = at_least(0)  # sigmoid layer on the backbone; 0 = none
    pairs_per_episode: int = at_least(2)  # half same-class, half different-class
    pair_seed: int = at_least(0)
    bn_mode: BatchNormMode = MISSING


@dataclass
class MANNConfig:
    _target_: str = "metarun.algorithms.MANN"
    _partial_: bool = True
    ways: int = at_least(1)
    controller_size: int = at_least(1)
    memory_slots: int = at_least(1)
    memory_width: int = at_least(1)
    read_heads: int = at_least(1)
    usage_decay: float = fraction()
    report_instances: list[int] = at_least(1)  # accuracy by instance number (1st, 2nd, ...)
    key_strength: bool = MISSING  # NTM key strengths sharpen the reads (not in the paper)
    add_vector: bool = MISSING  # heads write NTM add vectors, not their keys (not in the paper)
    order_seed: int = at_least(0)  # presentation order in evaluation
    encoder_checkpoint: str | None = MISSING  # a run's best.pt: frozen backbone; null: joint
    bn_mode: BatchNormMode = MISSING


@dataclass
class SNAILConfig:
    _target_: str = "metarun.algorithms.SNAIL"
    _partial_: bool = True
    ways: int = at_least(1)
    shots: int = at_least(1)
    key_sizes: list[int] = at_least(1)  # one attention block per entry
    value_sizes: list[int] = at_least(1)
    tc_filters: int = at_least(1)
    order_seed: int = at_least(0)  # support order in evaluation
    bn_mode: BatchNormMode = MISSING


@dataclass
class LEOConfig:
    _target_: str = "metarun.algorithms.LEO"
    _partial_: bool = True
    latent_size: int = at_least(1)
    relation_layers: int = at_least(1)
    fast_lr: float = positive()  # latent inner-loop step size (initial; meta-learned)
    adaptation_steps: int = at_least(0)
    test_adaptation_steps: int = at_least(0)
    finetune_lr: float = at_least(0.0)  # weight fine-tuning step size (initial; meta-learned)
    finetuning_steps: int = at_least(0)
    dropout: float = fraction(below_one=True)
    kl_weight: float = at_least(0.0)
    encoder_penalty_weight: float = at_least(0.0)
    l2_weight: float = at_least(0.0)
    orthogonality_weight: float = at_least(0.0)
    encoder_checkpoint: str | None = MISSING  # a run's best.pt: frozen backbone; null: joint
    bn_mode: BatchNormMode = MISSING


@dataclass
class OmniglotConfig:
    _target_: str = "metarun.data.omniglot.Omniglot"
    root: str | None = MISSING
    cache_dir: str | None = MISSING
    split: str = choice("vinyals", "lake", "lake_proxy")
    image_size: int = at_least(4)
    download: bool = MISSING
    mirror: str | None = None
    train_rotations: bool = MISSING  # lake splits: rotated training characters as classes


@dataclass
class MiniImageNetConfig:
    _target_: str = "metarun.data.miniimagenet.MiniImageNet"
    root: str | None = MISSING
    cache_dir: str | None = MISSING
    split: str = choice("ravi", "val_test_reduced")
    image_size: int = at_least(4)
    source: str = choice("auto", "raw", "pickle")
    reduced_val_classes: int = at_least(1)
    download: bool = MISSING


@dataclass
class Learn2LearnDatasetConfig:
    _target_: str = "metarun.data.learn2learn.Learn2LearnDataset"
    name: str = MISSING  # a key of metarun.data.learn2learn.SPECS: tiered_imagenet, dtd, ...
    root: str | None = MISSING
    cache_dir: str | None = MISSING
    image_size: int = at_least(4)
    download: bool = MISSING


@dataclass
class SinusoidConfig:
    _target_: str = "metarun.data.sinusoid.Sinusoid"
    amplitude: list[float] = MISSING  # [low, high]
    phase: list[float] = MISSING  # [low, high], radians
    x_range: list[float] = MISSING  # [low, high]


@dataclass
class Conv4Config:
    _target_: str = "metarun.models.Conv4"
    _partial_: bool = True
    hidden: int = at_least(1)
    bn_momentum: float = fraction()
    pool_blocks: int = between(0, 4, 4)  # blocks (from the first) that end with a 2x2 max-pool
    flatten: bool = True  # false: feature maps (n, hidden, H', W'), for algo=relation


@dataclass
class ConvNetConfig:
    _target_: str = "metarun.models.ConvNet"
    _partial_: bool = True
    channels: list[int] = at_least(1)  # one 3x3 convolution per entry
    strides: list[int] = at_least(1)
    pools: list[bool] = MISSING  # a 2x2 max-pool after the block
    norm: str = choice("none", "batch", "instance")
    init: str = choice("default", "kaiming_normal")


@dataclass
class MLPConfig:
    _target_: str = "metarun.models.MLP"
    _partial_: bool = True
    hidden_sizes: list[int] = at_least(1)
    batch_norm: bool = MISSING
    init_std: float | None = positive(None)  # None: PyTorch's init; else truncated normal
    init: str = choice("default", "xavier_uniform", "kaiming_normal", default="default")


@dataclass
class ResNet12Config:
    _target_: str = "metarun.models.ResNet12"
    _partial_: bool = True
    channels: list[int] = at_least(1)
    avg_pool: bool = MISSING
    bn_momentum: float = fraction()


@dataclass
class MNISTConfig:
    _target_: str = "metarun.data.mnist.MNIST"
    root: str | None = MISSING
    variant: str = choice("mnist", "fashion_mnist")
    download: bool = MISSING
    mirror: str | None = None


@dataclass
class FolderDatasetConfig:
    _target_: str = "metarun.data.folder.ImageFolder"
    root: str | None = MISSING  # required: root/<class>/<images> (docs/DATASETS.md)
    cache_dir: str | None = MISSING
    image_size: int = MISSING
    channels: int = MISSING  # 1 (grayscale) | 3 (RGB)
    invert: bool = MISSING  # 255 - pixel (dark drawings on light paper)
    class_depth: int = MISSING  # folder levels that name a class (Omniglot: 2)
    rotations: list[int] = MISSING  # [0] | e.g. [0, 90, 180, 270]: a class per angle
    split: str = MISSING  # auto | lists | folders | fractions
    split_dir: str | None = MISSING  # lists: folder of train/val/test.txt; null: root
    fractions: list[float] = MISSING  # fractions: train / val / test shares of the classes
    split_seed: int = MISSING
    drop_small_classes: bool = MISSING  # leave out classes too small for an episode


@dataclass
class TensorDatasetConfig:
    _target_: str = "metarun.data.tensors.TensorFile"
    path: str | None = MISSING  # required: .npz / .pt / .csv / .parquet, or a folder
    label_column: str = MISSING  # .csv, .parquet
    split: str = MISSING  # auto | lists | files | fractions
    split_dir: str | None = MISSING  # lists: folder of train/val/test.txt; null: path's folder
    fractions: list[float] = MISSING
    split_seed: int = MISSING
    standardize: bool = MISSING  # per feature / channel, with the train split's statistics
    drop_small_classes: bool = MISSING


@dataclass
class Conv1DConfig:
    _target_: str = "metarun.models.Conv1D"
    _partial_: bool = True
    hidden: int = MISSING
    blocks: int = MISSING
    kernel_size: int = MISSING
    pool: int = MISSING
    bn_momentum: float = MISSING
    global_pool: bool = MISSING


@dataclass
class HardwareConfig:
    _target_: str = "metarun.hardware.Hardware"
    device: str = MISSING  # auto | cpu | cuda | cuda:N
    amp: AmpMode = MISSING
    num_threads: int | None = at_least(1, None)  # CPU threads; None keeps torch's default
    channels_last: bool = False  # NHWC images and conv weights
    compile: bool = False  # torch.compile the backbone
    compile_backend: str = "inductor"  # inductor | eager (or any torch.compile backend)


@dataclass
class TensorBoardLoggerConfig:
    _target_: str = "metarun.loggers.TensorBoardLogger"
    _partial_: bool = True


@dataclass
class CSVLoggerConfig:
    _target_: str = "metarun.loggers.CSVLogger"
    _partial_: bool = True
    filename: str = MISSING  # in the run folder


@dataclass
class WandbLoggerConfig:
    _target_: str = "metarun.loggers.WandbLogger"
    _partial_: bool = True
    project: str = MISSING
    entity: str | None = MISSING
    mode: str = MISSING  # offline | online | disabled
    tags: list[str] = MISSING


@dataclass
class MLflowLoggerConfig:
    _target_: str = "metarun.loggers.MLflowLogger"
    _partial_: bool = True
    experiment_name: str = MISSING
    tracking_uri: str | None = MISSING  # None: a file store in the run folder


SCHEMAS: dict[str, dict[str, type]] = {
    "schema/algo": {
        "maml": MAMLConfig,
        "protonet": ProtoNetConfig,
        "ensemble": EnsembleConfig,
        "matching": MatchingConfig,
        "relation": RelationConfig,
        "siamese": SiameseConfig,
        "leo": LEOConfig,
        "metasgd": MetaSGDConfig,
        "anil": ANILConfig,
        "mamlpp": MAMLPlusPlusConfig,
        "reptile": ReptileConfig,
        "lstm_meta": LSTMMetaConfig,
        "learned_opt": LearnedOptConfig,
        "mann": MANNConfig,
        "snail": SNAILConfig,
        **ALGO_SCHEMAS,
    },
    "schema/dataset": {
        "omniglot": OmniglotConfig,
        "miniimagenet": MiniImageNetConfig,
        "learn2learn": Learn2LearnDatasetConfig,
        "sinusoid": SinusoidConfig,
        "mnist": MNISTConfig,
        "folder": FolderDatasetConfig,
        "tensors": TensorDatasetConfig,
    },
    "schema/model": {
        "convnet": ConvNetConfig,
        "conv4": Conv4Config,
        "mlp": MLPConfig,
        "resnet12": ResNet12Config,
        "conv1d": Conv1DConfig,
    },
    "schema/hardware": {"hardware": HardwareConfig},
    "schema/scenario": SCENARIO_SCHEMAS,
    "schema/logger": {
        "tensorboard": TensorBoardLoggerConfig,
        "csv": CSVLoggerConfig,
        "wandb": WandbLoggerConfig,
        "mlflow": MLflowLoggerConfig,
    },
}


def register_configs() -> None:
    """Registers the schemas with Hydra's ConfigStore, and metarun's OmegaConf resolvers
    (:mod:`metarun.resolvers`), for the CLI and tests."""
    from metarun.resolvers import register_resolvers

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="metarun_schema", node=RunConfig)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=group, name=name, node=node)
