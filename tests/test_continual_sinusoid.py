"""The incremental sinusoid regression stream (OML's regression benchmark): MSE metrics
against matrices worked out by hand, the scenario's composition, every method on a tiny
stream, resume, and a small learning check. Also the runner's refusal of an evaluation
budget of zero episodes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metarun import run
from metarun.continual.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    heatmap,
    summarize,
)
from metarun.continual.scenarios import ScenarioError, SineFunctions, sinusoid_stream
from metarun.errors import RunInterrupted
from tests.test_continual import interrupt_after, read_metrics

# --- metrics of an error matrix (lower is better) -------------------------------------------

# Three functions. Row i: after training on function i; column j: function j's MSE.
M = [
    [0.5, 3.0, 4.0],
    [1.5, 0.4, 3.5],
    [2.0, 0.6, 0.3],
]
B = [4.2, 3.2, 3.9]  # before any training


def test_mse_matrix_by_hand():
    # average MSE after the last function = (2.0 + 0.6 + 0.3) / 3
    assert average_accuracy(M) == pytest.approx(2.9 / 3)
    # BWT, positive = better: ((0.5 - 2.0) + (0.4 - 0.6)) / 2 = -0.85 (both got worse)
    assert backward_transfer(M, higher_is_better=False) == pytest.approx(-0.85)
    # FWT, positive = better: ((b1 - R[0][1]) + (b2 - R[1][2])) / 2 = (0.2 + 0.4) / 2
    assert forward_transfer(M, B, higher_is_better=False) == pytest.approx(0.3)
    # forgetting, positive = worse: function 0: 2.0 - min(0.5, 1.5) = 1.5; 1: 0.6 - 0.4 = 0.2
    assert forgetting(M, higher_is_better=False) == pytest.approx(0.85)
    assert summarize(M, B, "mse") == {
        "mse": pytest.approx(2.9 / 3),
        "bwt": pytest.approx(-0.85),
        "fwt": pytest.approx(0.3),
        "forgetting": pytest.approx(0.85),
    }


def test_forgetting_of_an_error_starts_from_its_lowest_value_once_learned():
    # Function 0 improves after function 1 (0.4), then ends at 0.8: forgetting 0.4, while
    # BWT against the row where it was learned (1.0) is +0.2, an improvement.
    R = [[1.0, 9.0, 9.0], [0.4, 2.0, 9.0], [0.8, 2.0, 1.0]]
    assert forgetting(R, higher_is_better=False) == pytest.approx((0.4 + 0.0) / 2)
    assert backward_transfer(R, higher_is_better=False) == pytest.approx((0.2 + 0.0) / 2)
    # Rows before a function is trained on do not count: function 1 was at 0.5 by chance,
    # was learned to 2.0 only and kept it: no forgetting (and no negative forgetting).
    R2 = [[0.1, 0.5, 5.0], [0.1, 2.0, 5.0], [0.1, 2.0, 0.2]]
    assert forgetting(R2, higher_is_better=False) == pytest.approx(0.0)


def test_error_rates_give_the_same_transfer_and_forgetting_as_accuracies():
    """With R_err = 1 - R_acc, "positive forgetting = got worse" and "positive BWT/FWT =
    got better" hold for both directions: the numbers must be equal."""
    acc = [[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 0.95]]
    b = [0.1, 0.15, 0.25]
    err = [[1 - v for v in row] for row in acc]
    b_err = [1 - v for v in b]
    a, e = summarize(acc, b, "acc"), summarize(err, b_err, "mse")
    for key in ("bwt", "fwt", "forgetting"):
        assert a[key] == pytest.approx(e[key]), key
    assert a["forgetting"] == pytest.approx(0.25) and a["bwt"] == pytest.approx(-0.25)


def test_one_function_and_unknown_metrics():
    assert summarize([[0.7]], [3.0], "mse") == {
        "mse": pytest.approx(0.7),
        "bwt": None,
        "fwt": None,
        "forgetting": None,
    }
    with pytest.raises(ValueError, match="unknown metric 'rmse'"):
        summarize(M, B, "rmse")


def test_mse_heatmap_draws_zero_error_as_the_best_colour():
    img = heatmap(torch.tensor([[0.0, 4.0]]), cell=8, higher_is_better=False, scale=4.0)
    assert img[:, 4, 4].tolist() == [253, 231, 37]  # MSE 0: yellow, like accuracy 1
    assert img[:, 4, 12].tolist() == [68, 1, 84]  # the largest MSE: dark purple


# --- the scenario -----------------------------------------------------------------------------


