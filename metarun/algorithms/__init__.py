"""Meta-learning algorithms. Mirrors ``configs/algo``.

Every algorithm is an ``nn.Module`` that follows :class:`MetaLearner`: the runner calls
``meta_loss`` on each training episode and ``adapt`` on each evaluation episode.
"""

from metarun.algorithms.anil import ANIL
from metarun.algorithms.base import BatchNormMode, MetaLearner
from metarun.algorithms.ensemble import Ensemble
from metarun.algorithms.learned_opt import LearnedOptimizer
from metarun.algorithms.leo import LEO
from metarun.algorithms.lstm_meta import LSTMMetaLearner
from metarun.algorithms.maml import MAML
from metarun.algorithms.mamlpp import MAMLPlusPlus
from metarun.algorithms.mann import MANN
from metarun.algorithms.matching import MatchingNetworks
from metarun.algorithms.metasgd import MetaSGD
from metarun.algorithms.protonet import ProtoNet
from metarun.algorithms.relation import RelationNetworks
from metarun.algorithms.reptile import Reptile
from metarun.algorithms.siamese import SiameseNetworks
from metarun.algorithms.snail import SNAIL

__all__ = [
    "ANIL",
    "BatchNormMode",
    "Ensemble",
    "LearnedOptimizer",
    "LSTMMetaLearner",
    "MetaLearner",
    "LEO",
    "MAML",
    "MAMLPlusPlus",
    "MANN",
    "MatchingNetworks",
    "MetaSGD",
    "ProtoNet",
    "RelationNetworks",
    "Reptile",
    "SiameseNetworks",
    "SNAIL",
]
