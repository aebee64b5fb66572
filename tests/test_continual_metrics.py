"""The accuracy-matrix summaries against matrices worked out by hand."""

from __future__ import annotations

import pytest

from metarun.continual.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    summarize,
)

# Three tasks. Row i: after training on task i; column j: task j.
R = [
    [0.90, 0.10, 0.20],
    [0.60, 0.80, 0.30],
    [0.50, 0.70, 0.95],
]
B = [0.10, 0.15, 0.25]


def test_three_tasks_by_hand():
    # ACC = (0.50 + 0.70 + 0.95) / 3
    assert average_accuracy(R) == pytest.approx(2.15 / 3)
    # BWT = ((0.50 - 0.90) + (0.70 - 0.80)) / 2 = -0.25
    assert backward_transfer(R) == pytest.approx(-0.25)
    # FWT = ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.10 - 0.15) + (0.30 - 0.25)) / 2 = 0
    assert forward_transfer(R, B) == pytest.approx(0.0)
    # forgetting: task 0: max(0.90, 0.60) - 0.50 = 0.40; task 1: max(0.80) - 0.70 = 0.10
    assert forgetting(R) == pytest.approx(0.25)


def test_forgetting_uses_the_best_accuracy_not_the_first():
    # Task 0 improves after task 1 (positive backward transfer), then drops.
    R2 = [[0.6, 0.0, 0.0], [0.9, 0.8, 0.0], [0.5, 0.8, 0.9]]
    # BWT compares with the diagonal: ((0.5 - 0.6) + (0.8 - 0.8)) / 2 = -0.05
    assert backward_transfer(R2) == pytest.approx(-0.05)
    # forgetting compares with the maximum: ((0.9 - 0.5) + (0.8 - 0.8)) / 2 = 0.2
    assert forgetting(R2) == pytest.approx(0.2)


def test_one_task_has_only_an_average_accuracy():
    m = summarize([[0.42]], [0.1])
    assert m == {
        "acc": pytest.approx(0.42),
        "bwt": None,
        "bwt_gem": None,
        "fwt": None,
        "forgetting": None,
    }


def test_a_task_never_learned_is_not_counted_as_forgetting_or_as_negative():
    # Task 1 stays at 0 throughout (never learned); task 0 is kept perfectly.
    R3 = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
    assert forgetting(R3) == pytest.approx(0.0)
    # Rows before a task was learned do not enter the maximum: here task 1 was at 0.5
    # by chance before being trained on, then learned to 0.3 and kept it; no forgetting.
    R4 = [[1.0, 0.5, 0.0], [1.0, 0.3, 0.0], [1.0, 0.3, 1.0]]
    assert forgetting(R4) == pytest.approx(0.0)
    assert backward_transfer(R4) == pytest.approx(0.0)


def test_metrics_refuse_malformed_inputs():
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="one accuracy per task"):
        forward_transfer(R, [0.1, 0.2])
