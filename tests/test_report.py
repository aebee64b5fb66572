"""``metarun report``: runs grouped over seeds (mean ± t-interval across seeds, against a hand
computation), refusal of groups tested differently, markdown and CSV content, task streams.
The end-to-end check on a real 2x2 sweep is in tests/test_cli.py."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metarun.report import ReportError, find_runs, group_runs, report
from metarun.stats import mean_t_ci95, t_quantile

METARUN = shutil.which("metarun", path=str(Path(sys.executable).parent)) or "metarun"

# results.json as metarun.runner writes it (the fields the report reads).
RESULTS = {
    "test": {"acc": 0.5, "ci95": 0.02, "episodes": 600},
    "val": {"best_acc": 0.5, "best_iteration": 250},
    "protocol": {
        "dataset": "Omniglot",
        "split": "vinyals",
        "image_size": 28,
        "test_classes": 1692,
        "train_episode": {"ways": 5, "shots": 1, "query_shots": 5},
        "eval_episode": {"ways": 5, "shots": 1, "query_shots": 15},
        "episode_seed": 0,
        "algorithm": "MAML",
        "algo": {"ways": 5, "fast_lr": 0.4, "test_adaptation_steps": 3},
        "bn_mode": "transductive",
        "model": "Conv4",
    },
    "training": {"iterations": 250, "seconds": 100.0, "tasks_per_s": 20.0},
    "config": {
        "seed": 0,
        "data_dir": "/data",
        "algo": {"_target_": "metarun.algorithms.MAML", "fast_lr": 0.4},
        "dataset": {"_target_": "metarun.data.omniglot.Omniglot", "root": "/data"},
        "train": {"iterations": 250, "meta_lr": 0.001},
        "eval": {"test_episodes": 600, "episode_seed": 0},
        "hardware": {"device": "cpu"},
    },
}


def fake_run(folder: Path, seed: int, test: float, ci: float, val: float, **changes) -> Path:
    """A run folder with a results.json; ``changes`` maps dotted paths to new values."""
    results = copy.deepcopy(RESULTS)
    results["config"]["seed"] = seed
    results["test"].update(acc=test, ci95=ci)
    results["val"]["best_acc"] = val
    for path, value in changes.items():
        node = results
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_t_quantiles_match_the_tables():
    # Student's t, 0.975 quantile, from standard tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4), df


def test_mean_and_ci_across_three_seeds_by_hand():
    values = [0.90, 0.93, 0.96]
    mean, half = mean_t_ci95(values)
    # mean 0.93, s = 0.03, t(0.975, 2) = 4.303: half-width 4.303 * 0.03 / sqrt(3)
    assert mean == pytest.approx(0.93)
    assert half == pytest.approx(4.303 * 0.03 / math.sqrt(3), rel=1e-4)
    assert math.isnan(mean_t_ci95([0.5])[1])  # one seed: no interval across seeds


def test_report_groups_seeds_and_writes_markdown_and_csv(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "a0", 0, 0.90, 0.02, 0.88)
    fake_run(sweep / "a1", 1, 0.93, 0.03, 0.91, **{"config.data_dir": "/elsewhere"})
    fake_run(sweep / "a2", 2, 0.96, 0.01, 0.94, **{"config.hardware.device": "cuda"})
    fake_run(sweep / "b0", 0, 0.70, 0.02, 0.71, **{"config.train.meta_lr": 0.01})
    (sweep / "failed" / ".hydra").mkdir(parents=True)
    (sweep / "failed" / ".hydra" / "config.yaml").write_text("seed: 3\n")
    out = tmp_path / "out"
    markdown = report([sweep], out, sort="val/acc", plot=False)
    groups = list(csv.DictReader(open(out / "groups.csv")))
    assert [g["group"] for g in groups] == ["train.meta_lr=0.001", "train.meta_lr=0.01"]
    first = groups[0]
    assert first["n_seeds"] == "3" and first["seeds"] == "0 1 2"
    assert float(first["test_mean"]) == pytest.approx(0.93)
    half = 4.303 * 0.03 / math.sqrt(3)  # as in the hand computation above
    assert float(first["test_ci95_seeds"]) == pytest.approx(half, rel=1e-4)
    assert float(first["test_ci95_episodes_mean"]) == pytest.approx(0.02)
    assert float(first["val_mean"]) == pytest.approx(0.91)
    assert groups[1]["test_ci95_seeds"] == "nan"  # one seed
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert [r["run"] for r in runs] == ["a2", "a1", "a0", "b0"]  # by val/acc, best first
    assert runs[0]["test"] == "0.96" and runs[0]["test_ci95"] == "0.01"
    assert (out / "report.md").read_text() == markdown
    assert f"| 93.00 ± {100 * half:.2f} |" in markdown
    assert "| train.meta_lr=0.01 | MAML | Omniglot (vinyals) |" in markdown
    assert "5-way 1-shot, 15 query, 600 episodes (seed 0), 3 steps, 28 px" in markdown
    assert f"`{sweep / 'failed'}`" in markdown  # a run folder without results.json


def test_runs_tested_differently_are_not_averaged(tmp_path):
    fake_run(tmp_path / "a", 0, 0.9, 0.02, 0.9)
    fake_run(tmp_path / "b", 1, 0.8, 0.02, 0.8, **{"protocol.test_classes": 659})
    with pytest.raises(ReportError) as err:
        group_runs(find_runs([tmp_path])[0])
    assert "tested differently" in str(err.value) and "test_classes: 1692 against 659" in str(
        err.value
    )
    # Grouping across a key that changes the test episodes is refused, naming the fields.
    shutil.rmtree(tmp_path / "b")
    fake_run(
        tmp_path / "b",
        1,
        0.8,
        0.02,
        0.8,
        **{"config.eval.episode_seed": 1, "protocol.episode_seed": 1},
    )
    assert len(group_runs(find_runs([tmp_path])[0])) == 2  # different configs: two groups
    done = subprocess.run(
        [METARUN, "report", str(tmp_path), "--ignore", "eval.episode_seed", "--no-plot"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "tested differently (episode_seed: 0 against 1)" in done.stderr


def test_results_written_before_eval_episodes_are_standard_episodes(tmp_path):
    episode = RESULTS["protocol"]["eval_episode"]
    fake_run(tmp_path / "old", 0, 0.9, 0.02, 0.9)  # no "episodes" in eval_episode
    fake_run(
        tmp_path / "new",
        1,
        0.8,
        0.02,
        0.8,
        **{"protocol.eval_episode": episode | {"episodes": "standard"}},
    )
    assert len(group_runs(find_runs([tmp_path])[0])) == 1  # one group: the same episodes
    fake_run(
        tmp_path / "lake",
        2,
        0.7,
        0.02,
        0.7,
        **{"protocol.eval_episode": episode | {"episodes": "within_alphabet"}},
    )
    with pytest.raises(ReportError, match="tested differently"):
        group_runs(find_runs([tmp_path])[0])
    lake = next(r for r in find_runs([tmp_path])[0] if r.path.name == "lake")
    assert lake.protocol_text().startswith("5-way 1-shot, 15 query, within-alphabet, 600 ")


def test_task_stream_runs_have_their_own_table(tmp_path):
    for seed, (acc, bwt) in enumerate([(0.80, -0.20), (0.84, -0.10)]):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        results = {
            "metric": "acc",
            "continual": {"acc": acc, "bwt": bwt, "fwt": 0.0, "forgetting": -bwt},
            "matrix": [[1.0, 0.0], [0.8, 0.8]],
            "stream": {"tasks": [{"name": "digits 0,1"}, {"name": "digits 2,3"}]},
            "protocol": {
                "scenario": "split_mnist",
                "incremental": "class",
                "n_tasks": 2,
                "epochs": 1,
                "batch_size": 128,
                "method": "ExperienceReplay",
                "seed": seed,
            },
            "training": {"seconds": 3.0},
            "config": {"seed": seed, "algo": {"_target_": "metarun.continual.methods.ER"}},
        }
        (folder / "results.json").write_text(json.dumps(results))
    markdown = report([tmp_path], tmp_path / "out", plot=False)
    assert "### Task streams" in markdown
    assert "| s0 | - | ExperienceReplay | split_mnist (class-incremental) |" in markdown
    (group,) = csv.DictReader(open(tmp_path / "out" / "continual_groups.csv"))
    assert float(group["average_mean"]) == pytest.approx(0.82)
    assert float(group["average_ci95_seeds"]) == pytest.approx(12.7062 * 0.04 / 2, rel=1e-4)
    assert float(group["bwt_mean"]) == pytest.approx(-0.15)
    assert float(group["forgetting_mean"]) == pytest.approx(0.15)


def test_the_plot_is_a_png_and_without_matplotlib_the_report_says_what_to_install(tmp_path):
    fake_run(tmp_path / "runs" / "a", 0, 0.9, 0.02, 0.9)
    fake_run(tmp_path / "runs" / "b", 1, 0.8, 0.02, 0.8)
    pytest.importorskip("matplotlib", reason="the plot needs the plots extra")
    report([tmp_path / "runs"], tmp_path / "out")
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A Python where matplotlib cannot be imported: the tables, and the extra to install.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import importlib.util; importlib.util.find_spec = lambda name, *a: None\n"
        "from metarun.report import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "runs"), "--out", str(tmp_path / "bare")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'metarun[plots]'" in done.stderr
    assert (tmp_path / "bare" / "groups.csv").exists()
    assert not (tmp_path / "bare" / "report.png").exists()


def test_report_on_a_folder_without_runs_says_so(tmp_path):
    done = subprocess.run(
        [METARUN, "report", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "no results.json in" in done.stderr


def _benchmark_run(folder: Path, seed: int, method: str, test: dict[int, float], **bench):
    """A meta-continual benchmark run's results.json (the fields the report reads)."""
    meta_test = {
        str(n): {
            "lr": None,
            "test": {"mean": acc, "ci95": 0.01, "values": [acc] * 10},
            "train": {"mean": acc + 0.01, "ci95": 0.005, "values": []},
        }
        for n, acc in test.items()
    }
    benchmark = {"benchmark": "omniglot_meta_continual", "sizes": sorted(test), "draws": 10,
                 "selection_draws": 5, "train_shots": 15, "image_size": 28, "seed": seed,
                 "evaluation_split": "the evaluation set (659 characters)"} | bench  # fmt: skip
    results = {
        "metric": "acc",
        "meta_test": meta_test,
        "benchmark": benchmark,
        "protocol": {"scenario": "omniglot_meta_continual", "method": method, "seed": seed},
        "training": {"seconds": 60.0},
        "config": {"seed": seed, "algo": {"_target_": f"metarun.continual.methods.{method}"}},
    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))


