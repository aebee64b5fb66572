"""Feature extractors (backbones). Mirrors ``configs/model``.

A backbone maps images ``(n, C, H, W)`` to features ``(n, out_features)``; algorithms add
what they need on top (MAML a linear head, ProtoNet nothing).
"""

from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP
from metarun.models.resnet12 import ResNet12

__all__ = ["Conv4", "MLP", "ResNet12"]
