"""Task streams: the reservoir buffer, scenarios, methods and the stream loop on real MNIST
and Omniglot, shrunk to seconds."""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch

from metarun import run
from metarun.continual.buffer import ReservoirBuffer
from metarun.continual.scenarios import MetaTestBenchmark, ScenarioError, draw
from metarun.errors import ConfigError, RunInterrupted


def tiny_stream(algo: str, *extra: str) -> list[str]:
    """A Split-MNIST stream of 5 tasks x 2 epochs x 4 batches of 16, a 32-unit MLP."""
    return [
        "scenario=split_mnist",
        f"algo={algo}",
        "model=mlp",
        "model.hidden_sizes=[32]",
        "model.batch_norm=false",
        "scenario.train_per_task=64",
        "scenario.batch_size=16",
        "scenario.epochs=2",
        "log_every=4",
        "checkpoint_every=3",
        *extra,
    ]


# --- the reservoir buffer ----------------------------------------------------------------


def test_reservoir_keeps_every_stream_position_with_equal_probability():
    """After a stream of N = 500 examples through a buffer of 50, each position should be
    kept with probability 0.1. Over 400 streams (batches of 25) the kept positions, counted
    in 10 bins of 50 positions, must pass a chi-square test of uniformity at p = 0.001
    (9 degrees of freedom: statistic < 27.88). A buffer biased towards the recent part of
    the stream (keeping the last 50) fails the same test by orders of magnitude."""
    n, size, trials, bins = 500, 50, 400, 10
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(bins)
    for _ in range(trials):
        buf = ReservoirBuffer(size, (1,))
        stream = torch.arange(n)
        for chunk in stream.split(25):
            buf.add(chunk.float().view(-1, 1), chunk, g)
        assert len(buf) == size and int(buf.seen) == n
        kept = buf.y
        assert kept.unique().numel() == size  # each example stored at most once
        counts += torch.bincount(kept // (n // bins), minlength=bins)
    expected = trials * size / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88, f"reservoir not uniform over the stream: chi2 = {chi2:.1f}"
    recent = torch.zeros(bins)
    recent[-1] = trials * size
    assert float(((recent - expected) ** 2 / expected).sum()) > 27.88


def test_reservoir_fills_in_order_then_samples_from_its_contents():
    buf = ReservoirBuffer(4, (2,))
    g = torch.Generator().manual_seed(0)
    buf.add(torch.ones(3, 2), torch.tensor([7, 8, 9]), g)
    assert len(buf) == 3 and buf.y[:3].tolist() == [7, 8, 9]
    _, y = buf.sample(50, g)
    assert set(y.tolist()) <= {7, 8, 9}


# --- scenarios ---------------------------------------------------------------------------


def test_split_mnist_tasks_hold_their_digits_only(data_dir):
    from metarun.continual.scenarios import split_mnist

    s = split_mnist(str(data_dir), incremental="class", shuffle_classes=True, seed=3)
    digits = [t.classes.tolist() for t in s.tasks]
    assert sorted(d for pair in digits for d in pair) == list(range(10))
    assert digits == [s.info["class_order"][k : k + 2] for k in range(0, 10, 2)]
    for t in s.tasks:
        assert set(t.train_y.unique().tolist()) == set(t.classes.tolist())
        assert set(t.test_y.unique().tolist()) == set(t.classes.tolist())
    assert sum(t.size("train") for t in s.tasks) == 60_000
    assert sum(t.size("test") for t in s.tasks) == 10_000
    # class-incremental: the outputs in play grow; task-incremental: the task's own
    assert s.eval_classes(-1, 0).numel() == 0
    assert sorted(s.eval_classes(1, 4).tolist()) == sorted(digits[0] + digits[1])
    s.incremental = "task"
    assert s.eval_classes(1, 4).tolist() == digits[4]


def test_permuted_mnist_permutes_pixels_per_task_and_draws_across_tasks(data_dir):
    from metarun.continual.scenarios import permuted_mnist

    s = permuted_mnist(str(data_dir), n_tasks=3, seed=0)
    idx = torch.arange(5)
    x0, y0 = s.tasks[0].inputs("train", idx)
    x1, _ = s.tasks[1].inputs("train", idx)
    # the same images under two permutations: same pixel values, different places
    assert torch.equal(x0.flatten(1).sort(1).values, x1.flatten(1).sort(1).values)
    assert not torch.equal(x0, x1)
    # drawing from the union of tasks 0 and 1: index 60000 + k is task 1's example k
    x, y = draw(s.tasks[:2], "train", torch.tensor([60_000, 0, 60_001]))
    assert torch.equal(x[1], x0[0]) and torch.equal(x[0], x1[0])
    assert s.describe()["n_tasks"] == 3 and s.incremental == "domain"


def test_impossible_scenarios_say_what_to_change(data_dir):
    from metarun.continual.scenarios import split_mnist

    with pytest.raises(ScenarioError, match="must divide 10"):
        split_mnist(str(data_dir), classes_per_task=3)
    with pytest.raises(ScenarioError, match="incremental=task or class"):
        split_mnist(str(data_dir), incremental="domain")


# --- the runner hands streams to the loop -------------------------------------------------


def test_meta_learning_algorithm_in_a_stream_is_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="cannot learn one"):
        run(make_cfg("scenario=split_mnist", "algo=maml"), tmp_path)


