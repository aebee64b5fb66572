"""Accuracy over fixed, seeded episodes, reported as mean and 95% confidence interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metarun.algorithms.base import MetaLearner, accuracy
from metarun.data.episodes import ClassPool, EpisodeSampler
from metarun.hardware import Hardware


@dataclass
class EvalResult:
    """``mean`` accuracy over ``episodes`` and the half-width ``ci95 = 1.96 * std / sqrt(n)``
    of its normal 95% confidence interval (std over episodes, n - 1 in the denominator)."""

    mean: float
    ci95: float
    episodes: int

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f}% ({self.episodes} episodes)"


def fixed_episodes(
    pool: ClassPool, ways: int, shots: int, query_shots: int, seed: int
) -> EpisodeSampler:
    """A sampler whose episodes depend only on the pool, the episode shape and ``seed``, so
    every run and every algorithm is evaluated on the same episodes."""
    return EpisodeSampler(pool, ways, shots, query_shots, seed=seed)


def evaluate(
    algo: MetaLearner, sampler: EpisodeSampler, episodes: int, hardware: Hardware
) -> EvalResult:
    """Adapts ``algo`` to the support set of each of the next ``episodes`` episodes and
    scores its query predictions. The algorithm's state is left as it was."""
    was_training = algo.training  # type: ignore[attr-defined]
    algo.eval()  # type: ignore[attr-defined]
    accs = torch.empty(episodes)
    try:
        for i in range(episodes):
            ep = sampler.sample().to(hardware.device)
            with hardware.autocast():
                predict = algo.adapt(ep.support_x, ep.support_y)
                with torch.no_grad():
                    accs[i] = accuracy(predict(ep.query_x), ep.query_y).item()
    finally:
        algo.train(was_training)  # type: ignore[attr-defined]
    std = accs.std().item() if episodes > 1 else 0.0
    return EvalResult(accs.mean().item(), 1.96 * std / math.sqrt(episodes), episodes)
