"""Latent Embedding Optimization, LEO (Rusu, Rao, Sygnowski, Vinyals, Pascanu, Osindero &
Hadsell, "Meta-Learning with Latent Embedding Optimization", ICLR 2019).

LEO adapts a low-dimensional latent code per class instead of the classifier's weights:

1. a feature extractor (the runner's backbone) maps images to features ``(n, d)``;
2. an encoder maps each support feature to ``latent_size`` numbers, and a relation network
   scores every pair of encoded support examples; for each class, the relation outputs of
   its examples paired with all support examples are averaged into the mean and standard
   deviation of a Gaussian over that class's latent code ``(ways, latent_size)``;
3. a decoder maps a latent code to the mean and standard deviation of a Gaussian over the
   class's weight vector ``(d,)``; logits are the dot products of features and weights;
4. the inner loop takes ``adaptation_steps`` gradient steps on the support loss with
   respect to the latent codes only (step size ``fast_lr``, meta-learned);
5. the decoded weights are then fine-tuned directly for ``finetuning_steps`` steps (step
   size ``finetune_lr``, meta-learned), and the query loss of the fine-tuned weights is the
   task loss of the outer loop.

In meta-training the codes and weights are sampled (reparameterised); in evaluation (and
in ``meta_loss`` of a module in eval mode) the means are used. The outer loss adds the
paper's regularisers: the KL divergence of the latent distribution from ``N(0, I)``
(``kl_weight``), the encoder penalty ``||stopgrad(z') - z||^2`` pulling the encoder's codes
toward the adapted ones (``encoder_penalty_weight``), a weight decay on the encoder,
relation network and decoder (``l2_weight``), and the orthogonality penalty ``||C - I||^2``
on the correlation matrix of the decoder's weights (``orthogonality_weight``).

The feature extractor is either loaded from another run's checkpoint and frozen
(``encoder_checkpoint``; the paper pre-trains its features and keeps them fixed), or
trained jointly with LEO through the outer loss (``encoder_checkpoint=None``).

Differences from the paper, by choice: the KL term is computed in closed form rather
than from the sampled code; both step sizes are scalars; no gradient clipping.
"""

from __future__ import annotations

from pathlib import Path

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
from metarun.checkpoint import load_backbone
from metarun.data.episodes import Episode
from metarun.tasks import CLASSIFICATION, TaskKind, accuracy


class Gaussian:
    """A diagonal Gaussian whose parameters come from a layer's output ``(..., 2 * k)``: the
    first half is the mean, the softplus of the second half the standard deviation."""

    def __init__(self, params: torch.Tensor):
        self.mean, raw_std = params.chunk(2, dim=-1)
        self.std = F.softplus(raw_std) + 1e-6

    def sample(self, stochastic: bool) -> torch.Tensor:
        """A reparameterised sample when ``stochastic``, else the mean."""
        if not stochastic:
            return self.mean
        return self.mean + self.std * torch.randn_like(self.std)

    def kl_to_standard_normal(self) -> torch.Tensor:
        """``KL(N(mean, std^2) || N(0, I))`` averaged over all entries (a scalar)."""
        var = self.std**2
        return 0.5 * (var + self.mean**2 - 1.0 - torch.log(var)).mean()


