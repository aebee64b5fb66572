"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, *Matching Networks
for One Shot Learning*, NeurIPS 2016).

A query is labelled by attention over the support set: the attention weights are a softmax
over the cosine similarities between the query's embedding and each support embedding, and
the class probabilities are the attention mass on each class's support examples. With full
context embeddings (``fce=True``), a bidirectional LSTM reads the support embeddings (in
episode order) so that each one depends on the whole support set, and an attention LSTM
reads the support set ``fce_steps`` times to embed each query (the paper's appendix A).
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


def cosine_similarities(queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query to every support embedding: ``(n_query, d)`` and
    ``(n_support, d)`` -> ``(n_query, n_support)``."""
    return F.normalize(queries, dim=-1) @ F.normalize(support, dim=-1).T


def attention_log_probs(
    similarities: torch.Tensor, support_y: torch.Tensor, ways: int
) -> torch.Tensor:
    """Log class probabilities of the attention classifier: the attention is the softmax of
    ``similarities`` over the support set, and a class's probability is the attention summed
    over its support examples (the one-hot labels weighted by the attention).

    Args:
        similarities: ``(n_query, n_support)``.
        support_y: ``(n_support,)`` labels in ``0..ways-1``.
        ways: number of classes.

    Returns:
        ``(n_query, ways)`` log-probabilities (each row's exponentials sum to 1).
    """
    log_attention = similarities.log_softmax(dim=-1)  # (n_query, n_support)
    members = F.one_hot(support_y, ways).T.bool()  # (ways, n_support)
    masked = log_attention[:, None, :].masked_fill(~members[None], float("-inf"))
    return masked.logsumexp(dim=-1)


class FullContextEmbeddings(nn.Module):
    """The two LSTMs of the paper's full context embeddings, on ``d``-dimensional features.

    Support: ``g(x_i, S) = g'(x_i) + h_fwd_i + h_bwd_i``, the outputs of a bidirectional LSTM
    over the support embeddings ``g'(x_i)`` in episode order.

    Query: ``steps`` reads of the support set by an LSTM whose input is the query embedding
    ``f'(x)``: ``h_hat_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})``,
    ``h_k = h_hat_k + f'(x)`` and ``r_k = sum_i softmax_i(h_k . g(x_i)) g(x_i)``, starting from
    ``h_0 = c_0 = 0``; the embedding is ``h_K``. Here ``r_{k-1}`` enters the cell with the
    input rather than with the hidden state: the gates apply one linear map to the
    concatenation of ``f'(x)``, ``h_{k-1}`` and ``r_{k-1}`` either way.

    Args:
        d: the embedding size (the backbone's ``out_features``).
        steps: ``K``, the number of reads.
    """

    def __init__(self, d: int, steps: int):
        super().__init__()
        if steps < 1:
            raise ValueError(f"algo.fce_steps must be at least 1, got {steps}")
        self.steps = steps
        self.support_lstm = nn.LSTM(d, d, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * d, d)

    def support(self, g: torch.Tensor) -> torch.Tensor:
        """``(n_support, d)`` -> ``(n_support, d)`` context embeddings of the support set."""
        out, _ = self.support_lstm(g[None])  # (1, n_support, 2d): forward, backward halves
        forward, backward = out[0].chunk(2, dim=-1)
        return g + forward + backward

    def query(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``(n_query, d)`` query embeddings and ``(n_support, d)`` context embeddings of
        the support set -> ``(n_query, d)``. Each query is embedded independently."""
        h, c = torch.zeros_like(f), torch.zeros_like(f)
        for _ in range(self.steps):
            read = (h @ g.T).softmax(dim=-1) @ g  # r_{k-1}: (n_query, d)
            h_hat, c = self.query_cell(torch.cat([f, read], dim=-1), (h, c))
            h = h_hat + f
        return h


class MatchingNetworks(nn.Module):
    """Matching Networks on ``backbone`` (no head; any number of ways). The same backbone
    embeds support and query images (``f' = g'``), as in the paper's experiments.

    Args:
        backbone: embedding network, ``(n, C, H, W) -> (n, out_features)`` (feature maps are
            flattened).
        fce: add the full context embeddings (:class:`FullContextEmbeddings`).
        fce_steps: ``K``, the attention LSTM's reads of the support set (``fce`` only).
        bn_mode: see :class:`BatchNormMode`.
        task: the dataset's task kind (given by the runner); classification only.
    """

    capabilities = Capabilities()
    stacks_tasks = False

    def __init__(
        self,
        backbone: nn.Module,
        fce: bool = False,
        fce_steps: int = 5,
        bn_mode: BatchNormMode | str = BatchNormMode.running,
        task: TaskKind = CLASSIFICATION,
    ):
        require_classification(
            task, "Matching Networks label queries by attention over labelled support examples"
        )
        super().__init__()
        self.backbone = backbone
        self.bn_mode = BatchNormMode(bn_mode)
        self.fce = FullContextEmbeddings(backbone.out_features, fce_steps) if fce else None

    def log_probs(
        self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Class log-probabilities ``(n_query, ways)`` from the backbone's embeddings of the
        support ``(n_support, ...)`` and query ``(n_query, ...)`` images."""
        g, f = support_z.flatten(1), query_z.flatten(1)
        if self.fce is not None:
            g = self.fce.support(g)
            f = self.fce.query(f, g)
        return attention_log_probs(cosine_similarities(f, g), support_y, ways)

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        n_support = episode.support_x.shape[0]
        z = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        log_p = self.log_probs(z[:n_support], episode.support_y, z[n_support:], episode.ways)
        return F.nll_loss(log_p, episode.query_y), accuracy(log_p, episode.query_y)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        buffers = buffer_copies(self.backbone)

        def embed(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self.backbone, self.bn_mode):
                return functional_call(self.backbone, buffers, (x,))

        support_z, ways = embed(support_x), int(support_y.max()) + 1

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.log_probs(support_z, support_y, embed(query_x), ways)

        return predict
