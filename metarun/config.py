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
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from metarun.continual.schemas import ALGO_SCHEMAS, SCENARIO_SCHEMAS


class BatchNormMode(str, Enum):
    """How BatchNorm layers normalise during evaluation (recorded with every result).

    ``transductive``: batch statistics of the batch at hand, in training and evaluation;
        at test time the query set is normalised with its own statistics, as in the MAML
        paper's code.
    ``running``: training uses batch statistics; evaluation uses the running averages
        collected in meta-training, so each query is classified independently.
    """

    transductive = "transductive"
    running = "running"


class LrSchedule(str, Enum):
    step = "step"  # StepLR: times lr_decay_gamma every lr_decay_every iterations
    cosine = "cosine"  # CosineAnnealingLR from meta_lr down to min_lr over the run
    linear = "linear"  # LinearLR from meta_lr down to min_lr over the run (Reptile's)


class MetaOptimizer(str, Enum):
    adam = "adam"
    sgd = "sgd"  # plain SGD: with algo=reptile, exactly the paper's interpolation


class EpisodeKind(str, Enum):
    standard = "standard"  # classes drawn from the whole split, images at random
    within_alphabet = "within_alphabet"  # one alphabet per episode, drawers apart (Lake's)


class Augment(str, Enum):
    none = "none"
    affine = "affine"  # random affine distortions (Koch et al. 2015), metarun.data.augment


class AmpMode(str, Enum):
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class TrainConfig:
    ways: int = MISSING
    shots: int = MISSING
    query_shots: int = MISSING
    meta_batch_size: int = MISSING
    iterations: int = MISSING
    meta_lr: float = MISSING
    optimizer: MetaOptimizer = MetaOptimizer.adam  # the meta-optimiser: adam | sgd
    lr_schedule: LrSchedule = MISSING  # step | cosine | linear
    lr_decay_every: int = MISSING  # step: times lr_decay_gamma every N iterations; 0 = never
    lr_decay_gamma: float = MISSING
    min_lr: float = MISSING  # cosine, linear: the learning rate at the last iteration
    max_minutes: float | None = None  # end training after this many minutes of steps
    grad_clip: float | None = None  # clip the meta-gradient's norm to this; null = never
    episodes: EpisodeKind = MISSING  # standard | within_alphabet
    augment: Augment = MISSING  # none | affine (training images only)


@dataclass
class EvalConfig:
    ways: int = MISSING
    shots: int = MISSING
    query_shots: int = MISSING
    val_every: int = MISSING  # 0 = no validation during training
    val_episodes: int = MISSING  # >= 1 when val_every > 0 (runner.check_eval_budget)
    test_episodes: int = MISSING  # >= 1
    episode_seed: int = MISSING  # fixes the validation and test episodes for every run
    report_steps: list[int] = MISSING  # also test after these numbers of adaptation steps
    episodes: EpisodeKind = MISSING  # standard | within_alphabet (validation and test)


@dataclass
class RunConfig:
    algo: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    hardware: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = MISSING
    log_every: int = MISSING
    checkpoint_every: int = MISSING
    data_dir: str | None = None
    cache_dir: str | None = None
    resume: str | None = None
    test: str | None = None  # a trained run to test again (metarun.runner.retest)
    scenario: Any = None  # a task stream (configs/scenario): lifelong learning instead


@dataclass
class MAMLConfig:
    _target_: str = "metarun.algorithms.MAML"
    _partial_: bool = True
    ways: int = MISSING
    fast_lr: float = MISSING
    adaptation_steps: int = MISSING
    test_adaptation_steps: int = MISSING
    first_order: bool = MISSING
    bn_mode: BatchNormMode = MISSING
    engine: str = "loop"  # loop | vmap | l2l (see metarun.algorithms.MAML)


@dataclass
class MetaSGDConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.MetaSGD"
    fast_lr_range: list[float] | None = MISSING  # [low, high] random start; null: fast_lr


