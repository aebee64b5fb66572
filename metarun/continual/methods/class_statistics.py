"""Learners that cannot forget: a meta-learned encoder, frozen in the stream, and a class
model built from sufficient statistics of each class's features (count, sum, sum of
squares). The statistics after a stream are the same whatever order the stream came in, so
these learners have nothing to forget and no learning rate to tune.

- :class:`Prototypes`: the prototype learner, a metric-learned encoder (Prototypical
  Networks, Snell et al. 2017) with running class means; the strong baseline of the
  meta-continual benchmark.
- :class:`SBMCL`: Sequential Bayesian Meta-Continual Learning (Lee et al., ICML 2024,
  "Learning to Continually Learn with the Bayesian Principle"), classification as its code
  does it (the GeMCL model of Banayeeanzade et al. 2021): per class and feature dimension a
  Gaussian of unknown mean and precision under a Normal-Gamma prior whose two scalars are
  meta-learned, predicting with the exact Student-t posterior predictive; or
  (``covariance="shared"``) one full covariance shared by all classes under an
  inverse-Wishart prior, predicting with the multivariate t.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metarun.continual.methods.base import (
    ContinualLearner,
    MetaLog,
    StreamCapabilities,
    decayed,
    draw_classes,
    draw_items,
    pool_images,
    require_meta_training,
)
from metarun.data.episodes import ClassPool
from metarun.tasks import CLASSIFICATION, TaskKind


class ClassStatistics(ContinualLearner):
    """The shared part: a backbone (the encoder) meta-trained on episodes, and per-class
    statistics of its features, ``count (n_classes,)``, ``total (n_classes, d)`` and
    ``squares (n_classes, d)`` (and, for a class model with :attr:`needs_scatter`, the
    sum of outer products ``scatter (d, d)`` over every example), kept in float64 as buffers
    (so a resumed stream continues them). Subclasses give the class scores
    (:meth:`class_logits`).

    Meta-training: ``meta_iterations`` episodes, each ``ways`` classes of the meta-training
    pool (at random, or with ``episode_classes="grouped"`` group by group: whole alphabets,
    so that a class's rivals are mostly characters of its own alphabet, as in a long
    stream) with ``shots`` support and ``query_shots`` query images per class; the class
    model is built from the support features and the loss is the cross-entropy of the
    queries' scores; Adam at ``meta_lr``, halved every ``lr_decay_every`` episodes (0: never).
    With ``augment="affine"`` every meta-training image is randomly distorted (Koch et al.'s
    affine distortions, :mod:`metarun.data.augment`); the stream's images never are.
    ``meta_max_minutes`` ends meta-training once that much time has been spent in it (the
    recipe keeps the clock, across resumes).
    With ``encoder_checkpoint`` (a metarun run's ``best.pt``, e.g. a ProtoNet run) the
    backbone starts from that run's encoder (``meta_iterations=0`` then uses it as it is).

    In the stream every example only adds its features to its class's statistics; the
    encoder is fixed (evaluated with running batch-norm statistics).
    """

    capabilities = StreamCapabilities(
        task_kinds=("classification",),
        needs_meta_training=True,
        frozen_embedding=True,
        stream_lr=False,
    )
    needs_scatter = False  # whether class_logits uses the sum of outer products

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        meta_lr: float = 1e-3,
        meta_iterations: int = 6000,
        ways: int = 60,
        shots: int = 5,
        query_shots: int = 5,
        lr_decay_every: int = 2000,
        meta_max_minutes: float | None = None,
        encoder_checkpoint: str | None = None,
        episode_classes: str = "random",
        augment: str = "none",
        task: TaskKind = CLASSIFICATION,
    ):
        super().__init__(backbone, n_classes, input_shape, seed, lr=meta_lr, task=task)
        if episode_classes not in ("random", "grouped"):
            raise ValueError(f"episode_classes must be random or grouped, not {episode_classes!r}")
        self.grouped_episodes = episode_classes == "grouped"
        if augment not in ("none", "affine"):
            raise ValueError(f"augment must be none or affine, not {augment!r}")
        self.augment = augment == "affine"
        self.meta_iterations, self.meta_max_minutes = meta_iterations, meta_max_minutes
        self.episode = (ways, shots, query_shots)
        self.lr_decay_every = lr_decay_every
        if encoder_checkpoint:
            from metarun.checkpoint import load_backbone

            load_backbone(backbone, Path(encoder_checkpoint))
        d = backbone.out_features
        self.register_buffer("count", torch.zeros(n_classes, dtype=torch.float64))
        self.register_buffer("total", torch.zeros(n_classes, d, dtype=torch.float64))
        self.register_buffer("squares", torch.zeros(n_classes, d, dtype=torch.float64))
        scatter = torch.zeros(d, d, dtype=torch.float64) if self.needs_scatter else None
        self.register_buffer("scatter", scatter)  # None: not in the state (older runs load)

    def make_optimizer(self) -> torch.optim.Optimizer:
        encoder = [p for n, p in self.named_parameters() if not n.startswith("head.")]
        return torch.optim.Adam(encoder, lr=self.lr)

    # --- the class model ------------------------------------------------------------------

    def class_logits(
        self,
        z: torch.Tensor,
        count: torch.Tensor,
        total: torch.Tensor,
        squares: torch.Tensor,
        scatter: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scores ``(n, k)`` of features ``z (n, d)`` for ``k`` classes with statistics
        ``count (k,)``, ``total (k, d)``, ``squares (k, d)`` (all with ``count >= 1``) and
        ``scatter (d, d)``, the sum of ``z z^T`` over all their examples (``None`` unless
        :attr:`needs_scatter`)."""
        raise NotImplementedError

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """Scores of ``z (n, d)`` for every output; ``-inf`` for classes not seen yet."""
        seen = self.count > 0
        out = torch.full(
            (z.shape[0], self.count.numel()), float("-inf"), dtype=torch.float64, device=z.device
        )
        if seen.any():
            out[:, seen] = self.class_logits(
                z.double(), self.count[seen], self.total[seen], self.squares[seen], self.scatter
            )
        return out

    # --- meta-training ----------------------------------------------------------------------

    def pretrain(self, pool: ClassPool | None, iteration: int, log: MetaLog) -> int:
        require_meta_training(pool, type(self).__name__)
        ways, shots, queries = self.episode
        if ways > pool.n_classes:
            raise ValueError(f"algo.ways={ways} exceeds the {pool.n_classes} meta-training classes")
        self.train()
        for it in range(iteration, self.meta_iterations):
            for group in self.optimizer.param_groups:
                group["lr"] = decayed(self.lr, it, self.lr_decay_every)
            classes = draw_classes(pool, ways, self.grouped_episodes, self.generator)
            items = draw_items(pool, classes, shots + queries, self.generator)
            x = pool_images(pool, items, self, self.generator if self.augment else None)
            with self.autocast():
                z = self.backbone(x).float()
            z = z.view(ways, shots + queries, -1)
            support, query = z[:, :shots], z[:, shots:].reshape(ways * queries, -1)
            count = torch.full((ways,), float(shots), device=z.device)
            flat = support.reshape(ways * shots, -1)
            scatter = flat.T @ flat if self.needs_scatter else None
            logits = self.class_logits(
                query, count, support.sum(1), support.pow(2).sum(1), scatter
            ).float()
            labels = torch.arange(ways, device=z.device).repeat_interleave(queries)
            loss = F.cross_entropy(logits, labels)
            self._step(loss, "meta-training")
            acc = (logits.argmax(1) == labels).float().mean().item()
            if log(it + 1, loss.item(), acc):
                return it + 1
        return self.meta_iterations

    # --- the stream -------------------------------------------------------------------------

    def begin_stream(self, lr: float | None, n_classes: int | None = None) -> None:
        self.count.zero_()
        self.total.zero_()
        self.squares.zero_()
        if self.scatter is not None:
            self.scatter.zero_()

    @torch.no_grad()
    def observe_embedded(self, z, y, classes, score=True):
        z = z.double()
        metric = math.nan  # the prediction before the update: the costly part of a step
        if score:
            metric = self.task.score(self.in_play(self.scores(z), classes), y).item()
        self.count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.total.index_add_(0, y, z)
        self.squares.index_add_(0, y, z.pow(2))
        if self.scatter is not None:
            self.scatter.add_(z.T @ z)
        return None, metric  # no loss is minimised in the stream

    def observe(self, x, y, classes):
        return self.observe_embedded(self.embed(x), y, classes)

    def predict_embedded(self, z: torch.Tensor) -> torch.Tensor:
        return self.scores(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(self.embed(x))


class Prototypes(ClassStatistics):
    """The prototype learner: squared Euclidean distance to each class's running mean
    (Snell et al. 2017's classifier, with the means updated one example at a time).
    Meta-training is Prototypical Networks' episodic training."""

    def class_logits(self, z, count, total, squares, scatter):
        means = total / count[:, None]
        return -torch.cdist(z, means.to(z.dtype)).pow(2)


class SBMCL(ClassStatistics):
    """SB-MCL for classification. The class model is Gaussian with a flat prior on each
    class's mean; the features' (co)variance has a conjugate prior whose parameters are
    meta-learned with the encoder. Both models have an exact sequential update of
    sufficient statistics: the posterior after a stream equals the posterior from all its
    examples at once, in any order. A class's score is the log posterior predictive density
    of the features, with every constant kept (classes may have seen different numbers of
    examples).

    ``covariance="diagonal"`` (the authors' model): each class ``c`` and feature ``j`` a
    Gaussian of unknown mean and precision, precision ``Gamma(alpha, beta)`` (``alpha``
    and ``beta`` shared scalars). After ``n`` examples with mean ``m`` and sum of squared
    deviations ``S``, the predictive of a new feature value is Student's t with ``2
    alpha'`` degrees of freedom, location ``m`` and squared scale ``beta' / alpha' (1 + 1 /
    n)``, ``alpha' = alpha + n / 2``, ``beta' = beta + S / 2``; summed over ``j``.
    The authors' code (github.com/soochan-lee/SB-MCL, ``models/gemcl.py``, the GeMCL model of
    Banayeeanzade et al. 2021) adds ``log`` of the variance where the exact density has half
    of it; metarun uses the exact density.

    ``covariance="shared"``: one ``d x d`` covariance ``Sigma`` shared by all classes,
    ``Sigma ~ inverse-Wishart(kappa s I, kappa + d + 1)`` (prior mean ``s I``, worth
    ``kappa`` examples; ``kappa`` and ``s`` meta-learned). After ``n`` examples of ``k``
    classes with pooled within-class scatter ``W``, the predictive of class ``c`` (``n_c``
    examples, mean ``m_c``) is the multivariate t with ``nu = kappa + n - k + 2`` degrees of
    freedom, location ``m_c`` and scale ``(kappa s I + W)(1 + 1 / n_c) / nu``. The features'
    correlations within classes, which the diagonal model ignores, are learned from the
    stream; with few examples the prior keeps the covariance near ``s I`` (the prototype
    learner's metric). Statistics: per class ``(n_c, sum)``, and ``sum z z^T`` over all.

    Args:
        covariance: ``"diagonal"`` or ``"shared"``.
        alpha, beta: the diagonal model's initial prior (the authors': 100 and 1000).
        kappa, scale: the shared model's initial prior strength (in examples) and variance.
    """

    def __init__(
        self,
        *args,
        covariance: str = "diagonal",
        alpha: float = 100.0,
        beta: float = 1000.0,
        kappa: float = 1000.0,
        scale: float = 1.0,
        **kwargs,
    ):
        if covariance not in ("diagonal", "shared"):
            raise ValueError(f"covariance={covariance!r}: use 'diagonal' or 'shared'")
        self.covariance = covariance
        self.needs_scatter = covariance == "shared"  # before the buffers are made
        super().__init__(*args, **kwargs)
        if covariance == "diagonal":
            self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
            self.log_beta = nn.Parameter(torch.tensor(math.log(beta)))
        else:
            self.log_kappa = nn.Parameter(torch.tensor(math.log(kappa)))
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.optimizer = self.make_optimizer()  # now with the prior's two scalars

    def class_logits(self, z, count, total, squares, scatter):
        if self.covariance == "shared":
            return self._shared_logits(z, count, total, scatter)
        alpha, beta = self.log_alpha.exp().to(z.dtype), self.log_beta.exp().to(z.dtype)
        n = count[:, None].to(z.dtype)
        mean = total.to(z.dtype) / n
        deviations = (squares.to(z.dtype) - total.to(z.dtype).pow(2) / n).clamp(min=0)
        a = alpha + n / 2  # (k, 1)
        b = beta + deviations / 2  # (k, d)
        nu = 2 * a
        scale2 = b / a * (1 + 1 / n)  # (k, d)
        constant = (
            torch.lgamma((nu + 1) / 2)
            - torch.lgamma(nu / 2)
            - 0.5 * torch.log(nu * math.pi * scale2)
        ).sum(-1)  # (k,)
        rows = max(1, 2**22 // max(1, mean.numel()))  # queries per chunk: (rows, k, d) <= 4M
        out = []
        for part in z.split(rows):
            diff2 = (part[:, None, :] - mean[None]).pow(2)  # (rows, k, d)
            out.append(constant - ((nu + 1) / 2 * torch.log1p(diff2 / (nu * scale2))).sum(-1))
        return torch.cat(out)

    def _shared_logits(self, z, count, total, scatter):
        dtype, d = z.dtype, z.shape[1]
        kappa, s = self.log_kappa.exp().to(dtype), self.log_scale.exp().to(dtype)
        count, total, scatter = count.to(dtype), total.to(dtype), scatter.to(dtype)
        mean = total / count[:, None]  # (k, d)
        within = scatter - (total.T / count) @ total  # W: scatter about each class's mean
        psi = within + kappa * s * torch.eye(d, dtype=dtype, device=z.device)
        nu = kappa + count.sum() - count.numel() + 2
        inflation = 1 + 1 / count  # (k,)
        # Mahalanobis distances under psi, as Euclidean ones after whitening by its Cholesky
        # factor L (psi = L L^T): (z - m)^T psi^-1 (z - m) = |L^-1 z - L^-1 m|^2.
        L = torch.linalg.cholesky(0.5 * (psi + psi.T))
        white = torch.linalg.solve_triangular(L, torch.cat([z, mean]).T, upper=False).T
        distance2 = torch.cdist(white[: len(z)], white[len(z) :]).pow(2)  # (n, k)
        # log t_nu(x; m_c, psi (1 + 1/n_c) / nu), every term kept
        log_det = 2 * L.diagonal().log().sum() - d * torch.log(nu) + d * inflation.log()  # (k,)
        constant = (
            torch.lgamma((nu + d) / 2) - torch.lgamma(nu / 2) - d / 2 * torch.log(nu * math.pi)
        )
        return constant - 0.5 * log_det - (nu + d) / 2 * torch.log1p(distance2 / inflation)