def test_benchmark_runs_report_accuracy_against_n_over_seeds(tmp_path):
    for seed, (a, b) in enumerate([(0.98, 0.80), (0.96, 0.84)]):
        _benchmark_run(tmp_path / "runs" / f"sb{seed}", seed, "SBMCL", {10: a, 600: b})
    _benchmark_run(tmp_path / "runs" / "proto", 0, "Prototypes", {10: 0.99, 600: 0.85})
    markdown = report([tmp_path / "runs"], tmp_path / "out", sort="meta_test/600")
    assert "### Meta-continual benchmark" in markdown and "test mse" not in markdown
    row = "| proto | - | Prototypes | omniglot_meta_continual | 0 | 99.00 ± 1.00 | 85.00 ± 1.00 |"
    assert row in markdown
    groups = {
        g["method"]: g for g in csv.DictReader(open(tmp_path / "out" / "benchmark_groups.csv"))
    }
    assert groups["SBMCL"]["seeds"] == "0 1"
    assert float(groups["SBMCL"]["test_600_mean"]) == pytest.approx(0.82)
    assert float(groups["SBMCL"]["test_600_ci95_seeds"]) == pytest.approx(
        12.7062 * 0.04 / 2, rel=1e-4
    )
    assert float(groups["SBMCL"]["train_10_mean"]) == pytest.approx(0.98)
    runs = list(csv.DictReader(open(tmp_path / "out" / "benchmark_runs.csv")))
    assert [r["run"] for r in runs] == ["proto", "sb1", "sb0"]  # by N = 600, best first
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "accuracy_vs_n.png").read_bytes()[:4] == b"\x89PNG"
        assert not (tmp_path / "out" / "report.png").exists()  # no other kind of run
    # A run of the same method that differs only in its algo options gets its own label.
    _benchmark_run(tmp_path / "runs" / "wide", 0, "SBMCL", {10: 0.99, 600: 0.88})
    wide = json.loads((tmp_path / "runs" / "wide" / "results.json").read_text())
    wide["config"]["algo"]["ways"] = 200
    (tmp_path / "runs" / "wide" / "results.json").write_text(json.dumps(wide))
    labels = {g.first.name: g.label for g in group_runs(find_runs([tmp_path / "runs"])[0])}
    assert labels["wide"] == "algo.ways=200" and labels["proto"] == ""
    # Streams of another shape are not averaged with these.
    _benchmark_run(tmp_path / "runs" / "sb2", 2, "SBMCL", {10: 0.9, 600: 0.8}, train_shots=10)
    with pytest.raises(ReportError, match="train_shots: 15 against 10"):
        group_runs(find_runs([tmp_path / "runs"])[0])
