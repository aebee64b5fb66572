"""End to end through the real entry point: ``metarun`` in a subprocess on the real Omniglot."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import diverge_after, tiny_overrides

METARUN = shutil.which("metarun", path=str(Path(sys.executable).parent)) or "metarun"


def metarun(
    *args: str, cwd: Path, timeout: float = 300, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Runs the ``metarun`` command; ``unset`` names environment variables to leave out."""
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [METARUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing values, which legitimately differ between runs."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    return [r for r in rows if len(r) > 1 and r.get("kind") != "perf"]


@pytest.fixture
def tiny(data_dir, cache_dir):
    return tiny_overrides(data_dir, cache_dir)


def test_end_to_end_run_writes_metrics_events_checkpoints_and_results(tiny, tmp_path):
    run_dir = tmp_path / "run"
    done = metarun(*tiny, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (run_dir / ".hydra" / "config.yaml").exists()
    tags = {k for row in read_metrics(run_dir) for k in row}
    assert {"train/loss", "train/acc", "val/acc", "test/acc"} <= tags
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["test"]["acc"] <= 1 and results["test"]["episodes"] == 6
    assert results["test"]["ci95"] > 0
    assert results["protocol"]["bn_mode"] == "transductive"
    assert results["protocol"]["eval_episode"] == {
        "ways": 5,
        "shots": 1,
        "query_shots": 2,
        "episodes": "standard",
    }
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and ckpt["config"]["train"]["iterations"] == 4
    assert {"algo", "optimizer", "rng", "train", "input_shape", "task"} <= set(ckpt)
    assert (run_dir / "checkpoints" / "best.pt").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"train/loss", "train/acc", "val/acc", "test/acc", "perf/tasks_per_s"} <= set(
        events.Tags()["scalars"]
    )


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tiny, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        done = metarun(*tiny, f"seed={seed}", f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        runs[name] = read_metrics(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_ctrl_c_saves_a_checkpoint_and_resume_ends_like_an_uninterrupted_run(tiny, tmp_path):
    longer = [*tiny, "train.iterations=150", "eval.val_every=50", "checkpoint_every=1000"]
    reference = metarun(*longer, f"hydra.run.dir={tmp_path / 'ref'}", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [METARUN, *longer, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert f"metarun resume={run_dir}" in stderr
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["iteration"]
    assert 0 < stopped_at < 150, "the signal should have arrived mid-run"
    assert not (run_dir / "results.json").exists()

    resumed = metarun(f"resume={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "metarun.log").read_text()
    assert log.index("run folder") < log.index("resuming")  # the run's own log goes on
    assert not (tmp_path / "outputs").exists()  # and Hydra made no new folder
    assert read_metrics(run_dir) == read_metrics(tmp_path / "ref")
    ours = json.loads((run_dir / "results.json").read_text())["test"]
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())["test"]
    assert ours == ref


def test_test_mode_repeats_a_runs_test_and_tests_it_on_other_episodes(tiny, tmp_path):
    run_dir = tmp_path / "run"
    done = metarun(*tiny, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    own = json.loads((run_dir / "test_scores.json").read_text())

    data = [o for o in tiny if o.startswith(("data_dir=", "cache_dir="))]
    again = metarun(f"test={run_dir}", *data, f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / "test_scores.json").read_text()) == own
    results = json.loads((tmp_path / "again" / "results.json").read_text())
    assert results["tested"]["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")
    assert results["protocol"] == json.loads((run_dir / "results.json").read_text())["protocol"]

    other = tmp_path / "other"
    args = ["eval.episode_seed=1", "eval.test_episodes=9", "hardware.num_threads=1"]
    last = run_dir / "checkpoints" / "last.pt"
    # Without METARUN_DATA or data_dir=, the tested run's own data folders are used.
    unset = ("METARUN_DATA", "METARUN_CACHE")
    done = metarun(f"test={last}", *args, f"hydra.run.dir={other}", cwd=tmp_path, unset=unset)
    assert done.returncode == 0, done.stderr
    results = json.loads((other / "results.json").read_text())
    assert results["test"]["episodes"] == 9 and results["protocol"]["episode_seed"] == 1
    assert results["protocol"]["test_views"] == 0
    assert results["tested"] == {"checkpoint": str(last), "iteration": 4}
    assert results["config"]["hardware"]["num_threads"] == 1
    assert json.loads((other / "test_scores.json").read_text())["episodes"][:6] != own["episodes"]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_test_mode_refuses_training_overrides_and_folders_without_checkpoints(tmp_path):
    done = metarun(f"test={tmp_path}", "eval.test_episodes=9", "model.hidden=16", cwd=tmp_path)
    assert done.returncode == 2
    assert "model.hidden cannot be changed; only eval.*" in done.stderr
    done = metarun(f"test={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"{tmp_path} has no checkpoints/best.pt or checkpoints/last.pt" in done.stderr
    done = metarun(f"test={tmp_path}", f"resume={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2 and "give one of them" in done.stderr


def test_unknown_option_fails_at_start_naming_the_choices(tmp_path):
    done = metarun("algo=mamll", cwd=tmp_path)
    assert done.returncode != 0
    assert "Could not find 'algo/mamll'" in done.stderr
    assert all(choice in done.stderr for choice in ("fomaml", "maml", "protonet"))


def test_misspelled_key_fails_at_start(tmp_path):
    done = metarun("train.iteratons=3", cwd=tmp_path)
    assert done.returncode != 0 and "train.iteratons" in done.stderr


def test_missing_data_is_a_clear_error(tmp_path, cache_dir):
    done = metarun(
        f"data_dir={tmp_path / 'nothing'}",
        f"cache_dir={cache_dir}",
        "dataset.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert f"missing from {tmp_path / 'nothing' / 'omniglot'}" in done.stderr
    assert "images_background.zip" in done.stderr


def test_impossible_episode_is_a_clear_error(tiny, tmp_path):
    done = metarun(
        *tiny, "algo=protonet", "train.ways=5000", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path
    )
    assert done.returncode == 2
    assert "only 4112 classes" in done.stderr


def test_a_2x2_sweep_has_short_distinct_folder_names_and_metarun_report_averages_its_seeds(
    tiny, tmp_path
):
    sweep = tmp_path / "sweep"
    done = metarun(
        "--multirun",
        *tiny,
        "algo=maml,protonet",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    # Named by what differs (algorithm, seed) and the dataset, not the shared budget keys.
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert names == [f"{a},omniglot,seed={s}" for a in ("maml", "protonet") for s in (0, 1)]
    for name in names:
        assert json.loads((sweep / name / "results.json").read_text())["test"]["episodes"] == 6

    done = subprocess.run(
        [METARUN, "report", str(sweep), "--sort", "test/acc", "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    groups = list(csv.DictReader(open(tmp_path / "report" / "groups.csv")))
    means = [float(g["test_mean"]) for g in groups]
    assert means == sorted(means, reverse=True)  # --sort test/acc: best first
    for algo, name in (("MAML", "maml"), ("ProtoNet", "protonet")):
        a, b = (
            json.loads((sweep / f"{name},omniglot,seed={s}" / "results.json").read_text())["test"]
            for s in (0, 1)
        )
        # By hand: two seeds, so Student's t with 1 degree of freedom, t(0.975, 1) = 12.706
        # (tables); s = |a - b| / sqrt(2), so the half-width is 12.706 * |a - b| / 2.
        mean, half = (a["acc"] + b["acc"]) / 2, 12.7062 * abs(a["acc"] - b["acc"]) / 2
        (row,) = [g for g in groups if g["algorithm"] == algo]
        assert row["n_seeds"] == "2" and row["seeds"] == "0 1"
        assert float(row["test_mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(row["test_ci95_seeds"]) == pytest.approx(half, rel=1e-4, abs=1e-9)
        episode_ci = (a["ci95"] + b["ci95"]) / 2
        assert float(row["test_ci95_episodes_mean"]) == pytest.approx(episode_ci, abs=1e-9)
        assert f"{100 * mean:.2f} ± {100 * half:.2f}" in done.stdout
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.strip() == done.stdout.strip()  # printed and written
    assert "5-way 1-shot, 2 query, 6 episodes (seed 0)" in report


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    from metarun import run
    from metarun.algorithms import MAML
    from metarun.errors import NonFiniteError

    diverge_after(monkeypatch, MAML, 4)  # from iteration 3 (meta-batches of 2)
    with pytest.raises(NonFiniteError, match="nan at iteration 3"):
        run(make_cfg(), tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in last["algo"].values() if v.is_floating_point())


def test_help_shows_the_user_facing_groups_the_data_folder_and_the_other_commands(tmp_path):
    done = metarun("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "schema/" not in out  # the internal schema groups stay out of it
    for line in (
        "  logger: csv, mlflow, tensorboard, wandb",
        "  debug: tiny",
        "  hardware: auto, cpu, cuda",
        "  model: conv1d, conv4, convnet, mlp, mlp_sinusoid, resnet12",
    ):
        assert line in out.splitlines(), line
    assert "  algo: anil," in out and "  experiment: anil_omniglot_5w1s," in out
    assert f"METARUN_DATA (or data_dir=...), now: {os.environ['METARUN_DATA']}" in out
    for command in ("metarun report RUN_OR_SWEEP", "metarun-data list", "metarun-lake"):
        assert command in out


def test_debug_preset_runs_a_config_in_seconds_into_a_folder_named_by_algorithm(
    data_dir, cache_dir, tmp_path
):
    done = metarun(
        "debug=tiny",
        "algo=protonet",
        "hardware=cpu",
        "hardware.num_threads=1",
        f"data_dir={data_dir}",
        f"cache_dir={cache_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert run_dir.name.endswith("_protonet_omniglot")  # <time>_<algo>_<dataset>
    results = json.loads((run_dir / "results.json").read_text())
    assert results["training"]["iterations"] == 6 and results["test"]["episodes"] == 8
