"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, *Learning to Compare:
Relation Network for Few-Shot Learning*, CVPR 2018).

The embedding of each class (the sum of its support feature maps when there are several
shots) is concatenated, along the channels, with the embedding of each query; a learned
relation module scores the pair in [0, 1], and the scores are regressed onto the one-hot
labels with a mean squared error. The paper's few-shot relation module: two blocks of
[conv 3x3 (64 channels), BatchNorm, ReLU, max-pool 2], then fully connected layers of 8 units
(ReLU) and 1 unit (sigmoid). On backbones that give vectors instead of feature maps, the
relation module is fully connected (as in the paper's zero-shot model): [linear, ReLU,
linear, sigmoid] on the concatenated vectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metarun.algorithms.base import (
    BatchNormMode,
    Capabilities,
    Predictor,
    batch_norm_mode,
    buffer_copies,
    require_classification,
)
from metarun.data.episodes import Episode
from metarun.tasks import CLASSIFICATION, TaskKind, accuracy


def class_features(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """The sum of each class's support features: ``(n_support, *shape)`` and ``(n_support,)``
    labels -> ``(ways, *shape)`` (the paper sums the K shots' feature maps)."""
    flat = features.flatten(1)
    sums = flat.new_zeros(ways, flat.shape[1]).index_add_(0, labels, flat)
    return sums.view(ways, *features.shape[1:])


def relation_pairs(classes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Every (query, class) pair, the class's features first, concatenated along the first
    feature dimension (the channels): ``(ways, *shape)`` and ``(n_query, *shape)`` ->
    ``(n_query * ways, 2 * shape[0], *shape[1:])``, ordered query-major."""
    n_query, ways = queries.shape[0], classes.shape[0]
    left = classes[None].expand(n_query, *classes.shape)
    right = queries[:, None].expand(n_query, ways, *queries.shape[1:])
    return torch.cat([left, right], dim=2).flatten(0, 1)


class RelationModule(nn.Module):
    """Scores a concatenated pair of features; returns the pre-sigmoid logit.

    Args:
        feature_shape: the backbone's output per image, ``(C, H, W)`` feature maps or
            ``(d,)`` vectors.
        channels: channels of the two convolutional blocks (feature maps only).
        hidden: units of the hidden fully connected layer.

    Shapes:
        ``(n_pairs, 2 * C, H, W)`` or ``(n_pairs, 2 * d)`` -> ``(n_pairs,)``.
    """

    def __init__(self, feature_shape: tuple[int, ...], channels: int = 64, hidden: int = 8):
        super().__init__()
        if len(feature_shape) == 3:
            c, h, w = feature_shape
            if h < 4 or w < 4:
                raise ValueError(
                    f"the relation module's two 2x2 max-pools need feature maps of at least "
                    f"4x4, but the backbone gives {c}x{h}x{w}: pool less in the backbone, e.g. "
                    f"model.pool_blocks=2 (as in experiment=relation_omniglot_5w1s)"
                )
            blocks: list[nn.Module] = []
            for i in range(2):
                blocks += [
                    nn.Conv2d(2 * c if i == 0 else channels, channels, kernel_size=3, padding=1),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                ]
            self.body = nn.Sequential(*blocks, nn.Flatten())
            width = channels * (h // 4) * (w // 4)
        elif len(feature_shape) == 1:
            self.body = nn.Identity()
            width = 2 * feature_shape[0]
        else:
            raise ValueError(
                f"Relation Networks need a backbone giving (C, H, W) feature maps or (d,) "
                f"vectors per image; it gives {feature_shape}"
            )
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pairs)).squeeze(-1)


class RelationNetworks(nn.Module):
    """Relation Networks on ``backbone`` (any number of ways and shots).

    The backbone's output shape is read from its ``out_shape`` attribute (``Conv4`` with
    ``flatten=False`` gives feature maps), else ``(out_features,)``.

    Args:
        backbone: embedding network, ``(n, C, H, W) -> (n, *out_shape)``.
        relation_channels: channels of the relation module's convolutional blocks.
        relation_hidden: units of its hidden fully connected layer (8 in the paper).
        bn_mode: see :class:`BatchNormMode` (for the backbone and the relation module).
        task: the dataset's task kind (given by the runner); classification only.
    """

    capabilities = Capabilities(feature_maps=True)
    stacks_tasks = False

    def __init__(
        self,
        backbone: nn.Module,
        relation_channels: int = 64,
        relation_hidden: int = 8,
        bn_mode: BatchNormMode | str = BatchNormMode.running,
        task: TaskKind = CLASSIFICATION,
    ):
        require_classification(
            task, "Relation Networks score (query, class) pairs against one-hot labels"
        )
        super().__init__()
        self.backbone = backbone
        self.feature_shape = tuple(getattr(backbone, "out_shape", (backbone.out_features,)))
        self.relation = RelationModule(self.feature_shape, relation_channels, relation_hidden)
        self.bn_mode = BatchNormMode(bn_mode)

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        """``(n, ...)`` backbone output -> ``(n, *feature_shape)``, checked."""
        if math.prod(z.shape[1:]) != math.prod(self.feature_shape):
            raise ValueError(
                f"the backbone gave features of shape {tuple(z.shape[1:])}, but Relation "
                f"Networks were built for {self.feature_shape}"
            )
        return z.reshape(z.shape[0], *self.feature_shape)

    def relation_logits(
        self,
        support_z: torch.Tensor,
        support_y: torch.Tensor,
        query_z: torch.Tensor,
        ways: int,
        relation: nn.Module | None = None,
    ) -> torch.Tensor:
        """Pre-sigmoid relation scores ``(n_query, ways)`` from the backbone's features of
        the support ``(n_support, ...)`` and query ``(n_query, ...)`` images; ``relation``
        replaces the relation module's call (evaluation passes one with copied buffers)."""
        classes = class_features(self._features(support_z), support_y, ways)
        pairs = relation_pairs(classes, self._features(query_z))
        return (relation or self.relation)(pairs).view(query_z.shape[0], ways)

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        n_support = episode.support_x.shape[0]
        z = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        logits = self.relation_logits(z[:n_support], episode.support_y, z[n_support:], episode.ways)
        targets = F.one_hot(episode.query_y, episode.ways).to(logits.dtype)
        loss = F.mse_loss(torch.sigmoid(logits), targets)
        return loss, accuracy(logits, episode.query_y)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        backbone_buffers = buffer_copies(self.backbone)
        relation_buffers = buffer_copies(self.relation)

        def embed(x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.backbone, backbone_buffers, (x,))

        def relation(pairs: torch.Tensor) -> torch.Tensor:
            return functional_call(self.relation, relation_buffers, (pairs,))

        with torch.no_grad(), batch_norm_mode(self, self.bn_mode):
            support_z = embed(support_x)
        ways = int(support_y.max()) + 1

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self, self.bn_mode):
                return self.relation_logits(support_z, support_y, embed(query_x), ways, relation)

        return predict