@dataclass
class MAMLPlusPlusConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.MAMLPlusPlus"
    multi_step_loss: bool = MISSING
    msl_anneal_tasks: int = MISSING
    learn_step_lrs: bool = MISSING
    first_order_until_tasks: int = MISSING
    per_step_bn: bool = MISSING  # per-step batch-norm statistics, weights and biases


@dataclass
class ANILConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.ANIL"


@dataclass
class ReptileConfig:
    _target_: str = "metarun.algorithms.Reptile"
    _partial_: bool = True
    ways: int = MISSING
    fast_lr: float = MISSING
    adaptation_steps: int = MISSING
    test_adaptation_steps: int = MISSING
    inner_optimizer: str = MISSING  # sgd | adam
    inner_batch_size: int | None = MISSING  # null: the whole support set per step
    bn_mode: BatchNormMode = MISSING


@dataclass
class LSTMMetaConfig:
    _target_: str = "metarun.algorithms.LSTMMetaLearner"
    _partial_: bool = True
    ways: int = MISSING
    adaptation_steps: int = MISSING
    test_adaptation_steps: int = MISSING
    hidden_size: int = MISSING
    first_order: bool = MISSING  # gradient and loss inputs as constants (the paper's choice)
    bn_mode: BatchNormMode = MISSING
    forget_bias: list[float] = MISSING  # [low, high] uniform start of the forget gate's bias
    input_bias: list[float] = MISSING  # [low, high] uniform start of the input gate's bias


@dataclass
class LearnedOptConfig:
    _target_: str = "metarun.algorithms.LearnedOptimizer"
    _partial_: bool = True
    ways: int = MISSING
    adaptation_steps: int = MISSING
    test_adaptation_steps: int = MISSING
    network: str = MISSING  # lstm | mlp
    hidden_size: int = MISSING
    momentum_features: bool = MISSING
    output_scale: float = MISSING
    truncation: int = MISSING  # steps per truncated-BPTT segment; 0 = none
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
    fce_steps: int = MISSING  # K, the attention LSTM's reads of the support set
    bn_mode: BatchNormMode = MISSING


@dataclass
class RelationConfig:
    _target_: str = "metarun.algorithms.RelationNetworks"
    _partial_: bool = True
    relation_channels: int = MISSING  # channels of the relation module's conv blocks
    relation_hidden: int = MISSING  # units of its hidden fully connected layer
    bn_mode: BatchNormMode = MISSING


@dataclass
class SiameseConfig:
    _target_: str = "metarun.algorithms.SiameseNetworks"
    _partial_: bool = True
    embedding_size: int = MISSING  # sigmoid layer on the backbone; 0 = none
    pairs_per_episode: int = MISSING  # half same-class, half different-class
    pair_seed: int = MISSING
    bn_mode: BatchNormMode = MISSING


@dataclass
class MANNConfig:
    _target_: str = "metarun.algorithms.MANN"
    _partial_: bool = True
    ways: int = MISSING
    controller_size: int = MISSING
    memory_slots: int = MISSING
    memory_width: int = MISSING
    read_heads: int = MISSING
    usage_decay: float = MISSING
    report_instances: list[int] = MISSING  # accuracy by instance number (1st, 2nd, ...)
    key_strength: bool = MISSING  # NTM key strengths sharpen the reads (not in the paper)
    add_vector: bool = MISSING  # heads write NTM add vectors, not their keys (not in the paper)
    order_seed: int = MISSING  # presentation order in evaluation
    encoder_checkpoint: str | None = MISSING  # a run's best.pt: frozen backbone; null: joint
    bn_mode: BatchNormMode = MISSING


@dataclass
class SNAILConfig:
    _target_: str = "metarun.algorithms.SNAIL"
    _partial_: bool = True
    ways: int = MISSING
    shots: int = MISSING
    key_sizes: list[int] = MISSING  # one attention block per entry
    value_sizes: list[int] = MISSING
    tc_filters: int = MISSING
    order_seed: int = MISSING  # support order in evaluation
    bn_mode: BatchNormMode = MISSING