def test_continual_method_without_a_stream_is_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="needs a task stream"):
        run(make_cfg("algo=er"), tmp_path)


def test_oml_without_meta_training_classes_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(*tiny_stream("oml", "algo.meta_iterations=2"))
    with pytest.raises(ValueError, match="scenario=omniglot_continual"):
        run(cfg, tmp_path)


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    return [r for r in rows if len(r) > 1 and r.get("kind") != "perf"]


def interrupt_after(monkeypatch, cls: type, calls: int, method: str = "observe") -> None:
    """Sends this process a real SIGINT during the ``calls``-th call of ``cls.method`` (by
    default ``observe``: a training update)."""
    original = getattr(cls, method)
    seen = {"n": 0}

    def counted(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == calls:
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, counted)


@pytest.mark.parametrize(
    "algo, stop_at, where",
    [
        ("er", 7, (1, 3)),  # mid-task: 3 of task 1's 4 updates done
        ("ewc", 8, (1, 4)),  # at a task boundary: all of task 1, before its Fisher
        ("lamaml", 6, (1, 2)),
        ("mer", 5, (1, 1)),
    ],
)
def test_stream_resumed_mid_task_or_at_a_boundary_ends_like_an_uninterrupted_one(
    algo, stop_at, where, make_cfg, tmp_path, monkeypatch
):
    from metarun.continual import methods

    cfg = make_cfg(*tiny_stream(algo, "scenario.epochs=1"))
    whole = run(cfg, tmp_path / "whole")
    cls = methods.__dict__[cfg.algo._target_.rsplit(".", 1)[-1]]
    # 4 updates per task; tasks are numbered from 0
    with monkeypatch.context() as patch:
        interrupt_after(patch, cls, stop_at)
        with pytest.raises(RunInterrupted):
            run(cfg, tmp_path / "split")
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["stream"]["task"], ckpt["stream"]["step"]) == where
    assert not (tmp_path / "split" / "results.json").exists()
    resumed = run(make_cfg(f"resume={tmp_path / 'split'}"), tmp_path / "ignored")
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "split" / "results.json").read_text())
    assert a["matrix"] == b["matrix"] and a["initial"] == b["initial"]
    assert a["continual"] == b["continual"] and resumed == pytest.approx(whole, nan_ok=True)
    assert read_metrics(tmp_path / "whole") == read_metrics(tmp_path / "split")