def test_stream_functions_inputs_and_targets_are_seeded_and_recorded():
    s = sinusoid_stream(n_tasks=4, train_per_task=50, test_per_task=30, meta_functions=40, seed=1)
    assert s.input_shape == (5,) and s.task.metric == "mse" and s.incremental == "task"
    info = s.describe()
    assert info["n_tasks"] == 4 and len(info["functions"]) == 4
    for i, (t, f) in enumerate(zip(s.tasks, info["functions"], strict=True)):
        for split, n in (("train", 50), ("test", 30)):
            x, y = t.inputs(split, torch.arange(n))
            assert x.shape == (n, 5) and y.shape == (n, 1) and x.dtype == torch.float32
            # the one-hot id of function i, then x in [-5, 5]
            assert torch.equal(x[:, :4], torch.eye(4)[i].expand(n, 4))
            assert x[:, 4].abs().max() <= 5
            expected = f["amplitude"] * torch.sin(x[:, 4] - f["phase"])
            torch.testing.assert_close(y[:, 0], expected)
        assert 0.1 <= f["amplitude"] <= 5 and 0 <= f["phase"] <= math.pi
    again = sinusoid_stream(n_tasks=4, train_per_task=50, test_per_task=30, seed=1)
    other = sinusoid_stream(n_tasks=4, train_per_task=50, test_per_task=30, seed=2)
    assert torch.equal(again.tasks[2].train_x, s.tasks[2].train_x)
    assert again.describe()["functions"] == info["functions"]
    assert other.describe()["functions"] != info["functions"]
    # the meta-training functions are other draws than the stream's
    stream_amplitudes = {round(f["amplitude"], 6) for f in info["functions"]}
    assert not stream_amplitudes & {round(a, 6) for a in s.meta_train.amplitude.tolist()}


