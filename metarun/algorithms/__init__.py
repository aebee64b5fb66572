"""Meta-learning algorithms. Mirrors ``configs/algo``.

Every algorithm is an ``nn.Module`` that follows :class:`MetaLearner`: the runner calls
``meta_loss`` on each training episode and ``adapt`` on each evaluation episode.
"""

from metarun.algorithms.base import BatchNormMode, MetaLearner
from metarun.algorithms.maml import MAML
from metarun.algorithms.protonet import ProtoNet

__all__ = ["BatchNormMode", "MetaLearner", "MAML", "ProtoNet"]
