"""Reads the per-episode test scores that a finished run writes (``test_scores.json``): how
one run's scores are spread, and, for two runs tested on the same fixed episodes, the paired
difference, whose confidence interval is much narrower than the two runs' own intervals.

Usage:
    python scripts/episode_scores.py RUN_DIR                  # one run
    python scripts/episode_scores.py RUN_A RUN_B              # and B - A, episode by episode
    python scripts/episode_scores.py RUN_DIR --steps 5        # after 5 adaptation steps

``--steps N`` reads the scores after N adaptation steps (one of the run's
``eval.report_steps``) instead of the test's own. A run that finished before metarun wrote
this file gets it from ``metarun test=RUN_DIR``, which tests the run again into a new folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# The protocol entries (results.json) that fix the test episodes: runs that agree on all of
# them were tested on the same episodes, in the same order.
SAME_EPISODES = ("dataset", "split", "image_size", "test_classes", "eval_episode", "episode_seed")


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval, as metarun reports them."""
    import torch

    from metarun.evaluation import mean_ci95 as of_tensor

    return of_tensor(torch.tensor(values, dtype=torch.float64))


def load(run_dir: Path, steps: int | None) -> tuple[list[float], str, dict]:
    """The run's per-episode scores (after ``steps`` adaptation steps if given), its metric
    and its protocol."""
    path = run_dir / "test_scores.json"
    if not path.exists():
        sys.exit(
            f"{path} does not exist: the run has not finished its test, or finished before "
            f"metarun wrote per-episode scores; `metarun test={run_dir}` tests it again "
            "into a new run folder, with the file."
        )
    scores = json.loads(path.read_text())
    protocol = json.loads((run_dir / "results.json").read_text())["protocol"]
    if steps is None:
        return scores["episodes"], scores["metric"], protocol
    after = scores.get("after_steps", {})
    if str(steps) not in after:
        sys.exit(
            f"{run_dir} has no scores after {steps} adaptation steps; it has "
            f"{sorted(after, key=int) or 'none'} (eval.report_steps)"
        )
    return after[str(steps)], scores["metric"], protocol


def describe(name: str, scores: list[float], metric: str) -> None:
    """Prints the mean ± 95% CI, the median and quartiles, and the worst episodes. Scores
    that are not finite (an MSE that diverged to inf or NaN) count as the worst; they are
    named, and the mean of the finite ones is printed beside the (infinite) mean."""
    n = len(scores)
    lower_is_better = metric != "acc"
    worst_value = math.inf if lower_is_better else -math.inf
    ranked = [x if math.isfinite(x) else worst_value for x in scores]
    ordered = sorted(ranked)
    mean, ci95 = mean_ci95(scores)
    q = [ordered[min(n - 1, int(p * n))] for p in (0.25, 0.5, 0.75)]
    worst = sorted(range(n), key=lambda i: ranked[i], reverse=lower_is_better)[:5]
    print(f"{name}: {n} episodes, {metric} {mean:.4f} ± {ci95:.4f}")
    print(f"  quartiles {q[0]:.4f} / median {q[1]:.4f} / {q[2]:.4f}", end="; ")
    print(f"min {ordered[0]:.4g}, max {ordered[-1]:.4g}")
    print("  worst episodes (index: score): " + ", ".join(f"{i}: {scores[i]:.4g}" for i in worst))
    diverged = [i for i, x in enumerate(scores) if not math.isfinite(x)]
    if diverged:
        finite = [x for x in scores if math.isfinite(x)]
        shown = ", ".join(map(str, diverged[:10])) + (", ..." if len(diverged) > 10 else "")
        print(f"  {len(diverged)} episode(s) not finite (diverged): {shown}")
        if finite:
            m, c = mean_ci95(finite)
            print(f"  mean of the {len(finite)} finite episodes: {metric} {m:.4f} ± {c:.4f}")
    elif lower_is_better and mean > 0:
        tail = max(1, n // 100)
        share = sum(scores[i] for i in worst[:tail]) / (mean * n)
        print(f"  the worst {tail} episode(s) make up {100 * share:.1f}% of the mean")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="one or two run folders")
    parser.add_argument("--steps", type=int, help="scores after this many adaptation steps")
    args = parser.parse_args(argv)
    if len(args.runs) > 2:
        parser.error("give one run folder, or two to compare")
    loaded = [load(run, args.steps) for run in args.runs]
    for run, (scores, metric, _) in zip(args.runs, loaded, strict=True):
        describe(str(run), scores, metric)
    if len(loaded) == 2:
        (a, metric_a, protocol_a), (b, metric_b, protocol_b) = loaded
        differ = [k for k in SAME_EPISODES if protocol_a.get(k) != protocol_b.get(k)]
        if metric_a != metric_b or len(a) != len(b) or differ:
            sys.exit(
                "the two runs were not tested on the same episodes "
                f"(they differ in {differ or ['metric or number of episodes']}); a paired "
                "comparison needs the same dataset, split, eval episode shape, "
                "eval.episode_seed and eval.test_episodes"
            )
        pairs = list(zip(a, b, strict=True))
        diff, ci95 = mean_ci95([y - x for x, y in pairs])
        wins = sum((y < x) if metric_a != "acc" else (y > x) for x, y in pairs)
        print(
            f"paired, second - first: {metric_a} {diff:+.4f} ± {ci95:.4f} (95% CI over "
            f"{len(a)} episodes); the second run is better on {wins} of them"
        )


if __name__ == "__main__":
    main()
