"""``algo.engine=l2l``: MAML and Meta-SGD meta-losses computed by learn2learn's own
``MAML``/``MetaSGD`` wrappers (Arnold et al. 2020), the parity check of metarun's native
engines. With :mod:`metarun.data.learn2learn` this is one of the two modules that import
learn2learn, and only when an ``l2l`` engine runs.
"""

from __future__ import annotations

import torch

from metarun.data.episodes import Episode
from metarun.data.learn2learn import import_learn2learn


def l2l_meta_loss(algo: torch.nn.Module, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's query loss and metric computed by learn2learn's own MAML or Meta-SGD
    (``algo.engine=l2l``): ``clone()``, ``adapt()`` for each inner step, then the query.

    The wrapper is built around ``algo``'s live network (and, for Meta-SGD, its learned
    learning rates), so the meta-gradient lands on ``algo``'s parameters and the runner's
    optimizer, checkpoints and evaluation are unchanged. This is the parity check of the
    native engines (``tests/test_learn2learn_engine.py``) and an option for users who
    want learn2learn's implementation inside metarun's runner.

    Args:
        algo: a :class:`~metarun.algorithms.MAML` or :class:`~metarun.algorithms.MetaSGD`.
        episode: one task: support ``(n_support, C, H, W)`` and query ``(n_query, C, H, W)``.
    """
    l2l = import_learn2learn()
    if hasattr(algo, "lrs"):  # Meta-SGD's learned per-parameter learning rates
        wrapper = l2l.algorithms.MetaSGD(algo.model, first_order=algo.first_order, lrs=algo.lrs)
    else:
        wrapper = l2l.algorithms.MAML(algo.model, lr=algo.fast_lr, first_order=algo.first_order)
    learner = wrapper.clone()
    for _ in range(algo.adaptation_steps):
        learner.adapt(algo.task.loss(learner(episode.support_x), episode.support_y))
    predictions = learner(episode.query_x)
    loss = algo.task.loss(predictions, episode.query_y)
    return loss, algo.task.score(predictions, episode.query_y)
