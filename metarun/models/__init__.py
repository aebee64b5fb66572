"""Feature extractors (backbones). Mirrors ``configs/model``.

A backbone maps images ``(n, C, H, W)`` (sequences ``(n, C, L)`` for Conv1D, vectors
``(n, d)`` for MLP) to features ``(n, out_features)``; algorithms add
what they need on top (MAML a linear head, ProtoNet nothing).
"""

from metarun.models.conv1d import Conv1D
from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP
from metarun.models.resnet12 import ResNet12

__all__ = ["Conv1D", "Conv4", "MLP", "ResNet12"]
