"""What a run tells the user and the trackers: hyperparameters in TensorBoard's HPARAMS tab
(read back through TensorBoard's own hparams plugin), the accuracy matrix as a figure and a
markdown table in every backend, ``metrics.jsonl`` records, and progress on a terminal
(a pseudo-terminal) and in a log."""

from __future__ import annotations

import json
import logging
import math
import os
import pty
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from metarun import figures
from metarun.hparams import MACHINE_KEYS, run_hparams
from metarun.loggers.csv import read_csv
from tests.conftest import tiny_overrides
from tests.test_cli import METARUN, metarun
from tests.test_continual import tiny_stream

ONE_THREAD = "hardware.num_threads=1"


# --- reading TensorBoard back ------------------------------------------------------------


def hparams_table(logdir: Path) -> tuple[list[str], list[str], dict[str, dict]]:
    """What TensorBoard's HPARAMS tab shows for the runs under ``logdir``, computed by its
    hparams plugin: the hyperparameter columns, the metric columns, and per run (session)
    ``{"hparams": {...}, "metrics": {tag: value}}``."""
    from google.protobuf import json_format
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import (
        api_pb2,
        backend_context,
        get_experiment,
        list_session_groups,
    )

    events = multiplexer.EventMultiplexer()
    events.AddRunsFromDirectory(str(logdir))
    events.Reload()
    provider = data_provider.MultiplexerDataProvider(events, str(logdir))
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=events, data_provider=provider)
    plugin, ctx = backend_context.Context(tb), context.RequestContext()
    request = api_pb2.GetExperimentRequest(include_metrics=True)
    experiment = get_experiment.Handler(ctx, plugin, "", request).run()
    hparams = [h.name for h in experiment.hparam_infos]
    metrics = [m.name.tag for m in experiment.metric_infos]
    columns = [api_pb2.ColParams(hparam=h) for h in hparams]
    columns += [api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos]
    statuses = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_RUNNING]
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, allowed_statuses=statuses, col_params=columns
    )
    groups = list_session_groups.Handler(ctx, plugin, "", request).run().session_groups
    rows = {
        g.name: {
            "hparams": {k: json_format.MessageToDict(v) for k, v in g.hparams.items()},
            "metrics": {m.name.tag: m.value for m in g.metric_values},
        }
        for g in groups
    }
    return hparams, metrics, rows