def test_trajectory_learns_functions_in_order_in_batches_of_the_stream():
    g = torch.Generator().manual_seed(0)
    functions = SineFunctions(
        torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 0.5, 1.0, 1.5]), (-5, 5), 3, 4
    )
    x, y, step = functions.trajectory(3, 10, 2, g)
    assert x.shape == (36, 4) and y.shape == (36, 1) and step.shape == (36,)
    # ceil(10 / 4) = 3 steps per function: steps 0..8, in order, each within one function
    assert (step >= 0).sum() == 30 and (step == -1).sum() == 6
    assert step[step >= 0].tolist() == sorted(step[step >= 0].tolist())
    assert [int((step == s).sum()) for s in range(9)] == [4, 4, 2] * 3
    slot = x[:, :3].argmax(1)
    for s in range(9):
        assert slot[step == s].unique().tolist() == [s // 3]
    # every point of one slot lies on one function of the set
    for k in range(3):
        xs, ys = x[slot == k, 3], y[slot == k, 0]
        fits = [
            torch.allclose(ys, a * torch.sin(xs - p), atol=1e-5)
            for a, p in zip(functions.amplitude, functions.phase, strict=True)
        ]
        assert sum(fits) == 1
    with pytest.raises(ValueError, match="trajectory_classes=4"):
        functions.trajectory(4, 10, 2, g)  # only 3 ids


def test_impossible_sinusoid_streams_say_what_to_change():
    with pytest.raises(ScenarioError, match="scenario.n_tasks must be >= 1"):
        sinusoid_stream(n_tasks=0)
    with pytest.raises(ScenarioError, match=r"scenario.amplitude must be \[low, high\]"):
        sinusoid_stream(amplitude=(5.0, 0.1))


# --- every method on a tiny stream, through the runner -----------------------------------------


def tiny_sine(algo: str, *extra: str) -> list[str]:
    """3 functions x 4 updates of 16 points, 50 test points each, a 16-unit MLP; OML
    meta-trains for 3 steps on trajectories of 3 of 20 functions."""
    more = (
        [
            "algo.meta_iterations=3",
            "algo.trajectory_classes=3",
            "algo.trajectory_shots=32",
            "algo.query_shots=8",
        ]
        if algo == "oml"
        else []
    )
    return [
        f"experiment=sinusoid_stream_{algo}",
        "model=mlp",
        "model.hidden_sizes=[16]",
        "scenario.n_tasks=3",
        "scenario.train_per_task=64",
        "scenario.test_per_task=50",
        "scenario.batch_size=16",
        "scenario.meta_functions=20",
        "log_every=4",
        "checkpoint_every=3",
        *more,
        *extra,
    ]


@pytest.mark.parametrize("algo", ["naive", "joint", "er", "ewc", "oml", "lamaml"])
def test_every_method_learns_the_stream_and_reports_mse(algo, make_cfg, tmp_path):
    summary = run(make_cfg(*tiny_sine(algo)), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    R, b = results["matrix"], results["initial"]
    assert results["metric"] == "mse" and len(R) == 3 and all(len(row) == 3 for row in R)
    assert all(math.isfinite(v) and v >= 0 for row in R for v in row) and len(b) == 3
    assert set(results["continual"]) == {"mse", "bwt", "fwt", "forgetting"}
    assert results["continual"]["mse"] == pytest.approx(sum(R[-1]) / 3)
    assert set(summary) == {
        "val/mse",
        "continual/mse",
        "continual/bwt",
        "continual/fwt",
        "continual/forgetting",
    }
    assert "mean squared error" in results["protocol"]["metrics"]
    assert results["stream"]["functions"] and results["stream"]["benchmark"] == "sinusoid_stream"
    tags = {k for row in read_metrics(tmp_path) for k in row}
    assert {"train/mse", "stream/mse_seen", "continual/mse", "continual/forgetting"} <= tags
    assert not any("acc" in tag for tag in tags)
    if algo == "oml":
        assert {"meta/loss", "meta/mse"} <= tags and results["training"]["meta_iterations"] == 3


def test_the_mse_matrix_is_drawn_for_tensorboard(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(make_cfg(*tiny_sine("naive")), tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("stream/mse_matrix")) == 3


def test_oml_without_meta_training_functions_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(*tiny_sine("oml", "scenario.meta_functions=0"))
    with pytest.raises(ValueError, match="sinusoid_stream with scenario.meta_functions > 0"):
        run(cfg, tmp_path)


@pytest.mark.parametrize(
    "algo, stop_at, where",
    [
        ("er", 6, {"task": 1, "step": 2}),  # mid-function: 2 of function 1's 4 updates
        ("oml", 2, {"meta_iteration": 2, "task": 0}),  # during meta-training
    ],
)
def test_sinusoid_stream_resumed_mid_way_ends_like_an_uninterrupted_one(
    algo, stop_at, where, make_cfg, tmp_path, monkeypatch
):
    from metarun.continual import methods

    cfg = make_cfg(*tiny_sine(algo))
    whole = run(cfg, tmp_path / "whole")
    with monkeypatch.context() as patch:
        if algo == "oml":
            interrupt_after(patch, SineFunctions, stop_at, "trajectory")
        else:
            interrupt_after(patch, methods.ExperienceReplay, stop_at)
        with pytest.raises(RunInterrupted):
            run(cfg, tmp_path / "split")
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert {k: ckpt["stream"][k] for k in where} == where
    resumed = run(make_cfg(f"resume={tmp_path / 'split'}"), tmp_path / "ignored")
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "split" / "results.json").read_text())
    assert a["matrix"] == b["matrix"] and a["initial"] == b["initial"]
    assert a["continual"] == b["continual"] and resumed == pytest.approx(whole, nan_ok=True)
    assert read_metrics(tmp_path / "whole") == read_metrics(tmp_path / "split")


def test_naive_learns_each_function_then_forgets_it(make_cfg, tmp_path):
    """A small learning check on the real stream protocol: 2 functions x 20 updates of 32
    points, Adam 0.01, MLP 11-64-64. Fine-tuning must fit the function it trains on (MSE
    below a third of the untrained model's) and, learning the second, get worse on the
    first; joint training, which keeps drawing from both, ends better on the first."""
    shrink = [
        "model=mlp",
        "model.hidden_sizes=[64,64]",
        "scenario.n_tasks=2",
        "scenario.train_per_task=640",
        "scenario.test_per_task=200",
        "algo.lr=0.01",
    ]
    run(make_cfg("experiment=sinusoid_stream_naive", *shrink), tmp_path / "naive")
    run(make_cfg("experiment=sinusoid_stream_joint", *shrink), tmp_path / "joint")
    naive = json.loads((tmp_path / "naive" / "results.json").read_text())
    joint = json.loads((tmp_path / "joint" / "results.json").read_text())
    R, b = naive["matrix"], naive["initial"]
    assert R[0][0] < b[0] / 3 and R[1][1] < b[1] / 3
    assert R[1][0] > R[0][0] and naive["continual"]["forgetting"] > 0
    assert joint["matrix"][1][0] < R[1][0]


# --- the runner refuses an evaluation of zero episodes ------------------------------------------

SINUSOID = ["experiment=maml_sinusoid", "model=mlp_sinusoid"]


def test_zero_validation_episodes_with_validation_on_is_refused_before_training(make_cfg, tmp_path):
    cfg = make_cfg(*SINUSOID, "eval.val_every=2", "eval.val_episodes=0")
    with pytest.raises(ValueError, match=r"eval.val_episodes=0 with eval.val_every=2") as err:
        run(cfg, tmp_path)
    assert "eval.val_every=0 to train without validation" in str(err.value)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match="eval.test_episodes=0"):
        run(make_cfg(*SINUSOID, "eval.test_episodes=0"), tmp_path)


def test_validation_off_needs_no_validation_episodes(make_cfg, tmp_path):
    cfg = make_cfg(*SINUSOID, "eval.val_every=0", "eval.val_episodes=0", "train.iterations=2")
    summary = run(cfg, tmp_path)
    assert math.isnan(summary["val/mse"]) and math.isfinite(summary["test/mse"])
    assert not (tmp_path / "checkpoints" / "best.pt").exists()


def test_cli_names_the_option_and_the_fix_for_zero_validation_episodes(tmp_path):
    metarun = shutil.which("metarun", path=str(Path(sys.executable).parent)) or "metarun"
    done = subprocess.run(
        [metarun, *SINUSOID, "eval.val_episodes=0", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "eval.val_episodes=0 with eval.val_every=1000" in done.stderr
    assert "eval.val_every=0" in done.stderr