def test_stream_writes_the_matrix_summaries_and_protocol(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    summary = run(make_cfg(*tiny_stream("naive")), run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    R = results["matrix"]
    assert len(R) == 5 and all(len(row) == 5 for row in R)
    # class-incremental: a task not yet trained on has no output in play
    assert all(R[i][j] == 0.0 for i in range(5) for j in range(i + 1, 5))
    assert results["continual"]["acc"] == pytest.approx(sum(R[-1]) / 5)
    assert summary["continual/acc"] == pytest.approx(results["continual"]["acc"])
    stream = results["stream"]
    assert [t["classes"] for t in stream["tasks"]] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert stream["incremental"] == "class" and stream["tasks"][0]["train_examples"] == 64
    assert results["protocol"]["method"] == "Naive" and results["protocol"]["seed"] == 0
    tags = {k for row in read_metrics(run_dir) for k in row}
    assert {"train/loss", "stream/acc_seen", "continual/acc", "continual/bwt"} <= tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert "stream/accuracy_matrix" in events.Tags()["images"]
    assert len(events.Images("stream/accuracy_matrix")) == 5


def test_joint_training_draws_from_every_task_seen_so_far(make_cfg, tmp_path):
    run(make_cfg(*tiny_stream("joint")), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    # 2 epochs over 64, 128, ..., 320 examples in batches of 16
    assert results["training"]["updates"] == sum(2 * 4 * k for k in range(1, 6))


def test_omniglot_continual_with_oml_meta_trains_then_learns_the_stream(make_cfg, tmp_path):
    cfg = make_cfg(
        "scenario=omniglot_continual",
        "algo=oml",
        "model=mlp",
        "model.hidden_sizes=[32]",
        "model.batch_norm=false",
        "scenario.n_classes=4",
        "scenario.train_shots=3",
        "algo.meta_iterations=4",
        "algo.trajectory_classes=2",
        "algo.trajectory_shots=2",
        "algo.query_shots=2",
    )
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["training"] == {**results["training"], "meta_iterations": 4, "updates": 16}
    stream = results["stream"]
    assert stream["meta_train_classes"] == 964 and stream["n_tasks"] == 4
    assert all(t["test_examples"] == 17 for t in stream["tasks"])
    # the stream's characters come from the evaluation alphabets, never the background
    assert all(t["name"].startswith("images_evaluation/") for t in stream["tasks"])
    assert len(results["matrix"]) == 4 and results["continual"]["forgetting"] is not None


def test_every_lifelong_experiment_builds_and_takes_an_update(
    make_cfg, data_dir, cache_dir, tmp_path
):
    """Each stream experiment composes, builds its scenario and method the way the loop
    does, and takes one update on two training examples of its first task (a recipe that
    starts from another run's encoder: from a checkpoint of its model, written here)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from metarun.checks import check_continual

    folder = Path(__file__).resolve().parents[1] / "metarun" / "configs" / "experiment"

    def is_stream(name: str) -> bool:  # overrides /scenario, itself or through its base
        text = (folder / f"{name}.yaml").read_text()
        return "override /scenario" in text or any(
            is_stream(b) for b in re.findall(r"^\s+- (\w+)\s*$", text, re.M)
        )

    names = sorted(p.stem for p in folder.glob("*.yaml") if is_stream(p.stem))
    built: dict[str, object] = {}
    assert len(names) >= 17
    for name in names:
        cfg = make_cfg(
            f"experiment={name}", f"data_dir={data_dir}", f"cache_dir={cache_dir}", tiny=False
        )
        if "batch_norm" in cfg.model:  # single-example streams: no batch statistics
            assert cfg.model.batch_norm is False, name
        key = OmegaConf.to_yaml(cfg.scenario)  # experiments of one family share the stream
        scenario = built[key] = built.get(key) or instantiate(cfg.scenario)
        backbone = instantiate(cfg.model)(input_shape=scenario.input_shape)
        if cfg.algo.get("encoder_checkpoint"):
            weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
            saved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            torch.save({"config": saved, "method": weights}, tmp_path / f"{name}.pt")
            cfg.algo.encoder_checkpoint = str(tmp_path / f"{name}.pt")
            check_continual(cfg)
        method = instantiate(cfg.algo)(
            backbone=backbone,
            n_classes=scenario.n_classes,
            input_shape=scenario.input_shape,
            seed=0,
            task=scenario.task,
        )
        if isinstance(scenario, MetaTestBenchmark):  # a class of the benchmark's streams
            pool = scenario.evaluation
            x = pool.images[pool.class_items[0][:2]].float() / 255
            y, classes = torch.zeros(2, dtype=torch.long), torch.arange(1)
        else:
            x, y = scenario.tasks[0].inputs("train", torch.arange(2))
            classes = scenario.train_classes(0)
        method.begin_stream(None)
        loss, metric = method.observe(x, y, classes)
        # accuracy in [0, 1], or a mean squared error (regression streams)
        in_range = 0 <= metric <= 1 if scenario.task.higher_is_better else metric >= 0
        # learners of class statistics minimise no loss (None)
        assert (loss is None or math.isfinite(loss)) and in_range, name


def test_cli_refuses_a_meta_learner_in_a_stream_with_the_fix(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    metarun = shutil.which("metarun", path=str(Path(sys.executable).parent)) or "metarun"
    done = subprocess.run(
        [metarun, "scenario=split_mnist", "algo=protonet", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "algo=one of naive, joint, er, ewc, oml, lamaml" in done.stderr
