"""Hydra launchers and the Optuna sweeper, end to end through ``metarun --multirun``.

Needs the ``launchers`` extra (``pip install -e ".[launchers]"``; ``scripts/setup.sh`` installs
it). The tiny overrides are left out of the sweep folder names, as ``data_dir`` is in
``configs/config.yaml``, so each folder is named after what the sweep varies.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metarun.config import register_configs
from tests.conftest import CONFIGS, tiny_overrides
from tests.test_cli import METARUN

PLUGINS = ("hydra_joblib_launcher", "hydra_submitit_launcher", "hydra_optuna_sweeper")


@pytest.fixture(scope="module", autouse=True)
def launchers_installed() -> None:
    missing = [p for p in PLUGINS if importlib.util.find_spec(f"hydra_plugins.{p}") is None]
    if missing:
        pytest.fail(
            f"the Hydra plugins {', '.join(missing)} are not installed: "
            f'pip install -e ".[launchers]" (scripts/setup.sh does)'
        )


@pytest.fixture
def tiny(data_dir: Path, cache_dir: Path) -> list[str]:
    return tiny_overrides(data_dir, cache_dir)


def sweep(tiny: list[str], sweep_dir: Path, *args: str) -> tuple[int, str, str]:
    """Runs ``metarun --multirun`` with the tiny overrides into ``sweep_dir``; returns the
    exit code, the output, and the pid of the ``metarun`` process itself."""
    proc = subprocess.Popen(
        [
            METARUN,
            "--multirun",
            *tiny,
            *args,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=sweep_dir.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output, str(proc.pid)


def run_folders(sweep_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def event_file_pids(run_dir: Path) -> set[str]:
    """The pid that wrote each TensorBoard event file (``events.out.tfevents.T.HOST.PID.N``)."""
    return {p.name.split(".")[-2] for p in run_dir.glob("events.out.tfevents.*")}


def test_joblib_runs_jobs_in_worker_processes_and_a_failed_job_does_not_stop_the_sweep(
    tiny, tmp_path
):
    sweep_dir = tmp_path / "sweep"
    code, output, launcher_pid = sweep(
        tiny,
        sweep_dir,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "algo=protonet",
        "train.ways=3,5,5000",  # 5000-way episodes are impossible: that job fails
    )
    assert code == 1, output  # the sweep ends with the failed job listed
    assert "1 job(s) of the sweep" in output and "train.ways=5000): cannot sample" in output
    assert "Joblib.Parallel(n_jobs=2" in output
    folders = run_folders(sweep_dir)
    # Named by algorithm, dataset, the swept value and the seed (metarun/resolvers.py).
    assert set(folders) == {f"protonet,omniglot,ways={w},seed=0" for w in (3, 5, 5000)}
    for ways in (3, 5):
        run_dir = folders[f"protonet,omniglot,ways={ways},seed=0"]
        done = results(run_dir)
        assert done["protocol"]["train_episode"]["ways"] == ways
        assert done["test"]["episodes"] == 6 and 0 <= done["test"]["acc"] <= 1
        pids = event_file_pids(run_dir)
        assert pids and launcher_pid not in pids, "the job ran in the launching process"
    failed = folders["protonet,omniglot,ways=5000,seed=0"]
    assert not (failed / "results.json").exists()
    assert "cannot sample 5000-way episodes" in (failed / "metarun.log").read_text()


def test_submitit_local_runs_a_job_in_its_own_process(tiny, tmp_path):
    sweep_dir = tmp_path / "sweep"
    code, output, launcher_pid = sweep(
        tiny, sweep_dir, "hydra/launcher=submitit_local", "algo=protonet", "seed=3"
    )
    assert code == 0, output
    assert set(run_folders(sweep_dir)) == {"protonet,omniglot,seed=3"}
    run_dir = sweep_dir / "protonet,omniglot,seed=3"
    done = results(run_dir)
    assert done["config"]["seed"] == 3 and done["test"]["episodes"] == 6
    # submitit's own record of the job: its logs and pickled return value (val/acc)
    job_results = list((sweep_dir / ".submitit").glob("*/*_result.pkl"))
    assert len(job_results) == 1
    assert launcher_pid not in event_file_pids(run_dir)


SEARCHED = ("train.meta_lr", "algo.fast_lr")  # configs/sweep/maml_optuna.yaml


def test_optuna_sweep_maximises_the_validation_accuracy_each_run_returns(tiny, tmp_path):
    sweep_dir = tmp_path / "sweep"
    code, output, _ = sweep(tiny, sweep_dir, "sweep=maml_optuna", "hydra.sweeper.n_trials=2")
    assert code == 0, output
    trials = {}
    for name, run_dir in run_folders(sweep_dir).items():
        overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        params = dict(str(o).split("=") for o in overrides if str(o).split("=")[0] in SEARCHED)
        config = results(run_dir)["config"]
        meta_lr, fast_lr = float(params["train.meta_lr"]), float(params["algo.fast_lr"])
        assert (config["train"]["meta_lr"], config["algo"]["fast_lr"]) == (meta_lr, fast_lr)
        # The folder: the searched values to 4 significant digits (then the trial's number).
        assert name.startswith(f"maml,omniglot,meta_lr={meta_lr:.4g},fast_lr={fast_lr:.4g},seed=0")
        assert 1e-4 <= meta_lr <= 1e-2 and 0.01 <= fast_lr <= 1.0
        trials[(meta_lr, fast_lr)] = results(run_dir)["val"]["best_acc"]
    assert len(trials) == 2
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(trials.values()))
    best_params = (best.best_params["train.meta_lr"], best.best_params["algo.fast_lr"])
    assert trials[best_params] == pytest.approx(best.best_value)


def test_optuna_records_a_failed_trial_and_finishes_the_study(tiny, tmp_path):
    sweep_dir = tmp_path / "sweep"
    code, output, _ = sweep(
        tiny,
        sweep_dir,
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",  # draws 5000 then 5 (numpy's frozen RandomState)
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.n_trials=2",
        "algo=protonet",
        "train.ways=choice(5,5000)",  # 5000-way episodes are impossible: that trial fails
    )
    folders = run_folders(sweep_dir)
    assert set(folders) == {f"protonet,omniglot,ways={w},seed=0" for w in (5, 5000)}, output
    assert code == 1, output  # the study finished; the failed trial is listed at the end
    assert "1 job(s) of the sweep" in output
    failed = folders["protonet,omniglot,ways=5000,seed=0"]
    assert "cannot sample 5000-way episodes" in (failed / "metarun.log").read_text()
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_params["train.ways"] == 5
    assert best.best_value == pytest.approx(
        results(sweep_dir / "protonet,omniglot,ways=5,seed=0")["val"]["best_acc"]
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "sweep").glob("*.yaml")))
def test_every_sweep_config_searches_keys_that_exist(name, data_dir, cache_dir):
    """Each search-space key names a value of the composed config, so no trial fails on it."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[*tiny_overrides(data_dir, cache_dir), f"sweep={name}"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.params, "a sweep config without a search space"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"{name} searches {key}, not in the config"
