"""Meta-learning algorithms. Mirrors ``configs/algo``.

Every algorithm is an ``nn.Module`` that follows :class:`MetaLearner`: the runner calls
``meta_loss`` on each training episode and ``adapt`` on each evaluation episode.
"""

from metarun.algorithms.anil import ANIL
from metarun.algorithms.base import BatchNormMode, MetaLearner
from metarun.algorithms.maml import MAML
from metarun.algorithms.mamlpp import MAMLPlusPlus
from metarun.algorithms.metasgd import MetaSGD
from metarun.algorithms.protonet import ProtoNet
from metarun.algorithms.reptile import Reptile

__all__ = [
    "ANIL",
    "BatchNormMode",
    "MetaLearner",
    "MAML",
    "MAMLPlusPlus",
    "MetaSGD",
    "ProtoNet",
    "Reptile",
]
