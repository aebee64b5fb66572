"""Siamese Networks (Koch, Zemel & Salakhutdinov, *Siamese Neural Networks for One-shot Image
Recognition*, ICML Deep Learning Workshop 2015).

Two images go through the same encoder (the backbone, then, as in the paper, a fully
connected layer with sigmoid units); the pair's score is a sigmoid of a learned weighting of
the absolute differences of their embeddings (the weighted L1 distance), trained with binary
cross-entropy on same/different pairs. One-shot classification labels a query with the class
of the support image it scores highest with.

Meta-training reads the runner's episodes: each episode's images (support and query sets
together) give ``pairs_per_episode`` pairs, half of the same class and half of different
classes, drawn by :class:`PairSampler` from a generator seeded by ``pair_seed`` and the
number of episodes seen (a buffer, so a resumed run draws the same pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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

_PAIRWISE_CHUNK = 1 << 24  # elements of a (queries, support, d) difference tensor at once


@dataclass
class Pairs:
    """Pairs of images of one episode.

    Attributes:
        left: ``(n_pairs,)`` index of the first image of each pair.
        right: ``(n_pairs,)`` index of the second image.
        same: ``(n_pairs,)`` 1.0 where both images have the same label, else 0.0.
    """

    left: torch.Tensor
    right: torch.Tensor
    same: torch.Tensor


class PairSampler:
    """Balanced same/different pairs from labelled images, reproducible from a seed.

    The first half of the pairs are "same" pairs: a class drawn uniformly among those with at
    least two images, then two distinct images of it. The second half are "different" pairs:
    two distinct classes drawn uniformly, then one image of each.

    Args:
        pairs: pairs per call, even (half same, half different).
        seed: with the ``index`` of a call, fixes the pairs drawn.
    """

    def __init__(self, pairs: int, seed: int):
        if pairs < 2 or pairs % 2:
            raise ValueError(
                f"algo.pairs_per_episode must be even and at least 2 (half same-class, "
                f"half different-class pairs), got {pairs}"
            )
        self.pairs, self.seed = pairs, seed

    def generator(self, index: int) -> torch.Generator:
        """The generator of call ``index``, seeded from ``(seed, index)`` through numpy's
        ``SeedSequence`` (torch's CPU generator keeps only the low 32 bits of a seed, so
        the pair must be mixed into 32 bits, not packed into 64)."""
        mixed = np.random.SeedSequence([self.seed, index]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(mixed))

    def sample(self, labels: torch.Tensor, index: int) -> Pairs:
        """Pairs of the images labelled ``labels`` ``(n,)`` (any integers) for call ``index``."""
        g, half = self.generator(index), self.pairs // 2
        labels = labels.cpu()
        classes, members_of = labels.unique(), []
        for c in classes:
            members_of.append(torch.nonzero(labels == c).flatten())
        counts = torch.tensor([m.numel() for m in members_of])
        if classes.numel() < 2 or int(counts.max()) < 2:
            raise ValueError(
                f"balanced pairs need at least 2 classes and a class with 2 images; the "
                f"episode has {classes.numel()} classes with at most {int(counts.max())} "
                f"images each. Raise train.ways or train.shots + train.query_shots."
            )
        members = torch.full((classes.numel(), int(counts.max())), -1, dtype=torch.long)
        for i, m in enumerate(members_of):
            members[i, : m.numel()] = m

        def pick(cls: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            return members[cls, position]

        # Same: a class with >= 2 images, two distinct positions within it.
        eligible = torch.nonzero(counts >= 2).flatten()
        cls = eligible[torch.randint(eligible.numel(), (half,), generator=g)]
        n = counts[cls]
        a = (torch.rand(half, generator=g) * n).long()
        b = (torch.rand(half, generator=g) * (n - 1)).long()
        b = b + (b >= a).long()  # distinct from a
        same_left, same_right = pick(cls, a), pick(cls, b)
        # Different: two distinct classes, one image of each.
        k = classes.numel()
        c1 = torch.randint(k, (half,), generator=g)
        c2 = torch.randint(k - 1, (half,), generator=g)
        c2 = c2 + (c2 >= c1).long()
        diff_left = pick(c1, (torch.rand(half, generator=g) * counts[c1]).long())
        diff_right = pick(c2, (torch.rand(half, generator=g) * counts[c2]).long())
        same = torch.cat([torch.ones(half), torch.zeros(half)])
        return Pairs(torch.cat([same_left, diff_left]), torch.cat([same_right, diff_right]), same)


class SiameseNetworks(nn.Module):
    """Siamese Networks on ``backbone``.

    Args:
        backbone: shared encoder, ``(n, C, H, W) -> (n, out_features)`` (feature maps are
            flattened).
        embedding_size: units of the fully connected sigmoid layer on top of the backbone
            (4096 in the paper); 0 uses the backbone's features directly.
        pairs_per_episode: training pairs drawn from each episode's images (even).
        pair_seed: seed of the pair sampler (the run's ``seed`` in the config).
        bn_mode: see :class:`BatchNormMode`.
        task: the dataset's task kind (given by the runner); classification only.
    """

    capabilities = Capabilities()
    stacks_tasks = False

    def __init__(
        self,
        backbone: nn.Module,
        embedding_size: int = 4096,
        pairs_per_episode: int = 64,
        pair_seed: int = 0,
        bn_mode: BatchNormMode | str = BatchNormMode.running,
        task: TaskKind = CLASSIFICATION,
    ):
        require_classification(task, "Siamese Networks compare pairs of labelled images")
        super().__init__()
        self.backbone = backbone
        d = backbone.out_features
        self.embedding = (
            nn.Sequential(nn.Linear(d, embedding_size), nn.Sigmoid())
            if embedding_size
            else nn.Identity()
        )
        self.distance = nn.Linear(embedding_size or d, 1)  # sum_j alpha_j |h1_j - h2_j| + bias
        self.pair_sampler = PairSampler(pairs_per_episode, pair_seed)
        self.register_buffer("episodes_seen", torch.zeros((), dtype=torch.long))
        self.bn_mode = BatchNormMode(bn_mode)

    def pair_logits(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores of ``(..., d)`` embedding pairs -> ``(...)``; the probability
        that the two images show the same class is their sigmoid."""
        return self.distance((h1 - h2).abs()).squeeze(-1)

    def one_shot_logits(
        self, support_h: torch.Tensor, support_y: torch.Tensor, query_h: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Each class's score for each query: the highest pair score over the class's
        support images, so the argmax is the class of the most similar support image.

        Args:
            support_h: ``(n_support, d)`` embeddings; ``support_y``: ``(n_support,)`` labels.
            query_h: ``(n_query, d)`` embeddings.
            ways: number of classes.

        Returns:
            ``(n_query, ways)`` pre-sigmoid scores.
        """
        chunk = max(1, _PAIRWISE_CHUNK // max(1, support_h.numel()))
        scores = torch.cat(
            [self.pair_logits(q[:, None, :], support_h[None, :, :]) for q in query_h.split(chunk)]
        )  # (n_query, n_support)
        members = F.one_hot(support_y, ways).T.bool()  # (ways, n_support)
        masked = scores[:, None, :].masked_fill(~members[None], float("-inf"))
        return masked.amax(dim=-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` -> ``(n, d)`` embeddings (backbone, then the sigmoid layer)."""
        return self.embedding(self.backbone(x).flatten(1))

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        n_support = episode.support_x.shape[0]
        h = self.embed(torch.cat([episode.support_x, episode.query_x]))
        labels = torch.cat([episode.support_y, episode.query_y])
        pairs = self.pair_sampler.sample(labels, int(self.episodes_seen))
        self.episodes_seen += 1
        left, right = pairs.left.to(h.device), pairs.right.to(h.device)
        logits = self.pair_logits(h[left], h[right])
        loss = F.binary_cross_entropy_with_logits(logits, pairs.same.to(logits))
        with torch.no_grad():  # the metric: one-shot accuracy of the queries
            scores = self.one_shot_logits(
                h[:n_support], episode.support_y, h[n_support:], episode.ways
            )
        return loss, accuracy(scores, episode.query_y)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        buffers = buffer_copies(self.backbone)

        def embed(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self.backbone, self.bn_mode):
                return self.embedding(functional_call(self.backbone, buffers, (x,)).flatten(1))

        support_h, ways = embed(support_x), int(support_y.max()) + 1

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.one_shot_logits(support_h, support_y, embed(query_x), ways)

        return predict
