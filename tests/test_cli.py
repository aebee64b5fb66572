"""End to end through the real entry point: ``metarun`` in a subprocess on the real Omniglot."""

from __future__ import annotations

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

from tests.conftest import tiny_overrides

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
    return [r for r in rows if len(r) > 1]


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
    assert {"algo", "optimizer", "rng", "best_val_acc"} <= set(ckpt)
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


def test_resume_refuses_other_overrides(tmp_path):
    done = metarun(f"resume={tmp_path}", "train.iterations=9", cwd=tmp_path)
    assert done.returncode == 2
    assert "drop the other overrides (train.iterations=9)" in done.stderr


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
    assert f"test={tmp_path}: no checkpoints/best.pt or checkpoints/last.pt" in done.stderr
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


def test_multirun_sweep_folders_are_named_after_the_overrides(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    done = metarun(
        "--multirun",
        *tiny,
        "algo=maml,protonet",
        "seed=0",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(names) == 2
    assert "algo=maml" in names[0] and "algo=protonet" in names[1]
    assert all("data_dir" not in n and "seed=0" in n for n in names)
    for name in names:
        assert json.loads((sweep / name / "results.json").read_text())["test"]["episodes"] == 6


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    from metarun.algorithms import MAML
    from metarun.runner import NonFiniteLossError, run

    calls = {"n": 0}
    original = MAML.meta_loss

    def diverging(self, episode):
        loss, acc = original(self, episode)
        calls["n"] += 1
        return (loss * float("nan"), acc) if calls["n"] > 4 else (loss, acc)  # from iteration 3

    monkeypatch.setattr(MAML, "meta_loss", diverging)
    with pytest.raises(NonFiniteLossError, match="nan at iteration 3"):
        run(make_cfg(), tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in last["algo"].values() if v.is_floating_point())
