"""The matrix of a task stream and the summaries computed from it.

``R[i][j]`` is the metric of task ``j`` after training on tasks ``0..i`` (``T x T``,
``T`` tasks; every task is scored after every task, future ones included), and ``b[j]``
the metric of task ``j`` for the model before any training, scored with the same outputs
in play as ``R[j-1][j]``. The metric is the scenario's: accuracy (``acc``, higher is
better) for classification streams, mean squared error (``mse``, lower is better) for
regression streams.

- ACC (average accuracy) or average MSE: ``mean_j R[T-1][j]``, reported under the
  metric's name (``acc`` or ``mse``).
- BWT (backward transfer, Lopez-Paz & Ranzato 2017): ``mean_{j<T-1} R[T-1][j] - R[j][j]``
  for accuracy, ``mean_{j<T-1} R[j][j] - R[T-1][j]`` for MSE: positive when the earlier
  tasks got better after learning the later ones, negative when they were forgotten.
- FWT (forward transfer, same paper): ``mean_{j>0} R[j-1][j] - b[j]`` for accuracy,
  ``mean_{j>0} b[j] - R[j-1][j]`` for MSE: positive when learning the earlier tasks
  helped a task before it was trained on.
- Forgetting (Chaudhry et al. 2018, "Riemannian Walk"): ``mean_{j<T-1} f_j``, the drop
  from the best value task ``j`` had once learned: ``f_j = max_{j <= l < T-1} R[l][j] -
  R[T-1][j]`` for accuracy, ``f_j = R[T-1][j] - min_{j <= l < T-1} R[l][j]`` for MSE.
  Positive forgetting means "got worse" for both metrics. The best value is taken from
  row ``l = j`` on: rows before task ``j`` was trained on do not count, so a task never
  learned has no forgetting to report (0), not a negative one.

With a single task BWT, FWT and forgetting are undefined and are returned as ``None``.
Inputs are plain lists (or tensors) so the formulas can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HIGHER_IS_BETTER = {"acc": True, "mse": False}
"""The metrics a matrix can hold and their direction."""


def _matrix(R: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(R, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got {tuple(m.shape)}")
    return m


def _sign(higher_is_better: bool) -> float:
    """+1 for accuracy, -1 for MSE: multiplies a change so that positive means better."""
    return 1.0 if higher_is_better else -1.0


def average_accuracy(R) -> float:
    """ACC: mean metric over all tasks after the last one (the average MSE for regression)."""
    m = _matrix(R)
    return float(m[-1].mean())


def backward_transfer(R, higher_is_better: bool = True) -> float | None:
    """BWT: mean change on earlier tasks between learning them and the end of the stream,
    signed so that positive is an improvement and negative is forgetting."""
    m = _matrix(R)
    T = m.shape[0]
    if T < 2:
        return None
    change = (m[-1, : T - 1] - m.diagonal()[: T - 1]).mean()
    return float(_sign(higher_is_better) * change)


def forward_transfer(
    R, initial: Sequence[float] | torch.Tensor, higher_is_better: bool = True
) -> float | None:
    """FWT: mean metric on each task just before training on it, against the untrained
    model's (``initial`` = ``b``, one value per task); positive is an improvement."""
    m = _matrix(R)
    T = m.shape[0]
    b = torch.as_tensor(initial, dtype=torch.float64)
    if b.shape != (T,):
        raise ValueError(f"initial must hold one accuracy per task ({T}), got {tuple(b.shape)}")
    if T < 2:
        return None
    before = torch.stack([m[j - 1, j] for j in range(1, T)])
    return float(_sign(higher_is_better) * (before - b[1:]).mean())


def forgetting(R, higher_is_better: bool = True) -> float | None:
    """Average forgetting (max-based, Chaudhry et al. 2018) over all tasks but the last:
    how much worse each task ends than the best it had been once learned (positive =
    worse, for accuracy and for MSE alike)."""
    m = _matrix(R)
    T = m.shape[0]
    if T < 2:
        return None
    if higher_is_better:
        drops = [float(m[j : T - 1, j].max() - m[T - 1, j]) for j in range(T - 1)]
    else:
        drops = [float(m[T - 1, j] - m[j : T - 1, j].min()) for j in range(T - 1)]
    return sum(drops) / len(drops)


def summarize(R, initial, metric: str = "acc") -> dict[str, float | None]:
    """``{metric, "bwt", "bwt_gem", "fwt", "forgetting"}`` of one run, where ``metric``
    (``acc`` or ``mse``) names what ``R`` holds and keys its average over the tasks.
    ``bwt_gem`` is BWT as GEM's code computes it (Lopez-Paz & Ranzato 2017, and MER and
    La-MAML after it): the same sum divided by ``T`` instead of ``T - 1``, the last task's
    zero term included; it is what their tables report."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(HIGHER_IS_BETTER)}")
    hib = HIGHER_IS_BETTER[metric]
    bwt = backward_transfer(R, hib)
    T = _matrix(R).shape[0]
    return {
        metric: average_accuracy(R),
        "bwt": bwt,
        "bwt_gem": None if bwt is None else bwt * (T - 1) / T,
        "fwt": forward_transfer(R, initial, hib),
        "forgetting": forgetting(R, hib),
    }
