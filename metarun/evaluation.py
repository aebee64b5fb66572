"""A task metric (accuracy, or MSE for regression) over fixed, seeded episodes, reported as
mean and 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from metarun.algorithms.base import MetaLearner
from metarun.data.episodes import ClassPool, Episode, EpisodeSampler
from metarun.hardware import Hardware
from metarun.options import EpisodeKind
from metarun.tasks import accuracy


@dataclass
class EvalResult:
    """``mean`` of the ``metric`` over ``episodes`` and the half-width
    ``ci95 = 1.96 * std / sqrt(n)`` of its normal 95% confidence interval (std over
    episodes, n - 1 in the denominator). ``extra`` holds the same summary,
    ``{"mean": ..., "ci95": ..., "episodes": ...}``, of each per-episode metric that an
    algorithm reports through an ``episode_metrics(episode) -> dict[str, float]`` method
    (MANN's accuracy by instance number). ``scores`` holds the metric of each episode, in
    the order the sampler drew them."""

    mean: float
    ci95: float
    episodes: int
    metric: str = "acc"
    extra: dict[str, dict[str, float]] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        if self.metric == "acc":
            return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f}% ({self.episodes} episodes)"
        diverged = sum(not math.isfinite(x) for x in self.scores)  # e.g. too many SGD steps
        note = f", {diverged} not finite" if diverged else ""
        return f"{self.metric} {self.mean:.4f} ± {self.ci95:.4f} ({self.episodes} episodes{note})"


EPISODE_KINDS = tuple(kind.value for kind in EpisodeKind)  # standard, within_alphabet


def episode_sampler(
    pool: ClassPool,
    ways: int,
    shots: int,
    query_shots: int,
    seed: int,
    episodes: str = "standard",
    augment: str = "none",
) -> EpisodeSampler:
    """The seeded sampler of a split: an :class:`EpisodeSampler` over a class pool, or the
    split's own sampler for a task family that is not made of classes (sinusoids).
    ``episodes="within_alphabet"`` draws every episode's classes from one alphabet, support
    and query by different drawers (:mod:`metarun.data.within_alphabet`);
    ``augment="affine"`` distorts every image (:mod:`metarun.data.augment`, training only)."""
    episodes = str(getattr(episodes, "value", episodes))
    if episodes not in EPISODE_KINDS:
        raise ValueError(f"unknown episodes: {episodes!r}; choose one of {EPISODE_KINDS}")
    if hasattr(pool, "sampler"):
        if episodes != "standard":
            raise ValueError(f"episodes: {episodes} needs a dataset of classes, not {pool}")
        sampler = pool.sampler(ways, shots, query_shots, seed)
    elif episodes == "within_alphabet":
        from metarun.data.within_alphabet import WithinAlphabetSampler

        sampler = WithinAlphabetSampler(pool, ways, shots, query_shots, seed)
    else:
        sampler = EpisodeSampler(pool, ways, shots, query_shots, seed=seed)
    augment = str(getattr(augment, "value", augment))
    if augment == "affine":
        from metarun.data.augment import AffineAugmented

        return AffineAugmented(sampler, seed=seed + 1)  # type: ignore[return-value]
    if augment != "none":
        raise ValueError(f"unknown augment: {augment!r}; choose none or affine")
    return sampler


def fixed_episodes(
    pool: ClassPool, ways: int, shots: int, query_shots: int, seed: int, episodes: str = "standard"
) -> EpisodeSampler:
    """A sampler whose episodes depend only on the pool, the episode shape, the kind of
    episodes (``standard`` or ``within_alphabet``) and ``seed``, so every run and every
    algorithm is evaluated on the same episodes."""
    return episode_sampler(pool, ways, shots, query_shots, seed, episodes)


class EvaluationStopped(Exception):
    """``should_stop`` asked :func:`evaluate` to stop (Ctrl-C during validation or test)."""


def evaluate(
    algo: MetaLearner,
    sampler: EpisodeSampler,
    episodes: int,
    hardware: Hardware,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = accuracy,
    metric: str = "acc",
    steps: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_episode: Callable[[], None] | None = None,
    views: int = 0,
) -> EvalResult:
    """Adapts ``algo`` to the support set of each of the next ``episodes`` episodes and
    scores its query predictions with ``score`` (the task's metric, named ``metric``).
    ``steps`` asks an algorithm that declares ``adaptation_steps`` for that many adaptation
    steps instead of its ``test_adaptation_steps``. ``should_stop`` is asked before each
    episode; when it answers yes, :class:`EvaluationStopped` is raised. ``on_episode`` is
    called after each episode (a progress bar). ``views > 0`` (test-time distortions, for
    image classification): each episode is also predicted ``views`` times with every support
    and query image randomly distorted (:func:`metarun.data.augment.warp`, Koch et al.'s
    distortions, from a generator seeded the same for every run), and the logits averaged.
    The algorithm's state is left as it was."""
    capabilities = type(algo).capabilities
    if steps is not None and not capabilities.adaptation_steps:
        raise ValueError(f"{type(algo).__name__} takes no adaptation step count")
    extra: dict[str, list[float]] = {}
    was_training = algo.training  # type: ignore[attr-defined]
    algo.eval()  # type: ignore[attr-defined]
    accs = torch.empty(episodes)
    generator = torch.Generator().manual_seed(0)  # the test-time distortions (views)
    try:
        for i in range(episodes):
            if should_stop is not None and should_stop():
                raise EvaluationStopped
            ep = sampler.sample().to(hardware.device, hardware.memory_format)
            predictions = predict_queries(algo, ep, hardware, steps)
            if views:
                predictions = predictions.float()
                for _ in range(views):
                    bent = distorted(ep, generator, hardware)
                    predictions += predict_queries(algo, bent, hardware, steps).float()
                predictions /= views + 1
            with hardware.autocast():
                with torch.no_grad():
                    accs[i] = score(predictions, ep.query_y).item()
                if capabilities.episode_metrics:
                    for name, value in algo.episode_metrics(ep).items():
                        extra.setdefault(name, []).append(value)
            if on_episode is not None:
                on_episode()
    finally:
        algo.train(was_training)  # type: ignore[attr-defined]
    mean, ci95 = mean_ci95(accs)
    summaries = {}
    for name, values in extra.items():
        m, c = mean_ci95(torch.tensor(values))
        summaries[name] = {"mean": m, "ci95": c, "episodes": len(values)}
    return EvalResult(mean, ci95, episodes, metric, summaries, accs.tolist())


def predict_queries(
    algo: MetaLearner, episode: Episode, hardware: Hardware, steps: int | None = None
) -> torch.Tensor:
    """``algo`` adapts to the episode's support set and predicts its queries, in
    ``hardware``'s precision; the episode is on ``hardware``'s device already
    (:meth:`Episode.to`). ``steps``: as in :func:`evaluate`. Every query is predicted in
    one batch, as in the test episodes (with ``bn_mode=transductive`` the queries share
    their batch-norm statistics). Returns ``(n_query, ways)`` logits or ``(n_query,
    outputs)`` targets. The evaluation (:func:`evaluate`) and ``metarun adapt``
    (:meth:`metarun.trained.Trained.predict`) both predict through this function."""
    adapt_kwargs = {} if steps is None else {"steps": steps}
    with hardware.autocast():
        predict = algo.adapt(episode.support_x, episode.support_y, **adapt_kwargs)
        with torch.no_grad():
            return predict(episode.query_x)


def distorted(episode: Episode, generator: torch.Generator, hardware: Hardware) -> Episode:
    """The episode with every support and query image randomly distorted (floats in [0, 1]
    on ``hardware``'s device, in its memory format)."""
    from metarun.data.augment import warp

    def bent(x: torch.Tensor) -> torch.Tensor:
        return warp(x, generator).contiguous(memory_format=hardware.memory_format)

    return Episode(
        bent(episode.support_x), episode.support_y, bent(episode.query_x), episode.query_y,
        episode.classes,
    )  # fmt: skip


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean of ``(n,)`` per-episode values and the half-width of its normal 95% confidence
    interval, ``1.96 * std / sqrt(n)`` (0 for a single value)."""
    n = values.numel()
    std = values.std().item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(n)