class LEO(nn.Module):
    """LEO on top of ``backbone`` (see the module docstring); any number of ways.

    Args:
        backbone: feature extractor ``(n, C, H, W) -> (n, out_features)``.
        latent_size: size of each class's latent code.
        relation_layers: hidden layers of the relation network (each ``2 * latent_size``
            wide, as in the paper).
        fast_lr: initial step size of the latent inner loop (meta-learned).
        adaptation_steps: latent steps in meta-training.
        test_adaptation_steps: latent steps at evaluation.
        finetune_lr: initial step size of the weight fine-tuning (meta-learned).
        finetuning_steps: fine-tuning steps on the decoded weights (training and evaluation).
        dropout: dropout rate on the features (meta-training only).
        kl_weight: weight of the KL term.
        encoder_penalty_weight: weight of ``||stopgrad(z') - z||^2``.
        l2_weight: weight decay on the encoder, relation network and decoder.
        orthogonality_weight: weight of the decoder's orthogonality penalty.
        encoder_checkpoint: a checkpoint of another run (e.g. ProtoNet's ``best.pt``)
            whose backbone is loaded and frozen; ``None`` trains the backbone jointly.
        bn_mode: batch-norm mode of the backbone in evaluation (:class:`BatchNormMode`);
            a frozen backbone is also run in this mode in meta-training, and never
            updates its statistics.
        task: the dataset's task kind (given by the runner); classification only.

    Shapes:
        support ``(ways * shots, C, H, W)`` -> latent codes ``(ways, latent_size)`` ->
        classifier weights ``(ways, out_features)``; logits ``(n_query, ways)``.
    """

    capabilities = Capabilities(adaptation_steps=True)
    stacks_tasks = False

    def __init__(
        self,
        backbone: nn.Module,
        latent_size: int = 64,
        relation_layers: int = 3,
        fast_lr: float = 1.0,
        adaptation_steps: int = 5,
        test_adaptation_steps: int = 5,
        finetune_lr: float = 0.001,
        finetuning_steps: int = 5,
        dropout: float = 0.3,
        kl_weight: float = 0.001,
        encoder_penalty_weight: float = 1e-9,
        l2_weight: float = 1e-8,
        orthogonality_weight: float = 1e-3,
        encoder_checkpoint: str | None = None,
        bn_mode: BatchNormMode | str = BatchNormMode.running,
        task: TaskKind = CLASSIFICATION,
    ):
        require_classification(task, "LEO decodes one classifier weight vector per class")
        if latent_size < 1 or relation_layers < 1:
            raise ValueError(
                f"algo.latent_size and algo.relation_layers must be >= 1, got "
                f"{latent_size} and {relation_layers}"
            )
        super().__init__()
        self.backbone = backbone
        features = backbone.out_features
        self.encoder = nn.Linear(features, latent_size)
        layers: list[nn.Module] = []
        for _ in range(relation_layers):
            layers += [nn.Linear(2 * latent_size, 2 * latent_size), nn.ReLU()]
        self.relation = nn.Sequential(*layers[:-1])  # the last layer is linear
        self.decoder = nn.Linear(latent_size, 2 * features)
        self.log_fast_lr = nn.Parameter(torch.tensor(float(fast_lr)).log())
        self.log_finetune_lr = nn.Parameter(torch.tensor(float(finetune_lr)).log())
        self.adaptation_steps = adaptation_steps
        self.test_adaptation_steps = test_adaptation_steps
        self.finetuning_steps = finetuning_steps
        self.dropout = dropout
        self.kl_weight = kl_weight
        self.encoder_penalty_weight = encoder_penalty_weight
        self.l2_weight = l2_weight
        self.orthogonality_weight = orthogonality_weight
        self.bn_mode = BatchNormMode(bn_mode)
        self.frozen_backbone = encoder_checkpoint is not None
        if encoder_checkpoint is not None:
            load_backbone(backbone, Path(encoder_checkpoint))
            backbone.requires_grad_(False)

    @property
    def fast_lr(self) -> torch.Tensor:
        return self.log_fast_lr.exp()

    @property
    def finetune_lr(self) -> torch.Tensor:
        return self.log_finetune_lr.exp()

    # -- the pieces ----------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` -> ``(n, d)``. A jointly trained backbone runs as it is in
        meta-training; in evaluation, and always when frozen (then without gradients), it
        runs in ``bn_mode`` on copies of its buffers, so its statistics never change."""
        if self.training and not self.frozen_backbone:
            return self.backbone(x)
        buffers = buffer_copies(self.backbone)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            with batch_norm_mode(self.backbone, self.bn_mode):
                return functional_call(self.backbone, buffers, (x,))

    def encode(self, features: torch.Tensor, labels: torch.Tensor, ways: int) -> Gaussian:
        """The distribution of the latent codes ``(ways, latent_size)`` from the support
        features ``(n_support, d)`` and labels ``(n_support,)``."""
        codes = self.encoder(self._dropout(features))  # (n, k)
        n = codes.shape[0]
        pairs = torch.cat(
            [codes[:, None, :].expand(n, n, -1), codes[None, :, :].expand(n, n, -1)], dim=-1
        )  # (n, n, 2k): example i paired with every support example j
        per_example = self.relation(pairs).mean(dim=1)  # (n, 2k)
        sums = per_example.new_zeros(ways, per_example.shape[1]).index_add(0, labels, per_example)
        counts = torch.bincount(labels, minlength=ways).clamp_min(1).to(per_example.dtype)
        return Gaussian(sums / counts[:, None])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Classifier weights ``(ways, d)`` from latent codes ``(ways, latent_size)``:
        sampled in meta-training, the mean in evaluation."""
        return Gaussian(self.decoder(latents)).sample(self.training)

    def logits(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` features and ``(ways, d)`` weights -> ``(n, ways)`` logits."""
        return self._dropout(features) @ weights.T

    def adapt_latents(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        latents: torch.Tensor,
        steps: int,
        create_graph: bool,
    ) -> torch.Tensor:
        """The latent inner loop: ``steps`` gradient steps on the support loss of the
        decoded weights, with respect to the latent codes ``(ways, latent_size)`` only."""
        for _ in range(steps):
            loss = F.cross_entropy(self.logits(features, self.decode(latents)), labels)
            (grad,) = torch.autograd.grad(loss, latents, create_graph=create_graph)
            latents = latents - self.fast_lr * grad
        return latents

    def finetune(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        steps: int,
        create_graph: bool,
    ) -> torch.Tensor:
        """Fine-tuning: ``steps`` gradient steps on the support loss with respect to the
        decoded weights ``(ways, d)``."""
        for _ in range(steps):
            loss = F.cross_entropy(self.logits(features, weights), labels)
            (grad,) = torch.autograd.grad(loss, weights, create_graph=create_graph)
            weights = weights - self.finetune_lr * grad
        return weights

    def orthogonality_penalty(self) -> torch.Tensor:
        """Mean of ``(C - I)^2``, ``C`` the ``(latent_size, latent_size)`` correlation
        matrix of the decoder's weights, one row per latent dimension."""
        rows = self.decoder.weight.T  # (latent_size, 2d)
        rows = rows - rows.mean(dim=1, keepdim=True)
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8)
        corr = rows @ rows.T
        return ((corr - torch.eye(corr.shape[0], device=corr.device)) ** 2).mean()

    def l2_penalty(self) -> torch.Tensor:
        """Sum of the squared weights of the encoder, relation network and decoder."""
        modules = (self.encoder, self.relation, self.decoder)
        return sum(p.pow(2).sum() for m in modules for p in m.parameters())  # type: ignore[return-value]

    # -- the MetaLearner surface ---------------------------------------------------------

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        ways, n_support = episode.ways, episode.support_x.shape[0]
        feats = self.features(torch.cat([episode.support_x, episode.query_x]))
        support, query = feats[:n_support], feats[n_support:]
        latent = self.encode(support, episode.support_y, ways)
        z = latent.sample(self.training)
        z_adapted = self.adapt_latents(
            support, episode.support_y, z, self.adaptation_steps, create_graph=True
        )
        weights = self.finetune(
            support, episode.support_y, self.decode(z_adapted), self.finetuning_steps, True
        )
        logits = self.logits(query, weights)
        loss = (
            F.cross_entropy(logits, episode.query_y)
            + self.kl_weight * latent.kl_to_standard_normal()
            + self.encoder_penalty_weight * ((z_adapted.detach() - z) ** 2).mean()
            + self.l2_weight * self.l2_penalty()
            + self.orthogonality_weight * self.orthogonality_penalty()
        )
        return loss, accuracy(logits, episode.query_y)

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None
    ) -> Predictor:
        """See :class:`~metarun.algorithms.base.MetaLearner`; ``steps`` overrides
        ``test_adaptation_steps`` (latent steps; the fine-tuning steps stay)."""
        steps = self.test_adaptation_steps if steps is None else steps
        ways = int(support_y.max()) + 1
        was_training = self.training
        self.eval()  # means instead of samples, no dropout
        try:
            with torch.no_grad():
                support = self.features(support_x)
            with torch.enable_grad():
                z = self.encode(support, support_y, ways).mean.detach().requires_grad_()
                z = self.adapt_latents(support, support_y, z, steps, create_graph=False)
                weights = self.decode(z.detach()).detach().requires_grad_()
                weights = self.finetune(
                    support, support_y, weights, self.finetuning_steps, create_graph=False
                )
        finally:
            self.train(was_training)
        weights = weights.detach()

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), batch_norm_mode(self.backbone, self.bn_mode):
                feats = functional_call(self.backbone, buffer_copies(self.backbone), (query_x,))
            return feats @ weights.T

        return predict

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, training=self.training)
