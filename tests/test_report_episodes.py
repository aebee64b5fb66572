"""``metarun report --episodes``: one run's per-episode scores, and the paired comparison of
two runs tested on the same episodes (which it refuses for runs tested on different ones)."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

METARUN = shutil.which("metarun", path=str(Path(sys.executable).parent)) or "metarun"
PROTOCOL = {
    "dataset": "Omniglot",
    "split": "vinyals",
    "image_size": 28,
    "test_classes": 1692,
    "eval_episode": {"ways": 5, "shots": 1, "query_shots": 15},
    "episode_seed": 0,
}


def fake_run(folder: Path, scores: list[float], metric: str = "acc", **protocol) -> Path:
    """A run folder with the two files the command reads, as the runner writes them."""
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"protocol": PROTOCOL | protocol}))
    body = {"metric": metric, "episode_seed": 0, "episodes": scores, "after_steps": {"5": scores}}
    (folder / "test_scores.json").write_text(json.dumps(body))
    return folder


def script(*args: Path | str) -> subprocess.CompletedProcess:
    command = [METARUN, "report", "--episodes", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_paired_difference_of_two_runs_on_the_same_episodes(tmp_path):
    rng = random.Random(0)
    a = [rng.random() for _ in range(200)]
    b = [x + 0.05 + 0.01 * rng.gauss(0, 1) for x in a]  # better on nearly every episode
    done = script(fake_run(tmp_path / "a", a), fake_run(tmp_path / "b", b))
    assert done.returncode == 0, done.stderr
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    expected = f"acc {mean:+.4f} ± {1.96 * std / math.sqrt(len(diffs)):.4f}"
    assert expected in done.stdout
    wins = sum(y > x for x, y in zip(a, b, strict=True))
    assert f"better on {wins} of them" in done.stdout
    # Each run's own interval, printed above the paired one, is the usual mean ± CI.
    mean_a = sum(a) / 200
    own = 1.96 * math.sqrt(sum((x - mean_a) ** 2 for x in a) / 199) / math.sqrt(200)
    assert f"200 episodes, acc {mean_a:.4f} ± {own:.4f}" in done.stdout


def test_refuses_runs_tested_on_different_episodes(tmp_path):
    a = fake_run(tmp_path / "a", [0.5, 0.6, 0.7])
    b = fake_run(tmp_path / "b", [0.5, 0.6, 0.8], episode_seed=1)
    done = script(a, b)
    assert done.returncode != 0
    assert "not tested on the same episodes" in done.stderr and "episode_seed" in done.stderr


def test_one_run_reports_its_worst_episodes_and_missing_files_name_the_fix(tmp_path):
    scores = [0.9] * 50
    scores[17] = 0.2
    done = script(fake_run(tmp_path / "a", scores), "--steps", "5")
    assert done.returncode == 0, done.stderr
    assert "worst episodes (index: score): 17: 0.2" in done.stdout
    done = script(tmp_path / "a", "--steps", "3")
    assert done.returncode != 0 and "has no scores after 3 adaptation steps" in done.stderr
    (tmp_path / "empty").mkdir()
    done = script(tmp_path / "empty")
    assert done.returncode != 0 and "metarun test=" in done.stderr


def test_diverged_episodes_rank_worst_and_the_finite_mean_is_given(tmp_path):
    scores = [0.1 * (i % 7) + 0.05 for i in range(40)]
    scores[3], scores[30] = math.nan, math.inf  # 10 SGD steps can diverge on a rare task
    done = script(fake_run(tmp_path / "a", scores, metric="mse"))
    assert done.returncode == 0, done.stderr
    assert "worst episodes (index: score): 3: nan, 30: inf" in done.stdout
    assert "2 episode(s) not finite (diverged): 3, 30" in done.stdout
    finite = [x for x in scores if math.isfinite(x)]
    mean = sum(finite) / 38
    ci = 1.96 * math.sqrt(sum((x - mean) ** 2 for x in finite) / 37) / math.sqrt(38)
    assert f"mean of the 38 finite episodes: mse {mean:.4f} ± {ci:.4f}" in done.stdout
    assert "max inf" in done.stdout
