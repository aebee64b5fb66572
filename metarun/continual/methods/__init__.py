"""Continual learners: baselines and meta-continual methods. Mirrors ``configs/algo``
(``naive``, ``joint``, ``er``, ``ewc``, ``mer``, ``lamaml``, ``oml``, ``anml``, ``sbmcl``,
``prototypes``, ``pretrained``). The shared surface is
:class:`~metarun.continual.methods.base.ContinualLearner`; docs/LIFELONG.md describes each
method with its paper."""

from metarun.continual.methods.anml import ANML
from metarun.continual.methods.base import (
    ContinualLearner,
    StreamCapabilities,
    masked_logits,
)
from metarun.continual.methods.baselines import EWC, ExperienceReplay, Joint, Naive
from metarun.continual.methods.class_statistics import SBMCL, Prototypes
from metarun.continual.methods.lamaml import LaMAML
from metarun.continual.methods.mer import MER
from metarun.continual.methods.oml import OML
from metarun.continual.methods.online_head import Pretrained

__all__ = [
    "ANML",
    "EWC",
    "MER",
    "OML",
    "SBMCL",
    "ContinualLearner",
    "ExperienceReplay",
    "Joint",
    "LaMAML",
    "Naive",
    "Pretrained",
    "Prototypes",
    "StreamCapabilities",
    "masked_logits",
]
