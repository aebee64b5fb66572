"""The enumerated options (batch-norm mode, mixed precision, schedules) and the ranged config
fields shared by the schemas (:mod:`metarun.config`, :mod:`metarun.continual.schemas`) and
the code that uses them; standard library and OmegaConf only, so the algorithms take their
options from here without importing the config schemas, and ``metarun --help`` stays fast.

``ways: int = at_least(1)`` is a dataclass field whose metadata says ``>= 1``;
:func:`metarun.checks.check_config` reads it and refuses an out-of-range value, naming the
key, before any data is loaded. For a list field the range applies to every item. ``None``
is always accepted where the type allows it (it means "off").
"""

from __future__ import annotations

from dataclasses import field
from enum import Enum
from typing import Any

from omegaconf import MISSING


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


def at_least(low: float, default: Any = MISSING) -> Any:
    """A number (or each number of a list) ``>= low``."""
    return field(default=default, metadata={"min": low})


def positive(default: Any = MISSING) -> Any:
    """A number ``> 0``."""
    return field(default=default, metadata={"gt": 0})


def fraction(default: Any = MISSING, below_one: bool = False) -> Any:
    """A number in ``[0, 1]`` (``[0, 1)`` with ``below_one``)."""
    return field(default=default, metadata={"min": 0, "max": 1, "below_max": below_one})


def between(low: float, high: float, default: Any = MISSING) -> Any:
    """A number in ``[low, high]``."""
    return field(default=default, metadata={"min": low, "max": high})


def choice(*values: str, default: Any = MISSING) -> Any:
    """One of ``values`` (for strings that are not an Enum)."""
    return field(default=default, metadata={"choices": values})
