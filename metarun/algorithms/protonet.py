"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Each class is represented by the mean embedding of its support examples (its prototype);
queries are classified by a softmax over negative squared Euclidean distances.
"""

from __future__ import annotations

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


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means: ``(n_support, d)`` embeddings, ``(n_support,)`` labels -> ``(ways, d)``."""
    sums = embeddings.new_zeros(ways, embeddings.shape[1]).index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=ways).clamp_min(1).to(embeddings.dtype)
    return sums / counts[:, None]


def squared_euclidean_logits(queries: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``-||q - c||^2``: ``(n_query, d)`` and ``(ways, d)`` -> logits ``(n_query, ways)``.

    Expanded as ``2 q.c - ||q||^2 - ||c||^2`` so that the work is one matrix product: the
    direct form builds an ``(n_query, ways, d)`` tensor, which made the distances most of a
    step's time for wide embeddings (a 60-way step with 300 queries and 3136 features:
    about 0.75 s against 9 ms on one CPU thread). In at least fp32 with autocast off, as
    the expansion subtracts large numbers (see :func:`at_least_fp32`)."""
    with torch.autocast(queries.device.type, enabled=False):
        q, c = at_least_fp32(queries), at_least_fp32(protos)
        return 2 * q @ c.T - (q * q).sum(dim=1, keepdim=True) - (c * c).sum(dim=1)


def at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    """``z`` in fp32 if autocast made it bf16 or fp16 (fp64 stays): distances in bf16, whose
    mantissa has 8 bits, blur the small differences between large squared distances that
    decide the logits."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


class ProtoNet(nn.Module):
    """Prototypical Networks on ``backbone`` (no head; any number of ways).

    Args:
        backbone: embedding network, ``(n, C, H, W) -> (n, d)``.
        bn_mode: see :class:`BatchNormMode`; the paper's code evaluates with ``running``.
        task: the dataset's task kind (given by the runner); classification only.
    """

    capabilities = Capabilities()
    stacks_tasks = False

    def __init__(
        self,
        backbone: nn.Module,
        bn_mode: BatchNormMode | str = BatchNormMode.running,
        task: TaskKind = CLASSIFICATION,
    ):
        require_classification(task, "ProtoNet classifies by distance to class prototypes")
        super().__init__()
        self.backbone = backbone
        self.bn_mode = BatchNormMode(bn_mode)

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        n_support = episode.support_x.shape[0]
        z = at_least_fp32(self.backbone(torch.cat([episode.support_x, episode.query_x])))
        protos = prototypes(z[:n_support], episode.support_y, episode.ways)
        logits = squared_euclidean_logits(z[n_support:], protos)
        return F.cross_entropy(logits, episode.query_y), accuracy(logits, episode.query_y)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        buffers = buffer_copies(self.backbone)

        def embed(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self.backbone, self.bn_mode):
                return at_least_fp32(functional_call(self.backbone, buffers, (x,)))

        protos = prototypes(embed(support_x), support_y, int(support_y.max()) + 1)
        return lambda query_x: squared_euclidean_logits(embed(query_x), protos)
