"""Figures a person reads without help: the accuracy matrix of a task stream, accuracy
against the number of classes, adapted sinusoid curves, and ``metarun report``'s plots.

Drawn with matplotlib (the optional extra ``pip install 'metarun[plots]'``), imported only
when a figure is drawn, on its own Agg canvas (no pyplot, no window, no global state).
Each function returns a :class:`matplotlib.figure.Figure`: pass it to TensorBoard's
``SummaryWriter.add_figure(tag, figure, step)``, to a :mod:`metarun.loggers` backend's
``log_figure``, or to :func:`to_rgb` for an image (``add_image(tag, to_rgb(fig), step)``)
and to :func:`save_png` for a file. The accuracy matrix also has a text form,
:func:`matrix_markdown`, for TensorBoard's text plugin (``add_text``), which renders markdown.

Without matplotlib, :func:`available` is False and :func:`warn_missing` logs one warning
per process: a run skips its figures and goes on; :func:`require` raises with the fix.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the type hints: matplotlib is imported where a figure is drawn
    import numpy as np
    from matplotlib.figure import Figure

log = logging.getLogger("metarun")

INSTALL = "pip install 'metarun[plots]'"
_warned = False


def available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def require(what: str = "this figure") -> None:
    """Raises ``ModuleNotFoundError`` naming the extra to install when matplotlib is missing."""
    if not available():
        raise ModuleNotFoundError(f"{what} needs matplotlib: {INSTALL}")


def warn_missing() -> bool:
    """True when figures can be drawn; otherwise logs (once per process) that they are
    skipped and how to get them, and returns False."""
    global _warned
    if available():
        return True
    if not _warned:
        log.warning("matplotlib is not installed: figures are skipped (%s)", INSTALL)
        _warned = True
    return False


def _figure(width: float, height: float) -> Figure:
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_rgb(fig: Figure) -> np.ndarray:
    """The figure as an image: ``(3, H, W)`` uint8, TensorBoard's ``add_image`` layout."""
    import numpy as np

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))