@dataclass
class LEOConfig:
    _target_: str = "metarun.algorithms.LEO"
    _partial_: bool = True
    latent_size: int = MISSING
    relation_layers: int = MISSING
    fast_lr: float = MISSING  # latent inner-loop step size (initial; meta-learned)
    adaptation_steps: int = MISSING
    test_adaptation_steps: int = MISSING
    finetune_lr: float = MISSING  # weight fine-tuning step size (initial; meta-learned)
    finetuning_steps: int = MISSING
    dropout: float = MISSING
    kl_weight: float = MISSING
    encoder_penalty_weight: float = MISSING
    l2_weight: float = MISSING
    orthogonality_weight: float = MISSING
    encoder_checkpoint: str | None = MISSING  # a run's best.pt: frozen backbone; null: joint
    bn_mode: BatchNormMode = MISSING


@dataclass
class OmniglotConfig:
    _target_: str = "metarun.data.omniglot.Omniglot"
    root: str | None = MISSING
    cache_dir: str | None = MISSING
    split: str = MISSING
    image_size: int = MISSING
    download: bool = MISSING
    mirror: str | None = None
    train_rotations: bool = MISSING  # lake splits: rotated training characters as classes


@dataclass
class MiniImageNetConfig:
    _target_: str = "metarun.data.miniimagenet.MiniImageNet"
    root: str | None = MISSING
    cache_dir: str | None = MISSING
    split: str = MISSING  # ravi | val_test_reduced
    image_size: int = MISSING
    source: str = MISSING  # auto | raw | pickle
    reduced_val_classes: int = MISSING
    download: bool = MISSING


@dataclass
class Learn2LearnDatasetConfig:
    _target_: str = "metarun.learn2learn_adapter.Learn2LearnDataset"
    name: str = MISSING  # a key of learn2learn_adapter.SPECS: tiered_imagenet, cub200, dtd, ...
    root: str | None = MISSING
    cache_dir: str | None = MISSING
    image_size: int = MISSING
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
    hidden: int = MISSING
    bn_momentum: float = MISSING
    pool_blocks: int = 4  # blocks (from the first) that end with a 2x2 max-pool
    flatten: bool = True  # false: feature maps (n, hidden, H', W'), for algo=relation


@dataclass
class MLPConfig:
    _target_: str = "metarun.models.MLP"
    _partial_: bool = True
    hidden_sizes: list[int] = MISSING
    batch_norm: bool = MISSING
    init_std: float | None = None  # None: PyTorch's init; else truncated normal, zero biases


@dataclass
class ResNet12Config:
    _target_: str = "metarun.models.ResNet12"
    _partial_: bool = True
    channels: list[int] = MISSING
    avg_pool: bool = MISSING
    bn_momentum: float = MISSING


@dataclass
class MNISTConfig:
    _target_: str = "metarun.data.mnist.MNIST"
    root: str | None = MISSING
    variant: str = MISSING  # mnist | fashion_mnist
    download: bool = MISSING
    mirror: str | None = None


@dataclass
class HardwareConfig:
    _target_: str = "metarun.hardware.Hardware"
    device: str = MISSING  # auto | cpu | cuda | cuda:N
    amp: AmpMode = MISSING
    num_threads: int | None = None  # CPU threads; None keeps torch's default
    channels_last: bool = False  # NHWC images and conv weights
    compile: bool = False  # torch.compile the backbone
    compile_backend: str = "inductor"  # inductor | eager (or any torch.compile backend)


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
    },
    "schema/model": {"conv4": Conv4Config, "mlp": MLPConfig, "resnet12": ResNet12Config},
    "schema/hardware": {"hardware": HardwareConfig},
    "schema/scenario": SCENARIO_SCHEMAS,
}


def register_configs() -> None:
    """Registers the schemas with Hydra's ConfigStore (called by the CLI and tests)."""
    cs = ConfigStore.instance()
    cs.store(name="metarun_schema", node=RunConfig)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=group, name=name, node=node)