def session_start(run_dir: Path) -> dict:
    """The hyperparameters a run's event file holds (the hparams plugin's session start)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    assert metadata.EXPERIMENT_TAG not in content  # TensorBoard makes the columns from all runs
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return {k: v.string_value or v.number_value for k, v in start.hparams.items()}


def texts(run_dir: Path, tag: str) -> list[tuple[int, str]]:
    """``(step, markdown)`` of each text logged under ``tag`` (TensorBoard's text plugin)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [
        (e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
        for e in events.Tensors(f"{tag}/text_summary")
    ]


def images(run_dir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    return events.Images(tag) if tag in events.Tags()["images"] else []


def no_machine_keys(hparams: dict) -> bool:
    return not any(
        k == p or k.startswith(p + ".") for k in hparams for p in (*MACHINE_KEYS, "dataset.path")
    )


# --- a MAML and a ProtoNet run --------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(data_dir, cache_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``metarun --multirun algo=maml,protonet`` on a tiny budget, with the CSV logger too."""
    root = tmp_path_factory.mktemp("sweep")
    done = metarun(
        "--multirun",
        "algo=maml,protonet",
        *tiny_overrides(data_dir, cache_dir),
        ONE_THREAD,
        "train.meta_lr=0.003",
        "logger=[tensorboard,csv]",
        f"hydra.sweep.dir={root / 'sweep'}",
        cwd=root,
    )
    assert done.returncode == 0, done.stderr
    return root / "sweep", done


def test_hparams_of_maml_and_protonet_name_the_algorithm_and_carry_val_and_test(sweep):
    sweep_dir, _ = sweep
    columns, metric_columns, rows = hparams_table(sweep_dir)
    assert set(rows) == {"maml,omniglot,seed=0", "protonet,omniglot,seed=0"}
    assert columns[0] == "algo"  # the one that differs comes first
    assert {"algo", "dataset", "model", "seed", "train.meta_lr", "model.hidden"} <= set(columns)
    assert no_machine_keys(columns), columns
    assert {"val/acc", "val/best_acc", "test/acc", "test/ci95"} <= set(metric_columns)
    for name, algo in (("maml,omniglot,seed=0", "maml"), ("protonet,omniglot,seed=0", "protonet")):
        row = rows[name]
        assert row["hparams"]["algo"] == algo
        assert row["hparams"]["dataset"] == "omniglot"
        assert row["hparams"]["train.meta_lr"] == 0.003
        results = json.loads((sweep_dir / name / "results.json").read_text())
        metrics = row["metrics"]
        assert math.isclose(metrics["test/acc"], results["test"]["acc"], rel_tol=1e-6)
        assert math.isclose(metrics["test/ci95"], results["test"]["ci95"], rel_tol=1e-6)
        assert math.isclose(metrics["val/best_acc"], results["val"]["best_acc"], rel_tol=1e-6)
        last_val = [
            json.loads(line)
            for line in (sweep_dir / name / "metrics.jsonl").read_text().splitlines()
            if '"val/acc"' in line
        ][-1]["val/acc"]
        assert math.isclose(metrics["val/acc"], last_val, rel_tol=1e-6)
        assert session_start(sweep_dir / name)["algo"] == algo


def test_csv_logger_gets_the_same_hparams(sweep):
    sweep_dir, _ = sweep
    run_dir = sweep_dir / "protonet,omniglot,seed=0"
    saved = json.loads((run_dir / "hparams.json").read_text())
    start = session_start(run_dir)
    assert saved["hparams"].keys() == start.keys()
    assert saved["hparams"]["algo"] == "protonet" and saved["hparams"]["seed"] == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert saved["metrics"]["test/acc"] == pytest.approx(results["test"]["acc"], rel=1e-6)
    assert saved["metrics"]["val/best_acc"] == pytest.approx(results["val"]["best_acc"])
    assert set(saved["metrics"]) == {"val/acc", "val/best_acc", "test/acc", "test/ci95"}


def test_each_sweep_job_tags_its_log_lines(sweep):
    _, done = sweep
    lines = [line for line in done.stdout.splitlines() if "[metarun]" in line]
    assert lines and all(re.search(r"\[metarun\]\[\w+\] - \[job [01]\] ", line) for line in lines)
    assert any("[job 0] MAML on Omniglot" in line for line in lines)
    assert any("[job 1] ProtoNet on Omniglot" in line for line in lines)
    assert any(re.search(r"\[job 1\] test \d", line) for line in lines)


def test_metrics_jsonl_holds_one_record_per_kind_and_iteration(sweep):
    sweep_dir, _ = sweep
    rows = [
        json.loads(line)
        for line in (sweep_dir / "maml,omniglot,seed=0" / "metrics.jsonl").read_text().splitlines()
    ]
    for row in rows:
        tags = [k for k in row if k not in ("iteration", "kind")]
        assert tags and all(t.split("/")[0] == row["kind"] for t in tags), row
    keys = [(r["iteration"], r["kind"]) for r in rows]
    assert [k for k in keys if k[1] == "train"] == [(i, "train") for i in range(1, 5)]
    assert [k for k in keys if k[1] == "val"] == [(2, "val"), (4, "val"), (4, "val")]
    assert [k for k in keys if k[1] == "test"] == [(4, "test")]
    assert [k for k in keys if k[1] == "perf"] == [(2, "perf"), (4, "perf")]
    assert "val/best_acc" in rows[-1] and rows[-1]["kind"] == "val"


def test_a_run_tested_again_has_the_tested_runs_algorithm(sweep, data_dir, cache_dir, tmp_path):
    sweep_dir, _ = sweep
    tested = sweep_dir / "protonet,omniglot,seed=0"
    again = tmp_path / "again"
    done = metarun(
        f"test='{tested}'",  # the folder's name has commas: quoted for Hydra
        f"data_dir={data_dir}",
        f"cache_dir={cache_dir}",
        "eval.test_episodes=4",
        f"hydra.run.dir={again}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    start = session_start(again)
    assert start["algo"] == "protonet" and start["eval.test_episodes"] == 4
    assert start["train.meta_lr"] == 0.003  # the tested run's command line


# --- a task stream ----------------------------------------------------------------------------


def test_stream_hparams_carry_acc_bwt_and_the_matrix_goes_to_every_backend(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = metarun(
        *tiny_stream("er", "algo.buffer_size=32"),
        "hardware=cpu",
        ONE_THREAD,
        f"data_dir={data_dir}",
        "logger=[tensorboard,csv]",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    start = session_start(run_dir)
    assert start["algo"] == "er" and start["scenario"] == "split_mnist" and start["model"] == "mlp"
    assert "dataset" not in start and no_machine_keys(start)
    assert start["algo.buffer_size"] == 32 and start["scenario.epochs"] == 2
    _, metric_columns, rows = hparams_table(tmp_path)
    assert {"continual/acc", "continual/bwt", "continual/fwt"} <= set(metric_columns)
    metrics = rows["run"]["metrics"]
    for key in ("acc", "bwt", "forgetting"):
        assert math.isclose(metrics[f"continual/{key}"], results["continual"][key], rel_tol=1e-6)

    # The matrix as markdown after each task: every number of the rows so far, in percent.
    tables = texts(run_dir, "stream/accuracy_matrix_table")
    assert len(tables) == 5
    step, last = tables[-1]
    names = [t["name"] for t in results["stream"]["tasks"]]
    lines = last.splitlines()
    assert lines[0].split(" | ")[1:] == [*names[:-1], names[-1] + " |"]
    for i, row in enumerate(results["matrix"]):
        cells = [c.strip() for c in lines[2 + i].strip("|").split("|")]
        assert cells == [f"after {names[i]}", *(f"{100 * v:.1f}" for v in row)]
    assert [t for _, t in tables[:2]][1].count("\n") == 3  # two rows after the second task

    # The CSV logger got the same text, the figures and the hparams.
    csv_text = run_dir / "text" / "stream" / "accuracy_matrix_table" / f"{step}.md"
    assert csv_text.read_text() == last + "\n"
    saved = json.loads((run_dir / "hparams.json").read_text())
    assert saved["hparams"].keys() == start.keys()
    assert saved["metrics"]["continual/bwt"] == pytest.approx(results["continual"]["bwt"])
    series = read_csv(run_dir / "metrics.csv")
    assert series["continual/acc"] == [(step, pytest.approx(results["continual"]["acc"]))]
    if figures.available():
        pngs = sorted((run_dir / "figures" / "stream" / "accuracy_matrix").glob("*.png"))
        drawn = images(run_dir, "stream/accuracy_matrix")
        assert len(pngs) == len(drawn) == 5
        assert drawn[-1].width > 300 and drawn[-1].height > 200  # a readable figure


def test_without_matplotlib_a_stream_logs_its_matrix_as_text_only(
    make_cfg, tmp_path, monkeypatch, caplog
):
    from metarun import run

    monkeypatch.setattr(figures, "available", lambda: False)
    monkeypatch.setattr(figures, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="metarun"):
        run(make_cfg(*tiny_stream("naive"), ONE_THREAD), tmp_path)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "metarun" and r.levelno >= logging.WARNING
    ]
    assert warnings == [f"matplotlib is not installed: figures are skipped ({figures.INSTALL})"]
    assert len(texts(tmp_path, "stream/accuracy_matrix_table")) == 5
    assert images(tmp_path, "stream/accuracy_matrix") == []
    # Run from Python, without Hydra's record: the classes and functions are the names.
    start = session_start(tmp_path)
    assert start["algo"] == "Naive" and start["scenario"] == "split_mnist"


def test_mse_matrix_figure_draws_zero_error_in_the_best_colour():
    pytest.importorskip("matplotlib", reason="figures need the plots extra")
    fig = figures.accuracy_matrix([[0.0, 4.0]], metric="mse")
    image = fig.axes[0].images[0]
    best = figures.accuracy_matrix([[1.0, 0.0]]).axes[0].images[0]
    assert image.cmap(image.norm(0.0)) == best.cmap(best.norm(100.0))  # yellow
    assert [t.get_text() for t in fig.axes[0].texts] == ["0", "4"]


# --- hyperparameters from the run folder ------------------------------------------------------


def test_hparams_are_the_named_options_and_the_command_lines_values(tmp_path):
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    choices = {"algo": "fomaml", "dataset": "omniglot", "model": "conv4", "scenario": None}
    (hydra / "hydra.yaml").write_text(json.dumps({"hydra": {"runtime": {"choices": choices}}}))
    overrides = [
        "algo=fomaml",
        "seed=3",
        "train.meta_lr=0.01",  # resumed with 0.001: the config's value counts
        "eval.report_steps=[1,5]",
        "algo.first_order=true",
        "data_dir=/data",
        "dataset.root=/data",
        "hardware.num_threads=1",
        "logger=[tensorboard,csv]",
        "+hydra.job.env_set.X=1",
    ]
    (hydra / "overrides.yaml").write_text(json.dumps(overrides))
    config = {
        "seed": 3,
        "scenario": None,
        "data_dir": "/data",
        "algo": {"_target_": "metarun.algorithms.MAML", "first_order": True},
        "dataset": {"_target_": "metarun.data.omniglot.Omniglot", "root": "/data"},
        "train": {"meta_lr": 0.001},
        "eval": {"report_steps": [1, 5]},
    }
    assert run_hparams(config, tmp_path) == {
        "algo": "fomaml",
        "dataset": "omniglot",
        "model": "conv4",
        "seed": 3,
        "train.meta_lr": 0.001,
        "eval.report_steps": "[1, 5]",
        "algo.first_order": "true",
    }
    assert run_hparams(config, tmp_path / "no-hydra") == {
        "algo": "MAML",
        "dataset": "Omniglot",
        "seed": 3,
    }


# --- progress -------------------------------------------------------------------------------


def render(raw: str, width: int) -> list[str]:
    """The screen a terminal shows after ``raw``: carriage returns, newlines, cursor-up
    (``ESC[nA``) and line wrapping; other escape sequences are dropped."""
    screen: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\x1b":
            match = re.match(r"\x1b\[(\d*)([A-Za-z])", raw[i:])
            if match:
                if match.group(2) == "A":
                    row = max(0, row - int(match.group(1) or 1))
                i += len(match.group(0))
                continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
        else:
            if col >= width:
                row, col = row + 1, 0
            while len(screen) <= row:
                screen.append([])
            line = screen[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = ch
            col += 1
        while len(screen) <= row:
            screen.append([])
        i += 1
    return ["".join(line).rstrip() for line in screen if "".join(line).strip()]


def test_on_a_terminal_each_bar_and_log_line_has_its_own_line(data_dir, cache_dir, tmp_path):
    """A run on a pseudo-terminal: the start-up line, then the training bar (with tasks/s in
    every frame), closed at 100% before the test's bar, and the test line under it."""
    import fcntl
    import termios

    width = 400  # no line wraps
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, width, 0, 0))
    env = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": str(width)}
    args = [*tiny_overrides(data_dir, cache_dir), ONE_THREAD, "train.iterations=8"]
    args += ["eval.val_every=4", "eval.test_episodes=12", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(
        [METARUN, *args], cwd=tmp_path, stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    raw = b"".join(chunks).decode("utf-8", "replace")
    screen = render(raw, width)
    kinds = []
    for line in screen:
        marks = [m for m in ("[metarun]", "train:", "test:", "val:") if m in line]
        assert len(marks) == 1, f"a line holds {marks or 'nothing known'}: {line!r}"
        kinds.append((marks[0], line))
    order = [m for m, _ in kinds]
    assert order[0] == "[metarun]" and "MAML on Omniglot" in kinds[0][1]  # start-up first
    assert "val:" not in order  # a validation's bar disappears when it is done
    train = order.index("train:")
    test = order.index("test:")
    assert order.count("train:") == order.count("test:") == 1 and train < test
    assert re.search(r"train: 100%\|.*\| 8/8 .*tasks/s=\d", kinds[train][1])
    assert re.search(r"test: 100%\|.*\| 12/12 .*episode/s", kinds[test][1])
    assert [m for m, line in kinds[train + 1 : test]] == []  # the bar closed, then the test
    assert re.search(r"\[metarun\]\[INFO\] - test \d+\.\d+ ± ", kinds[test + 1][1])
    validations = [line for m, line in kinds if "validation" in line]
    assert len(validations) == 2
    # tasks/s is in every frame of the training bar once it has a value (no flicker).
    frames = [f for f in re.split(r"[\r\n]", raw) if f.startswith("train:")]
    assert frames and all("tasks/s=" in f for f in frames), frames[:3]


def test_without_a_terminal_validation_and_test_log_their_progress(tmp_path, monkeypatch, caplog):
    from metarun import metrics

    monkeypatch.setattr(metrics, "EVAL_LOG_SECONDS", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    logger = metrics.RunLogger(tmp_path, total=4, start_iteration=0, log_every=2)
    with caplog.at_level(logging.INFO, logger="metarun"):
        for it in range(1, 5):  # the last step has no loss (a benchmark's stream): "-"
            logger.progress(it, 1.0 if it < 4 else float("nan"), 0.5, 3)
        logger.end_training()
        with logger.evaluation("test", 3) as step:
            for _ in range(3):
                step()
    logger.close()
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"it 2/4  loss 1\.0000  acc 0\.500  [\d.]+ tasks/s  eta \dm\d\ds", lines[0])
    assert lines[1].startswith("it 4/4  loss -  acc 0.500  ")
    assert [line.split("  ")[0] for line in lines[2:]] == [
        "test: 1/3 episodes",
        "test: 2/3 episodes",
    ]
    assert re.search(r"[\d.]+ episodes/s  eta \dm\d\ds$", lines[2])
    assert logger.bar is None
