"""metarun/figures.py: the accuracy matrix carries its numbers (figure and markdown), curves
have their bands and legends, and without matplotlib figures are skipped with one warning."""

from __future__ import annotations

import logging

import pytest

from metarun import figures

R = [[0.998, 0.0, 0.0], [0.979, 0.98, 0.0], [0.932, 0.787, 0.725]]
TASKS = ["digits 0,1", "digits 2,3", "digits 4,5"]


def test_matrix_markdown_holds_every_number_and_the_task_labels():
    table = figures.matrix_markdown(R, TASKS)
    lines = table.splitlines()
    assert lines[0] == "| accuracy (%): after \\ on | digits 0,1 | digits 2,3 | digits 4,5 |"
    assert lines[2] == "| after digits 0,1 | 99.8 | 0.0 | 0.0 |"
    assert lines[4] == "| after digits 4,5 | 93.2 | 78.7 | 72.5 |"
    mse = figures.matrix_markdown([[0.5, 2.25], [0.125, 1.0]], metric="mse")
    assert "| after task 1 | 0.125 | 1 |" in mse and mse.startswith("| MSE")


def test_accuracy_matrix_figure_writes_the_numbers_in_the_cells_with_labels_and_a_scale():
    pytest.importorskip("matplotlib", reason="figures need the plots extra")
    fig = figures.accuracy_matrix(R, TASKS)
    heatmap, colorbar = fig.axes
    cells = [t.get_text() for t in heatmap.texts]
    assert cells == [f"{100 * v:.1f}" for row in R for v in row]
    assert [t.get_text() for t in heatmap.get_xticklabels()] == TASKS
    assert [t.get_text() for t in heatmap.get_yticklabels()] == [f"after {t}" for t in TASKS]
    assert colorbar.get_ylabel() == "accuracy (%)"
    image = figures.to_rgb(fig)
    assert image.shape[0] == 3 and image.dtype.name == "uint8" and image.std() > 0


def test_accuracy_against_n_has_a_band_per_series_and_a_legend():
    pytest.importorskip("matplotlib", reason="figures need the plots extra")
    n = [10, 50, 100, 200, 600]
    series = {
        "meta-test train": [(k, 0.9 - k / 1000, 0.02) for k in n],
        "meta-test test": [(k, 0.8 - k / 1000, 0.03) for k in n],
    }
    fig = figures.accuracy_vs_n(series)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == list(series)
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([90 - k / 10 for k in n])
    assert len(ax.collections) == 2  # one CI band per series
    band = ax.collections[1].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(80 - 60 - 3) and band.max() == pytest.approx(80 - 1 + 3)
    (legend,) = fig.legends  # below the axes: it hides no curve
    assert [t.get_text() for t in legend.get_texts()] == list(series)


def test_sinusoid_figure_has_axes_and_a_legend_naming_every_line():
    pytest.importorskip("matplotlib", reason="figures need the plots extra")
    x = [i / 10 - 5 for i in range(101)]
    panel = {
        "x": x,
        "truth": [0.0] * 101,
        "support_x": [0.0, 1.0],
        "support_y": [0.0, 0.0],
        "curves": {"meta-learned init (0 steps)": [1.0] * 101, "after 5 steps": [0.5] * 101},
        "amplitude": 1.0,
        "phase": 0.5,
    }
    fig = figures.sinusoid_tasks([panel] * 4, (-5, 5))
    assert all(ax.get_xlabel() == "x" and ax.get_ylabel() == "y" for ax in fig.axes)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [
        "true function",
        "meta-learned init (0 steps)",
        "after 5 steps",
        "support (2 points)",
    ]


def test_without_matplotlib_figures_are_skipped_with_one_warning(monkeypatch, caplog):
    import torch

    from metarun.data.sinusoid import Sinusoid

    monkeypatch.setattr(figures, "available", lambda: False)
    monkeypatch.setattr(figures, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="metarun"):
        assert Sinusoid().figures(torch.nn.Linear(1, 1), None, [1]) == {}
        assert Sinusoid().figures(torch.nn.Linear(1, 1), None, [1]) == {}
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "matplotlib is not installed: figures are skipped (pip install 'metarun[plots]')"
    ]
    with pytest.raises(ModuleNotFoundError, match=r"metarun\[plots\]"):
        figures.accuracy_matrix(R)