def save_png(fig: Figure, path: Path | str) -> Path:
    """Writes the figure as a PNG file and returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    return path


def _as_rows(matrix: Any) -> list[list[float]]:
    rows = [
        [float(v) for v in row]
        for row in (matrix.tolist() if hasattr(matrix, "tolist") else matrix)
    ]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("the matrix must have at least one row, all of the same length")
    return rows


def _cell(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{100 * value:.1f}" if metric == "acc" else f"{value:.3g}"


def _task_labels(n: int, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return [f"task {j}" for j in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} task labels for {n} tasks")
    return [str(x) for x in labels]


def _short_labels(names: list[str], limit: int = 22) -> list[str]:
    """Task names for an axis: without the folder prefix they all share, at most ``limit``
    characters (the end of a longer name, after an ellipsis)."""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("/") + 1]
    if len(names) > 1 and prefix and all(len(n) > len(prefix) for n in names):
        names = [n[len(prefix) :] for n in names]
    return [n if len(n) <= limit else "…" + n[-(limit - 1) :] for n in names]


def matrix_markdown(matrix: Any, labels: Sequence[str] | None = None, metric: str = "acc") -> str:
    """The matrix ``R`` of a task stream (``R[i][j]``: the metric on task ``j`` after
    training on task ``i``; ``(rows, T)``) as a markdown table, row ``i`` labelled "after
    <task i>". Accuracy is written in percent with one decimal, MSE with 3 significant
    digits."""
    rows = _as_rows(matrix)
    names = _task_labels(len(rows[0]), labels)
    unit = "accuracy (%)" if metric == "acc" else metric.upper()
    lines = [
        f"| {unit}: after \\ on | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for i, row in enumerate(rows):
        lines.append(f"| after {names[i]} | " + " | ".join(_cell(v, metric) for v in row) + " |")
    return "\n".join(lines)


def accuracy_matrix(
    matrix: Any,
    labels: Sequence[str] | None = None,
    metric: str = "acc",
    title: str | None = None,
) -> Figure:
    """A heatmap of the matrix ``R`` (``(rows, T)``) of a task stream, with the value in
    each cell (up to 25 tasks), the tasks on both axes and a colour bar. Accuracy is drawn
    in percent on [0, 100] (higher is yellow), MSE on [0, its largest finite value] (lower
    is yellow). Long task names are shortened on the axes (a prefix all share, such as
    ``images_evaluation/``, is dropped; then the end of each is kept); with more than 25
    tasks every k-th is named, and the figure stays under 14 x 12 inches."""
    import numpy as np

    rows = _as_rows(matrix)
    values = np.array(rows, dtype=float) * (100 if metric == "acc" else 1)
    n_rows, n_tasks = values.shape
    names = _short_labels(_task_labels(n_tasks, labels))
    longest = max(len(n) for n in names)
    crowded = n_tasks > 6 or n_tasks * longest > 40  # side by side, the labels would touch
    every = math.ceil(n_tasks / 25)  # the tasks named on the axes: every k-th
    width = min(max(3.0, 0.55 * n_tasks + 1.8), 12.0) + 1.2 + 0.07 * (longest + 6)
    height = min(max(2.6, 0.5 * n_rows + 1.6), 10.0) + (0.06 * longest if crowded else 0.0)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    if metric == "acc":
        vmin, vmax, cmap, label = 0.0, 100.0, "viridis", "accuracy (%)"
    else:
        top = float(finite.max()) if finite.size else 1.0
        vmin, vmax, cmap, label = 0.0, top or 1.0, "viridis_r", metric.upper()
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xticks(
        range(0, n_tasks, every),
        names[::every],
        rotation=45 if crowded else 0,
        ha="right" if crowded else "center",
    )
    ax.set_yticks(range(0, n_rows, every), [f"after {n}" for n in names[:n_rows:every]])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained up to")
    if n_tasks <= 25:
        fontsize = 9 if n_tasks <= 10 else 6
        for i in range(n_rows):
            for j in range(n_tasks):
                v = values[i, j]
                bright = np.isfinite(v) and (v - vmin) / (vmax - vmin or 1) > 0.6
                if metric != "acc":
                    bright = not bright
                text = f"{v:.1f}" if metric == "acc" else f"{v:.3g}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="black" if bright else "white",
                )
    ax.set_title(title or ("accuracy matrix" if metric == "acc" else f"{metric.upper()} matrix"))
    return fig


Point = tuple[float, float, float]  # (x, mean, ci95 half-width)


def accuracy_vs_n(
    series: Mapping[str, Sequence[Point]],
    xlabel: str = "classes N",
    ylabel: str = "accuracy (%)",
    title: str | None = None,
    log_x: bool = True,
    percent: bool = True,
) -> Figure:
    """Curves of a metric against N (e.g. the meta-continual Omniglot benchmark's N = 10,
    50, 100, 200, 600 classes), one per series (``{"OML meta-test train": [(N, mean, ci95),
    ...]}``), each with its 95% confidence band. ``percent`` scales fractions to percent."""
    labels = {name: textwrap.fill(name, 90) for name in series}
    legend_lines = sum(label.count("\n") + 1 for label in labels.values())
    fig = _figure(7.0, 4.0 + 0.2 * legend_lines)
    ax = fig.add_subplot()
    scale = 100.0 if percent else 1.0
    for name, points in series.items():
        points = sorted(points)
        x = [p[0] for p in points]
        mean = [scale * p[1] for p in points]
        ci = [scale * p[2] for p in points]
        (line,) = ax.plot(x, mean, marker="o", label=labels[name])
        lower = [m - c for m, c in zip(mean, ci, strict=True)]
        upper = [m + c for m, c in zip(mean, ci, strict=True)]
        ax.fill_between(x, lower, upper, color=line.get_color(), alpha=0.2, linewidth=0)
    if log_x:
        ax.set_xscale("log")
        ticks = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f"{ylabel} against {xlabel} (bands: 95% CI)")
    # below the axes, so that no curve is hidden whatever the labels' length
    fig.legend(loc="outside lower center", fontsize="small")
    return fig


def sinusoid_tasks(panels: Sequence[Mapping[str, Any]], x_range: Sequence[float]) -> Figure:
    """Adapted sinusoid curves: one panel per test task, each a mapping with ``x`` (the
    grid), ``truth`` (the true function on it), ``support_x``, ``support_y`` (the K
    points), ``curves`` (``{label: prediction on the grid}``, e.g. "meta-init (0 steps)",
    "10 steps"), ``amplitude`` and ``phase``; sequences of floats. Axes ``x`` and ``y``,
    one legend naming every line."""
    n = len(panels)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig = _figure(5.0 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, panel in enumerate(panels):
        ax = axes[k // cols][k % cols]
        ax.plot(panel["x"], panel["truth"], color="0.6", linewidth=3, label="true function")
        for label, y in panel["curves"].items():
            ax.plot(panel["x"], y, linewidth=1.5, label=label)
        ax.scatter(
            panel["support_x"],
            panel["support_y"],
            color="black",
            zorder=3,
            s=18,
            label=f"support ({len(panel['support_x'])} points)",
        )
        ax.set_xlim(*x_range)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"amplitude {panel['amplitude']:.2f}, phase {panel['phase']:.2f}", fontsize=10)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    return fig


Entry = tuple[str, float, float, Sequence[tuple[float, float]]]
"""(label, mean, ci95, per-run (value, ci95)): one row of :func:`error_bars`."""


def error_bars(
    panels: Mapping[str, Sequence[Entry]], percent: Mapping[str, bool] | None = None
) -> Figure:
    """``metarun report``'s plot: per panel (``{"test accuracy (%)": entries}``), one row
    per group, its mean ± 95% CI across seeds (thick bar) and each run's value ± its
    episode CI (small points with thin bars), so seeds and episodes can both be seen."""
    percent = percent or {}
    heights = [1.3 + 0.5 * len(entries) for entries in panels.values()]
    widest = max((len(e[0]) for entries in panels.values() for e in entries), default=10)
    fig = _figure(min(16.0, 6.0 + 0.085 * widest), sum(heights) + 0.4)
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (title, entries) in zip(axes, panels.items(), strict=True):
        scale = 100.0 if percent.get(title, False) else 1.0
        for y, (_, mean, ci, runs) in enumerate(entries):
            offsets = (
                [0.0]
                if len(runs) == 1
                else [0.3 * (k / (len(runs) - 1) - 0.5) for k in range(len(runs))]
            )
            for dy, (value, run_ci) in zip(offsets, runs, strict=True):
                ax.errorbar(
                    scale * value,
                    y + dy,
                    xerr=scale * run_ci,
                    fmt="o",
                    color="0.45",
                    markersize=3,
                    elinewidth=0.8,
                    capsize=2,
                )
            if math.isfinite(mean):
                xerr = scale * ci if math.isfinite(ci) else None
                ax.errorbar(
                    scale * mean,
                    y,
                    xerr=xerr,
                    fmt="D",
                    color="tab:blue",
                    markersize=6,
                    elinewidth=2.5,
                    capsize=4,
                )
        ax.set_yticks(range(len(entries)), [e[0] for e in entries])
        ax.set_ylim(len(entries) - 0.5, -0.5)
        ax.set_xlabel(title)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_title(
        "mean ± 95% CI across seeds (diamonds); each run ± its episode CI (grey)", fontsize=9
    )
    return fig


def learning_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], tag: str
) -> Figure:
    """Overlay of one logged value (``tag``, e.g. ``val/acc``) against the iteration, one
    line per run (``{run: (iterations, values)}``)."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel(tag)
    ax.grid(True, alpha=0.3)
    if len(curves) <= 16:
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    ax.set_title(f"{tag} during training")
    return fig
