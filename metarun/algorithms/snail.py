"""SNAIL: a Simple Neural Attentive meta-Learner (Mishra, Rohaninejad, Chen & Abbeel,
ICLR 2018).

A few-shot episode becomes, for each query, a sequence of ``ways * shots + 1`` steps: every
support image's embedding concatenated with the one-hot of its label (in a shuffled
order), then the query's embedding with a zero label. The network predicts the query's
class from the output at the last step. It interleaves two causal blocks, so step ``t``
sees only steps ``<= t``:

- a temporal-convolution block (TC block): ``ceil(log2(sequence length))`` dense blocks
  with dilations 1, 2, 4, ...; each applies a causal convolution of kernel 2 with a gated
  activation ``tanh(f) * sigmoid(g)`` and concatenates its ``tc_filters`` outputs to its
  input;
- an attention block: single-head dot-product attention with keys, queries and values
  from linear maps, scaled by ``sqrt(key_size)``, masked so a step attends to itself and
  the steps before it; the read values are concatenated to the input.

The paper's Omniglot network is attention(64, 32), TC(128), attention(256, 128), TC(128),
attention(512, 256), then a linear map to the ``ways`` logits (a 1x1 convolution), on a
Conv4 embedding. Support orders: a random permutation from torch's global generator in
training (seeded and checkpointed by the runner); a permutation from a fresh
``torch.Generator`` seeded with ``order_seed`` in evaluation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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


class DenseBlock(nn.Module):
    """A causal dilated convolution (kernel 2) with a gated activation, concatenated to its
    input: ``(B, T, C) -> (B, T, C + filters)``."""

    def __init__(self, in_channels: int, dilation: int, filters: int):
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(in_channels, 2 * filters, kernel_size=2, dilation=dilation)
        self.out_channels = in_channels + filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Left padding by the dilation: output t combines inputs t - dilation and t.
        h = self.conv(F.pad(x.transpose(1, 2), (self.dilation, 0)))
        f, g = h.chunk(2, dim=1)
        return torch.cat([x, (torch.tanh(f) * torch.sigmoid(g)).transpose(1, 2)], dim=2)


class TCBlock(nn.Module):
    """Dense blocks with dilations ``1, 2, 4, ...``, enough (``ceil(log2(seq_len))``) for
    the last step of a ``seq_len`` sequence to see the first: ``(B, T, C) ->
    (B, T, C + blocks * filters)``."""

    def __init__(self, in_channels: int, seq_len: int, filters: int):
        super().__init__()
        blocks = []
        for i in range(max(1, math.ceil(math.log2(seq_len)))):
            blocks.append(DenseBlock(in_channels, 2**i, filters))
            in_channels = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class AttentionBlock(nn.Module):
    """Causal single-head dot-product attention whose read is concatenated to the input:
    ``(B, T, C) -> (B, T, C + value_size)``."""

    def __init__(self, in_channels: int, key_size: int, value_size: int):
        super().__init__()
        self.query = nn.Linear(in_channels, key_size)
        self.key = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.scale = 1 / math.sqrt(key_size)
        self.out_channels = in_channels + value_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1]
        logits = self.query(x) @ self.key(x).transpose(1, 2) * self.scale  # (B, T, T)
        future = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)
        weights = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
        return torch.cat([x, weights @ self.value(x)], dim=2)


class SNAIL(nn.Module):
    """SNAIL on ``backbone`` embeddings.

    Args:
        backbone: embedding network ``(n, C, H, W) -> (n, out_features)``.
        ways: classes per episode (label inputs and outputs); every episode must have this
            many.
        shots: support examples per class in training; sets the sequence length
            ``ways * shots + 1`` and so the depth of the TC blocks.
        key_sizes: key size of each attention block (the paper: 64, 256, 512).
        value_sizes: value size of each attention block (the paper: 32, 128, 256); a TC
            block sits between consecutive attention blocks.
        tc_filters: filters of every dense block (the paper: 128).
        order_seed: seed of the support order in evaluation.
        bn_mode: see :class:`BatchNormMode`.
        task: the dataset's task kind (given by the runner); classification only.
    """

    capabilities = Capabilities(fixed_ways=True, fixed_shots=True)
    stacks_tasks = False

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        shots: int,
        key_sizes: tuple[int, ...] = (64, 256, 512),
        value_sizes: tuple[int, ...] = (32, 128, 256),
        tc_filters: int = 128,
        order_seed: int = 0,
        bn_mode: BatchNormMode | str = BatchNormMode.running,
        task: TaskKind = CLASSIFICATION,
    ):
        require_classification(task, "SNAIL predicts class labels")
        if len(key_sizes) != len(value_sizes) or not key_sizes:
            raise ValueError(
                f"algo.key_sizes {list(key_sizes)} and algo.value_sizes {list(value_sizes)} "
                "must be non-empty and of the same length (one pair per attention block)."
            )
        super().__init__()
        self.backbone = backbone
        self.ways = ways
        self.order_seed = order_seed
        self.bn_mode = BatchNormMode(bn_mode)
        seq_len = ways * shots + 1
        channels = backbone.out_features + ways
        blocks: list[nn.Module] = []
        for i, (key_size, value_size) in enumerate(zip(key_sizes, value_sizes, strict=True)):
            if i:
                blocks.append(TCBlock(channels, seq_len, tc_filters))
                channels = blocks[-1].out_channels
            blocks.append(AttentionBlock(channels, key_size, value_size))
            channels = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.output = nn.Linear(channels, ways)

    def sequence_logits(self, sequence: torch.Tensor) -> torch.Tensor:
        """``(B, T, out_features + ways)`` sequences -> logits ``(B, T, ways)`` at every step
        (step ``t`` depends only on steps ``<= t``)."""
        return self.output(self.blocks(sequence))

    def classify(
        self, support: torch.Tensor, support_y: torch.Tensor, queries: torch.Tensor
    ) -> torch.Tensor:
        """Embeddings of the ordered support ``(n_support, d)`` with labels
        ``(n_support,)``, and of the queries ``(n_query, d)`` -> logits ``(n_query, ways)``:
        one sequence per query, the support steps then the query with a zero label."""
        n_query = queries.shape[0]
        labelled = torch.cat([support, F.one_hot(support_y, self.ways).to(support.dtype)], 1)
        unlabelled = torch.cat([queries, queries.new_zeros(n_query, self.ways)], dim=1)
        sequences = torch.cat([labelled.expand(n_query, -1, -1), unlabelled[:, None]], dim=1)
        return self.sequence_logits(sequences)[:, -1]

    def _check(self, ways: int) -> None:
        if ways != self.ways:
            raise ValueError(
                f"SNAIL was built for {self.ways}-way episodes (algo.ways) and got a {ways}-way "
                "one; set train.ways and eval.ways to the same value."
            )

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy of the query predictions, every query classified from
        its own sequence after the support set in a random order."""
        self._check(episode.ways)
        n_support = episode.support_x.shape[0]
        z = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        order = torch.randperm(n_support).to(z.device)
        logits = self.classify(z[:n_support][order], episode.support_y[order], z[n_support:])
        return F.cross_entropy(logits, episode.query_y), accuracy(logits, episode.query_y)

    @torch.no_grad()
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """The predictor maps queries ``(n_query, C, H, W)`` to logits ``(n_query, ways)``,
        each query classified from its own sequence (support set, then the query)."""
        self._check(int(support_y.max()) + 1)
        buffers = buffer_copies(self.backbone)

        def embed(x: torch.Tensor) -> torch.Tensor:
            with batch_norm_mode(self.backbone, self.bn_mode):
                return torch.func.functional_call(self.backbone, buffers, (x,))

        generator = torch.Generator().manual_seed(self.order_seed)
        order = torch.randperm(support_y.shape[0], generator=generator).to(support_y.device)
        support, labels = embed(support_x[order]), support_y[order]

        @torch.no_grad()
        def predict(query_x: torch.Tensor) -> torch.Tensor:
            return self.classify(support, labels, embed(query_x))

        return predict
