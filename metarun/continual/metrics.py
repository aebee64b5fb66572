"""The accuracy matrix of a task stream and the summaries computed from it.

``R[i][j]`` is the accuracy on task ``j`` after training on tasks ``0..i`` (``T x T``,
``T`` tasks; every task is scored after every task, future ones included), and ``b[j]``
the accuracy on task ``j`` of the model before any training, scored with the same
outputs in play as ``R[j-1][j]``.

- ACC (average accuracy): ``mean_j R[T-1][j]``.
- BWT (backward transfer, Lopez-Paz & Ranzato 2017): ``mean_{j<T-1} R[T-1][j] - R[j][j]``;
  negative is forgetting.
- FWT (forward transfer, same paper): ``mean_{j>0} R[j-1][j] - b[j]``.
- Forgetting (Chaudhry et al. 2018, "Riemannian Walk"): ``mean_{j<T-1} f_j`` with
  ``f_j = max_{j <= l < T-1} R[l][j] - R[T-1][j]``, the drop from the best accuracy task
  ``j`` had once learned. The maximum starts at ``l = j``: rows before task ``j`` was
  trained on do not count, so a task never learned has no forgetting to report (0), not
  a negative one.

With a single task BWT, FWT and forgetting are undefined and are returned as ``None``.
Inputs are plain lists (or tensors) so the formulas can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _matrix(R: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(R, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got {tuple(m.shape)}")
    return m


def average_accuracy(R) -> float:
    """ACC: mean accuracy over all tasks after the last one."""
    m = _matrix(R)
    return float(m[-1].mean())


def backward_transfer(R) -> float | None:
    """BWT: mean change on earlier tasks between learning them and the end of the stream."""
    m = _matrix(R)
    T = m.shape[0]
    if T < 2:
        return None
    return float((m[-1, : T - 1] - m.diagonal()[: T - 1]).mean())


def forward_transfer(R, initial: Sequence[float] | torch.Tensor) -> float | None:
    """FWT: mean accuracy on each task just before training on it, minus the untrained
    model's (``initial`` = ``b``, one value per task)."""
    m = _matrix(R)
    T = m.shape[0]
    b = torch.as_tensor(initial, dtype=torch.float64)
    if b.shape != (T,):
        raise ValueError(f"initial must hold one accuracy per task ({T}), got {tuple(b.shape)}")
    if T < 2:
        return None
    before = torch.stack([m[j - 1, j] for j in range(1, T)])
    return float((before - b[1:]).mean())


def forgetting(R) -> float | None:
    """Average forgetting (max-based, Chaudhry et al. 2018) over all tasks but the last."""
    m = _matrix(R)
    T = m.shape[0]
    if T < 2:
        return None
    drops = [float(m[j : T - 1, j].max() - m[T - 1, j]) for j in range(T - 1)]
    return sum(drops) / len(drops)


def summarize(R, initial) -> dict[str, float | None]:
    """``{"acc", "bwt", "fwt", "forgetting"}`` of one run."""
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, initial),
        "forgetting": forgetting(R),
    }


# Viridis sampled at 5 points; cells are coloured by linear interpolation between them.
_COLORS = torch.tensor(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=torch.float32,
)


def heatmap(R: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """The accuracy matrix as an RGB image for TensorBoard, drawn with torch only.

    Args:
        R: ``(rows, T)`` accuracies in [0, 1]; rows not yet trained are absent.
        cell: pixels per matrix cell.

    Returns:
        ``(3, rows * cell, T * cell)`` uint8; row ``i`` (after task ``i``) at the top,
        0 dark purple, 1 yellow, a 1-pixel grey grid between cells.
    """
    v = R.detach().float().clamp(0, 1) * (len(_COLORS) - 1)
    lo = v.floor().long().clamp(max=len(_COLORS) - 2)
    frac = (v - lo).unsqueeze(-1)
    rgb = _COLORS[lo] * (1 - frac) + _COLORS[lo + 1] * frac  # (rows, T, 3)
    img = rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    img[::cell, :, :] = 128
    img[:, ::cell, :] = 128
    return img.permute(2, 0, 1).round().to(torch.uint8)
