"""``metarun report``: one table of finished runs, grouped over seeds, as markdown, CSV and
a plot; and each test episode's score of one run, or of two runs compared episode by
episode.

metarun report outputs/multirun/2026-11-22/10-00-00             # a sweep
metarun report RUN_A RUN_B SWEEP --sort val/acc --out cmp/       # any runs and sweeps
metarun report SWEEP --curves val/acc                            # + learning curves
metarun report --episodes RUN [RUN2] [--steps 5]                 # per-episode scores

Runs are read from their ``results.json`` (and ``test_scores.json``); folders below the
given ones are searched for them. Runs whose configs agree in everything but ``seed`` (and
the machine: folders, ``hardware``, logging and checkpoint intervals, loggers) form a group:
its mean over seeds ± the half-width of the 95% confidence interval across seeds (Student's
t, n - 1 degrees of freedom), next to the mean of its runs' own episode intervals. Runs of
one group must have been tested the same way (dataset, split, episode shape, test
episodes and their seed, image size, batch-norm mode, test adaptation steps): otherwise the
report stops and names the fields that differ. Task-stream runs (a ``continual`` block:
ACC, BWT, FWT, forgetting) have tables of their own.

Writes ``report.md``, ``runs.csv``, ``groups.csv`` (and ``continual_runs.csv``,
``continual_groups.csv``) and ``report.png`` to ``--out`` (default: the folder given, or
the current one for several). The plot needs matplotlib (``pip install 'metarun[plots]'``);
without it the tables are written and the report says how to get the plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# MACHINE_KEYS: config keys that do not change what a run learns or how it is tested, left
# out when runs are grouped (with ``seed``, which a group spans), as from a run's hparams.
from metarun.hparams import MACHINE_KEYS
from metarun.stats import mean_t_ci95

# The protocol entries (results.json) that fix the test episodes: runs that agree on all of
# them were tested on the same episodes, in the same order.
SAME_EPISODES = ("dataset", "split", "image_size", "test_classes", "eval_episode", "episode_seed")
# The meta-continual benchmark's entries (results.json "benchmark") that fix its streams' shape.
BENCHMARK_PROTOCOL = (
    "benchmark",
    "sizes",
    "draws",
    "selection_draws",
    "train_shots",
    "image_size",
    "evaluation_split",
    "lr_grid",
)


def with_episode_kind(protocol: dict[str, Any]) -> dict[str, Any]:
    """``protocol`` with the kind of its test episodes (``eval_episode.episodes``), which
    results written before ``eval.episodes`` existed lack: theirs were ``standard``."""
    e = protocol.get("eval_episode")
    if isinstance(e, dict) and "episodes" not in e:
        return protocol | {"eval_episode": e | {"episodes": "standard"}}
    return protocol


class ReportError(Exception):
    """The runs cannot be reported as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------- statistics


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean over episodes and the half-width of its normal 95% interval, as metarun's own
    test reports it (:func:`metarun.evaluation.mean_ci95`: ``1.96 * std / sqrt(n)``)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2 or not math.isfinite(mean):
        return mean, 0.0 if n < 2 else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    return mean, 1.96 * std / math.sqrt(n)


# ---------------------------------------------------------------------------- runs


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _covered(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclass
class Run:
    """One finished run folder and what its ``results.json`` says."""

    path: Path
    name: str
    results: dict[str, Any]

    @property
    def continual(self) -> bool:
        return "continual" in self.results

    @property
    def benchmark(self) -> bool:
        """A meta-continual benchmark run: accuracy against the number of classes N."""
        return "meta_test" in self.results

    @property
    def kind(self) -> str:
        """Which table the run goes to: ``continual``, ``benchmark`` or ``meta``."""
        return "continual" if self.continual else "benchmark" if self.benchmark else "meta"

    @property
    def sizes(self) -> list[str]:
        """The benchmark's numbers of classes N, as results.json keys them."""
        return sorted(self.results.get("meta_test", {}), key=int)

    @property
    def config(self) -> dict[str, Any]:
        return self.results.get("config", {})

    @property
    def protocol(self) -> dict[str, Any]:
        return with_episode_kind(self.results.get("protocol", {}))

    @property
    def metric(self) -> str:
        if self.continual or self.benchmark:
            return self.results.get("metric", "acc")
        test = self.results.get("test", {})
        return "acc" if "acc" in test else "mse"

    @property
    def seed(self) -> Any:
        return self.config.get("seed", self.protocol.get("seed"))

    @property
    def algorithm(self) -> str:
        p = self.protocol
        return p.get("method") or p.get("algorithm") or "?"

    @property
    def dataset(self) -> str:
        p = self.protocol
        if self.continual:
            return f"{p.get('scenario')} ({p.get('incremental')}-incremental)"
        if self.benchmark:
            return str(p.get("scenario"))
        return p.get("dataset", "?") + (f" ({p['split']})" if p.get("split") else "")

    def value(self, name: str) -> float:
        """A number of this run by its report name (``test/acc``, ``val/mse``,
        ``test/ci95``, ``time``, ``tasks/s``, ``continual/bwt``, ...); NaN if it has none."""
        r, m = self.results, self.metric
        training = r.get("training", {})
        table = {
            f"test/{m}": r.get("test", {}).get(m),
            "test/ci95": r.get("test", {}).get("ci95"),
            f"val/{m}": r.get("val", {}).get(f"best_{m}"),
            "time": training.get("seconds"),
            "tasks/s": training.get("tasks_per_s"),
        }
        for key, v in r.get("continual", {}).items():
            table[f"continual/{key}"] = v
        for n, entry in r.get("meta_test", {}).items():  # meta_test/600, .../train, .../ci95
            table[f"meta_test/{n}"] = entry["test"]["mean"]
            table[f"meta_test/{n}/ci95"] = entry["test"]["ci95"]
            table[f"meta_test/{n}/train"] = entry["train"]["mean"]
        v = table.get(name)
        return math.nan if v is None else float(v)

    def test_protocol(self) -> dict[str, Any]:
        """What fixes how this run was tested: runs of one group must agree on all of it."""
        p = self.protocol
        if self.continual:
            fields = {k: p.get(k) for k in ("scenario", "incremental", "n_tasks")}
            tasks = self.results.get("stream", {}).get("tasks")
            return fields | {"metric": self.metric, "tasks": tasks}
        if self.benchmark:  # the streams' shape; the draws themselves follow the seed
            bench = self.results.get("benchmark", {})
            return {k: bench.get(k) for k in BENCHMARK_PROTOCOL} | {"metric": self.metric}
        fields = {k: p.get(k) for k in (*SAME_EPISODES, "bn_mode")}
        fields["test_episodes"] = self.results.get("test", {}).get("episodes")
        fields["test_adaptation_steps"] = p.get("algo", {}).get("test_adaptation_steps")
        return fields | {"metric": self.metric}

    def protocol_text(self) -> str:
        """The test protocol in a few words, for the table."""
        p = self.protocol
        if self.continual:
            return (
                f"{p.get('n_tasks')} tasks, {p.get('epochs')} epoch(s), batch {p.get('batch_size')}"
            )
        if self.benchmark:
            b = self.results.get("benchmark", {})
            return (
                f"{b.get('train_shots')} drawings per class, one per update; {b.get('draws')} "
                f"draws per N; {b.get('image_size')} px"
            )
        e = p.get("eval_episode", {})
        episodes = self.results.get("test", {}).get("episodes")
        if self.metric == "acc":
            shape = f"{e.get('ways')}-way {e.get('shots')}-shot, {e.get('query_shots')} query"
        else:
            shape = f"K={e.get('shots')}, {e.get('query_shots')} query"
        parts = [shape, f"{episodes} episodes (seed {p.get('episode_seed')})"]
        if e.get("episodes", "standard") != "standard":  # eval.episodes=within_alphabet
            parts.insert(1, str(e["episodes"]).replace("_", "-"))
        steps = p.get("algo", {}).get("test_adaptation_steps")
        if steps is not None:
            parts.append(f"{steps} steps")
        if p.get("image_size"):
            parts.append(f"{p['image_size']} px")
        parts.append(f"{p.get('bn_mode')} BN")
        return ", ".join(parts)

    def group_key(self, ignore: tuple[str, ...]) -> str:
        flat = _flatten(self.config)
        kept = {k: v for k, v in flat.items() if k != "seed" and not _covered(k, ignore)}
        # A run tested again (metarun test=RUN) is the same model as the run it tested.
        kept["(tested again)"] = "tested" in self.results
        return json.dumps(kept, sort_keys=True, default=str)


def find_runs(paths: list[Path]) -> tuple[list[Run], list[Path]]:
    """The finished runs in ``paths`` (run folders, or folders searched for them), and
    the run folders found without a ``results.json`` (failed or still running)."""
    runs: list[Run] = []
    unfinished: list[Path] = []
    seen: set[Path] = set()
    for root in paths:
        if not root.exists():
            raise ReportError(f"{root} does not exist: give run folders or sweep folders.")
        found = [root / "results.json"] if (root / "results.json").exists() else []
        found = found or sorted(root.rglob("results.json"))
        for path in found:
            folder = path.parent.resolve()
            if folder in seen:
                continue
            seen.add(folder)
            try:
                results = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ReportError(
                    f"{path} is not valid JSON ({err}); is it still written?"
                ) from err
            name = path.parent.name if path.parent == root else str(path.parent.relative_to(root))
            runs.append(Run(folder, name, results))
        markers = [p.parent.parent for p in root.rglob(".hydra/config.yaml")]
        unfinished += [
            p for p in markers if not (p / "results.json").exists() and p.resolve() not in seen
        ]
    if not runs:
        where = ", ".join(map(str, paths))
        raise ReportError(
            f"no results.json in {where}: a run writes it when it has finished its test"
            + (f" ({len(unfinished)} run folder(s) without one)" if unfinished else "")
        )
    return runs, sorted(set(unfinished))


@dataclass
class Group:
    """Runs that differ only in their seed (and the machine)."""

    runs: list[Run]
    label: str = ""
    values: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def first(self) -> Run:
        return self.runs[0]

    def value(self, name: str) -> float:
        return self.values.get(name, (math.nan, math.nan))[0]


def group_runs(runs: list[Run], ignore: tuple[str, ...] = ()) -> list[Group]:
    """Groups runs that agree in everything but ``seed``, the machine keys and ``ignore``;
    refuses a group whose runs were tested differently, naming the protocol fields."""
    keys: dict[str, list[Run]] = {}
    for run in runs:
        keys.setdefault(run.group_key((*MACHINE_KEYS, *ignore)), []).append(run)
    groups = [
        Group(sorted(members, key=lambda r: (str(r.seed), r.name))) for members in keys.values()
    ]
    for group in groups:
        reference = group.first.test_protocol()
        for run in group.runs[1:]:
            other = run.test_protocol()
            differ = sorted(
                k for k in reference.keys() | other.keys() if reference.get(k) != other.get(k)
            )
            if differ:
                details = "; ".join(
                    f"{k}: {reference.get(k)!r} against {other.get(k)!r}" for k in differ
                )
                raise ReportError(
                    f"{group.first.name} and {run.name} would be one group (their configs "
                    f"differ only in seed{', ' + ', '.join(ignore) if ignore else ''}) but were "
                    f"tested differently ({details}); their numbers cannot be averaged. Report "
                    f"them separately, or test them again on one protocol "
                    f"(metarun test=RUN eval.test_episodes=... eval.episode_seed=...)."
                )
    for kind in {(g.first.kind, g.first.metric) for g in groups}:  # one per table
        _label([g for g in groups if (g.first.kind, g.first.metric) == kind], ignore)
    return groups


def _label(groups: list[Group], ignore: tuple[str, ...]) -> None:
    """Names each group by the config values that tell it from the other groups (beyond
    the algorithm and dataset columns), e.g. ``train.meta_lr=0.001``."""
    flats = []
    for g in groups:
        flat = _flatten(g.first.config)
        flats.append(
            {
                k: v
                for k, v in flat.items()
                if k != "seed" and not _covered(k, (*MACHINE_KEYS, *ignore))
            }
        )
    keys = sorted({k for f in flats for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
    # Under a node whose class differs (algo=maml against algo=protonet) the algorithm
    # column says it all; its own keys would only repeat it.
    retargeted = {k[: -len("._target_")] for k in differing if k.endswith("._target_")}
    shown = [k for k in differing if not _covered(k, sorted(retargeted))]
    for g, flat in zip(groups, flats, strict=True):
        parts = [f"{k}={flat[k]}" for k in shown if k in flat]
        if "tested" in g.first.results:
            parts.append("tested again")
        g.label = ",".join(parts)
    # Groups of one algorithm that differ only under such a node would share a label: for
    # them, the keys that tell them apart.
    alike: dict[tuple[str, str], list[tuple[Group, dict]]] = {}
    for g, flat in zip(groups, flats, strict=True):
        alike.setdefault((g.first.algorithm, g.label), []).append((g, flat))
    for members in alike.values():
        keys = [
            k
            for k in differing
            if k not in shown and len({json.dumps(f.get(k), default=str) for _, f in members}) > 1
        ]
        for g, flat in members:
            g.label = ",".join(
                [g.label] * bool(g.label) + [f"{k}={flat[k]}" for k in keys if k in flat]
            )


# ---------------------------------------------------------------------------- tables


def _summarise(group: Group) -> None:
    m = group.first.metric
    names = [f"val/{m}", f"test/{m}", "test/ci95", "time", "tasks/s"]
    if group.first.continual:
        names = [f"continual/{m}", "continual/bwt", "continual/fwt", "continual/forgetting", "time"]
    if group.first.benchmark:
        sizes = group.first.sizes
        names = [f"meta_test/{n}" for n in sizes] + [f"meta_test/{n}/train" for n in sizes]
        names += ["time"]
    for name in names:
        values = [r.value(name) for r in group.runs]
        finite = [v for v in values if math.isfinite(v)]
        group.values[name] = (
            mean_t_ci95(finite) if len(finite) == len(values) else (math.nan, math.nan)
        )


def _fmt(value: float, metric: str, ci: float | None = None) -> str:
    if not math.isfinite(value):
        return "n/a"
    if metric == "acc":
        text = f"{100 * value:.2f}"
        return text + (f" ± {100 * ci:.2f}" if ci is not None and math.isfinite(ci) else "")
    text = f"{value:.4g}"
    return text + (f" ± {ci:.2g}" if ci is not None and math.isfinite(ci) else "")


def _number(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


SORT_ASCENDING = ("mse", "time", "forgetting", "test/ci95")


def _sort_key(name: str):
    ascending = any(name.endswith(s) for s in SORT_ASCENDING)

    def key(item: Run | Group) -> tuple[bool, float]:
        v = item.value(name)
        return (not math.isfinite(v), v if ascending else -v)

    return key


def meta_tables(runs: list[Run], groups: list[Group], metric: str) -> tuple[str, list, list]:
    """Markdown of the runs and groups of one metric (``acc`` or ``mse``) and their CSV
    rows."""
    unit = " (%)" if metric == "acc" else ""
    run_header = [
        "run",
        "group",
        "algorithm",
        "dataset",
        "test protocol",
        "seed",
        f"val {metric}{unit}",
        f"test {metric}{unit} ± episode CI",
        "train s",
        "tasks/s",
    ]
    label = {id(r): g.label for g in groups for r in g.runs}
    run_rows, run_csv = [], []
    for r in runs:
        run_rows.append(
            [
                r.name,
                label[id(r)] or "-",
                r.algorithm,
                r.dataset,
                r.protocol_text(),
                str(r.seed),
                _fmt(r.value(f"val/{metric}"), metric),
                _fmt(r.value(f"test/{metric}"), metric, r.value("test/ci95")),
                _number(r.value("time")),
                _number(r.value("tasks/s")),
            ]
        )
        run_csv.append(
            {
                "run": r.name,
                "group": label[id(r)],
                "algorithm": r.algorithm,
                "dataset": r.dataset,
                "test_protocol": r.protocol_text(),
                "seed": r.seed,
                "metric": metric,
                "val": r.value(f"val/{metric}"),
                "test": r.value(f"test/{metric}"),
                "test_ci95": r.value("test/ci95"),
                "test_episodes": r.results.get("test", {}).get("episodes"),
                "train_seconds": r.value("time"),
                "tasks_per_s": r.value("tasks/s"),
                "path": str(r.path),
            }
        )
    group_header = [
        "group",
        "algorithm",
        "dataset",
        "test protocol",
        "seeds",
        f"val {metric}{unit}",
        f"test {metric}{unit} ± CI across seeds",
        "mean episode CI",
        "train s",
        "tasks/s",
    ]
    group_rows, group_csv = [], []
    for g in groups:
        r = g.first
        seeds = [x.seed for x in g.runs]
        val, test = g.values[f"val/{metric}"], g.values[f"test/{metric}"]
        episode_ci = g.value("test/ci95")
        group_rows.append(
            [
                g.label or "-",
                r.algorithm,
                r.dataset,
                r.protocol_text(),
                f"{len(seeds)} ({', '.join(map(str, seeds))})",
                _fmt(val[0], metric, val[1]),
                _fmt(test[0], metric, test[1]),
                ("± " + _fmt(episode_ci, metric)) if math.isfinite(episode_ci) else "n/a",
                _number(g.value("time")),
                _number(g.value("tasks/s")),
            ]
        )
        group_csv.append(
            {
                "group": g.label,
                "algorithm": r.algorithm,
                "dataset": r.dataset,
                "test_protocol": r.protocol_text(),
                "metric": metric,
                "n_seeds": len(seeds),
                "seeds": " ".join(map(str, seeds)),
                "val_mean": val[0],
                "val_ci95_seeds": val[1],
                "test_mean": test[0],
                "test_ci95_seeds": test[1],
                "test_ci95_episodes_mean": episode_ci,
                "train_seconds_mean": g.value("time"),
                "tasks_per_s_mean": g.value("tasks/s"),
                "runs": " ".join(x.name for x in g.runs),
            }
        )
    name = "accuracy" if metric == "acc" else metric.upper()
    text = (
        f"### Runs ({name})\n\n{_markdown(run_header, run_rows)}\n\n"
        f"### Groups over seeds ({name})\n\n"
        f"Mean over seeds ± 95% CI across seeds (Student's t, n - 1 df; n/a for one seed); "
        f"mean episode CI: the mean of the runs' own 95% intervals over test episodes.\n\n"
        f"{_markdown(group_header, group_rows)}\n"
    )
    return text, run_csv, group_csv


def continual_tables(runs: list[Run], groups: list[Group]) -> tuple[str, list, list]:
    """Markdown and CSV rows of task-stream runs: ACC (or average MSE), BWT, FWT,
    forgetting."""
    header = [
        "run",
        "group",
        "method",
        "scenario",
        "protocol",
        "seed",
        "ACC / avg MSE",
        "BWT",
        "FWT",
        "forgetting",
        "train s",
    ]
    label = {id(r): g.label for g in groups for r in g.runs}
    rows, run_csv = [], []

    def signed(v: float, m: str) -> str:
        if not math.isfinite(v):
            return "n/a"
        return f"{100 * v:+.2f}" if m == "acc" else f"{v:+.4g}"

    for r in runs:
        m = r.metric
        rows.append(
            [
                r.name,
                label[id(r)] or "-",
                r.algorithm,
                r.dataset,
                r.protocol_text(),
                str(r.seed),
                _fmt(r.value(f"continual/{m}"), m) + (" %" if m == "acc" else " (MSE)"),
                signed(r.value("continual/bwt"), m),
                signed(r.value("continual/fwt"), m),
                signed(r.value("continual/forgetting"), m),
                _number(r.value("time")),
            ]
        )
        run_csv.append(
            {
                "run": r.name,
                "group": label[id(r)],
                "method": r.algorithm,
                "scenario": r.dataset,
                "seed": r.seed,
                "metric": m,
                "average": r.value(f"continual/{m}"),
                "bwt": r.value("continual/bwt"),
                "fwt": r.value("continual/fwt"),
                "forgetting": r.value("continual/forgetting"),
                "train_seconds": r.value("time"),
                "path": str(r.path),
            }
        )
    g_header = [
        "group",
        "method",
        "scenario",
        "seeds",
        "ACC / avg MSE ± CI",
        "BWT ± CI",
        "forgetting ± CI",
    ]
    g_rows, group_csv = [], []
    for g in groups:
        m = g.first.metric
        seeds = [x.seed for x in g.runs]

        def pm(name: str, g: Group = g, m: str = m) -> str:
            mean, ci = g.values[name]
            scale = 100 if m == "acc" else 1
            if not math.isfinite(mean):
                return "n/a"
            return f"{scale * mean:.4g}" + (f" ± {scale * ci:.2g}" if math.isfinite(ci) else "")

        g_rows.append(
            [
                g.label or "-",
                g.first.algorithm,
                g.first.dataset,
                f"{len(seeds)} ({', '.join(map(str, seeds))})",
                pm(f"continual/{m}") + (" %" if m == "acc" else ""),
                pm("continual/bwt"),
                pm("continual/forgetting"),
            ]
        )
        row = {
            "group": g.label,
            "method": g.first.algorithm,
            "scenario": g.first.dataset,
            "metric": m,
            "n_seeds": len(seeds),
            "seeds": " ".join(map(str, seeds)),
        }
        for key in (m, "bwt", "fwt", "forgetting"):
            mean, ci = g.values[f"continual/{key}"]
            row[f"{'average' if key == m else key}_mean"] = mean
            row[f"{'average' if key == m else key}_ci95_seeds"] = ci
        row["runs"] = " ".join(x.name for x in g.runs)
        group_csv.append(row)
    text = (
        "### Task streams\n\nACC: the average accuracy over all tasks after the last one "
        "(average MSE for regression); BWT, FWT, forgetting as in docs/LIFELONG.md "
        "(accuracy in percentage points).\n\n"
        f"{_markdown(header, rows)}\n\n### Task streams: groups over seeds\n\n"
        f"{_markdown(g_header, g_rows)}\n"
    )
    return text, run_csv, group_csv


def benchmark_tables(runs: list[Run], groups: list[Group]) -> tuple[str, list, list]:
    """Markdown and CSV rows of meta-continual benchmark runs: meta-test test accuracy at
    each N (a run: ± its 95% CI over draws; a group: ± the 95% CI across seeds), and
    meta-test train accuracy."""
    sizes = sorted({n for r in runs for n in r.sizes}, key=int)
    label = {id(r): g.label for g in groups for r in g.runs}
    header = ["run", "group", "method", "benchmark", "seed"]
    header += [f"N = {n}" for n in sizes] + ["train s"]
    rows, run_csv = [], []
    for r in runs:
        cells = [
            _fmt(r.value(f"meta_test/{n}"), "acc", r.value(f"meta_test/{n}/ci95")) for n in sizes
        ]
        rows.append(
            [r.name, label[id(r)] or "-", r.algorithm, r.dataset, str(r.seed), *cells]
            + [_number(r.value("time"))]
        )
        row = {"run": r.name, "group": label[id(r)], "method": r.algorithm, "seed": r.seed}
        for n in sizes:
            row[f"test_{n}"] = r.value(f"meta_test/{n}")
            row[f"test_{n}_ci95_draws"] = r.value(f"meta_test/{n}/ci95")
            row[f"train_{n}"] = r.value(f"meta_test/{n}/train")
        run_csv.append(row | {"train_seconds": r.value("time"), "path": str(r.path)})
    g_header = ["group", "method", "seeds"] + [f"N = {n}" for n in sizes]
    g_rows, group_csv = [], []
    for g in groups:
        seeds = [x.seed for x in g.runs]
        g_rows.append(
            [g.label or "-", g.first.algorithm, f"{len(seeds)} ({', '.join(map(str, seeds))})"]
            + [_fmt(g.value(f"meta_test/{n}"), "acc", g.values[f"meta_test/{n}"][1]) for n in sizes]
        )
        row = {"group": g.label, "method": g.first.algorithm, "seeds": " ".join(map(str, seeds))}
        for n in sizes:
            mean, ci = g.values[f"meta_test/{n}"]
            row[f"test_{n}_mean"], row[f"test_{n}_ci95_seeds"] = mean, ci
            row[f"train_{n}_mean"] = g.value(f"meta_test/{n}/train")
        group_csv.append(row | {"runs": " ".join(x.name for x in g.runs)})
    protocols = sorted({r.protocol_text() for r in runs})
    text = (
        "### Meta-continual benchmark\n\nMeta-test test accuracy (%) after a stream of N "
        "classes, on each class's other drawings; a run's mean ± 95% CI over its draws "
        f"({'; '.join(protocols)}).\n\n{_markdown(header, rows)}\n\n"
        "### Meta-continual benchmark: groups over seeds\n\nMean over seeds ± 95% CI "
        "across seeds (Student's t, n - 1 df; none for one seed).\n\n"
        f"{_markdown(g_header, g_rows)}\n"
    )
    return text, run_csv, group_csv


def _accuracy_vs_n(groups: list[Group], out: Path) -> Path:
    """Every benchmark group's meta-test test accuracy against N in one figure; the band is
    the 95% CI across seeds, or for one seed the run's own CI over its draws."""
    from metarun import figures

    series = {}
    for g in groups:
        points = []
        for n in g.first.sizes:
            mean, ci = g.values[f"meta_test/{n}"]
            if len(g.runs) == 1:
                ci = g.first.value(f"meta_test/{n}/ci95")
            points.append((int(n), mean, ci if math.isfinite(ci) else 0.0))
        name = " · ".join(x for x in (g.first.algorithm, g.label) if x)
        series[name + (f" ({len(g.runs)} seeds)" if len(g.runs) > 1 else "")] = points
    fig = figures.accuracy_vs_n(
        series, ylabel="meta-test test accuracy (%)", title="accuracy against the number of classes"
    )
    return figures.save_png(fig, out / "accuracy_vs_n.png")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_curve(run: Run, tag: str) -> tuple[list[float], list[float]]:
    """``(iterations, values)`` of ``tag`` in the run's ``metrics.jsonl`` (whatever lines
    the values were written on)."""
    path = run.path / "metrics.jsonl"
    points: dict[float, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if tag in row and isinstance(row[tag], (int, float)):
                points[row.get("iteration", row.get("step", len(points)))] = float(row[tag])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _plot(groups: list[Group], out: Path) -> Path:
    from metarun import figures

    panels: dict[str, list] = {}
    percent: dict[str, bool] = {}
    for g in groups:
        if g.first.benchmark:  # their own figure (accuracy_vs_n.png)
            continue
        m = g.first.metric
        name = f"continual/{m}" if g.first.continual else f"test/{m}"
        title = {
            "test/acc": "test accuracy (%)",
            "test/mse": "test MSE",
            "continual/acc": "stream ACC: average accuracy after the last task (%)",
            "continual/mse": "stream average MSE after the last task",
        }[name]
        percent[title] = m == "acc"
        runs = [(r.value(name), r.value("test/ci95") if not r.continual else 0.0) for r in g.runs]
        mean, ci = g.values[name]
        label = " · ".join(
            x for x in (g.first.algorithm, g.first.dataset.split(" (")[0], g.label) if x
        )
        panels.setdefault(title, []).append((label, mean, ci, runs))
    fig = figures.error_bars(panels, percent)
    return figures.save_png(fig, out / "report.png")


def report(
    paths: list[Path],
    out: Path,
    sort: str | None = None,
    ignore: tuple[str, ...] = (),
    curves: str | None = None,
    plot: bool = True,
) -> str:
    """Writes the report of the runs in ``paths`` to ``out`` and returns its markdown."""
    runs, unfinished = find_runs(paths)
    groups = group_runs(runs, ignore)
    for g in groups:
        _summarise(g)
    if sort:
        known = {
            n
            for r in runs
            for n in (
                "val/acc",
                "test/acc",
                "val/mse",
                "test/mse",
                "test/ci95",
                "time",
                "tasks/s",
                *(f"continual/{k}" for k in r.results.get("continual", {})),
                *(f"meta_test/{n}" for n in r.sizes),
            )
        }
        if sort not in known:
            raise ReportError(
                f"--sort {sort}: not a value of these runs; "
                f"choose one of {', '.join(sorted(known))}"
            )
        runs.sort(key=_sort_key(sort))
        groups.sort(key=_sort_key(sort))
    else:
        order = {id(r): i for i, g in enumerate(groups) for r in g.runs}
        runs.sort(key=lambda r: order[id(r)])
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        f"# metarun report\n\n{len(runs)} run(s) in {len(groups)} group(s) from "
        + ", ".join(f"`{p}`" for p in paths)
        + (f"; sorted by {sort}" if sort else "")
        + ".\n"
    ]
    written = []
    for metric in ("acc", "mse"):
        these = [r for r in runs if r.kind == "meta" and r.metric == metric]
        if not these:
            continue
        text, run_csv, group_csv = meta_tables(
            these,
            [g for g in groups if g.first.kind == "meta" and g.first.metric == metric],
            metric,
        )
        sections.append(text)
        suffix = "" if metric == "acc" else "_mse"
        _write_csv(out / f"runs{suffix}.csv", run_csv)
        _write_csv(out / f"groups{suffix}.csv", group_csv)
        written += [out / f"runs{suffix}.csv", out / f"groups{suffix}.csv"]
    for kind, tables in (("continual", continual_tables), ("benchmark", benchmark_tables)):
        these = [r for r in runs if r.kind == kind]
        if not these:
            continue
        text, run_csv, group_csv = tables(these, [g for g in groups if g.first.kind == kind])
        sections.append(text)
        for name, rows in (("runs", run_csv), ("groups", group_csv)):
            _write_csv(out / f"{kind}_{name}.csv", rows)
            written.append(out / f"{kind}_{name}.csv")
    benchmarks = any(r.benchmark for r in runs)
    if unfinished:
        sections.append(
            "### Run folders without results.json (failed, stopped or still running)\n\n"
            + "\n".join(f"- `{p}`" for p in unfinished)
            + "\n"
        )
    from metarun import figures

    notes = []
    if plot and figures.available():
        if any(not g.first.benchmark for g in groups):
            written.append(_plot(groups, out))
            sections.append("![accuracy per group](report.png)\n")
        if benchmarks:
            written.append(_accuracy_vs_n([g for g in groups if g.first.benchmark], out))
            sections.append("![accuracy against N](accuracy_vs_n.png)\n")
        if curves:
            label = {id(r): g.label for g in groups for r in g.runs}
            lines = {
                " · ".join(x for x in (r.algorithm, label[id(r)], f"seed {r.seed}") if x)
                + ("" if len(paths) == 1 else f" ({r.name})"): read_curve(r, curves)
                for r in runs
            }
            lines = {k: v for k, v in lines.items() if v[0]}
            if not lines:
                raise ReportError(f"--curves {curves}: no run logged {curves} in its metrics.jsonl")
            written.append(
                figures.save_png(figures.learning_curves(lines, curves), out / "curves.png")
            )
            sections.append(f"![{curves} during training](curves.png)\n")
    elif plot:
        notes.append(f"the plot (report.png) needs matplotlib: {figures.INSTALL}")
    markdown = "\n".join(sections)
    (out / "report.md").write_text(markdown)
    written.insert(0, out / "report.md")
    print(markdown)
    for note in notes:
        print(f"metarun report: {note}", file=sys.stderr)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return markdown


# ---------------------------------------------------------------------------- episodes


def load_scores(run_dir: Path, steps: int | None) -> tuple[list[float], str, dict]:
    """The run's per-episode test scores (after ``steps`` adaptation steps if given), its
    metric and its protocol."""
    path = run_dir / "test_scores.json"
    if not path.exists():
        raise ReportError(
            f"{path} does not exist: the run has not finished its test, or finished before "
            f"metarun wrote per-episode scores; `metarun test={run_dir}` tests it again "
            "into a new run folder, with the file."
        )
    scores = json.loads(path.read_text())
    protocol = with_episode_kind(json.loads((run_dir / "results.json").read_text())["protocol"])
    if steps is None:
        return scores["episodes"], scores["metric"], protocol
    after = scores.get("after_steps", {})
    if str(steps) not in after:
        raise ReportError(
            f"{run_dir} has no scores after {steps} adaptation steps; it has "
            f"{sorted(after, key=int) or 'none'} (eval.report_steps)"
        )
    return after[str(steps)], scores["metric"], protocol


def describe(name: str, scores: list[float], metric: str) -> str:
    """The mean ± 95% CI, the median and quartiles, and the worst episodes. Scores that are
    not finite (an MSE that diverged to inf or NaN) count as the worst; they are named, and
    the mean of the finite ones is given beside the (infinite) mean."""
    n = len(scores)
    lower_is_better = metric != "acc"
    worst_value = math.inf if lower_is_better else -math.inf
    ranked = [x if math.isfinite(x) else worst_value for x in scores]
    ordered = sorted(ranked)
    mean, ci95 = mean_ci95(scores)
    q = [ordered[min(n - 1, int(p * n))] for p in (0.25, 0.5, 0.75)]
    worst = sorted(range(n), key=lambda i: ranked[i], reverse=lower_is_better)[:5]
    lines = [
        f"{name}: {n} episodes, {metric} {mean:.4f} ± {ci95:.4f}",
        f"  quartiles {q[0]:.4f} / median {q[1]:.4f} / {q[2]:.4f}; "
        f"min {ordered[0]:.4g}, max {ordered[-1]:.4g}",
        "  worst episodes (index: score): " + ", ".join(f"{i}: {scores[i]:.4g}" for i in worst),
    ]
    diverged = [i for i, x in enumerate(scores) if not math.isfinite(x)]
    if diverged:
        finite = [x for x in scores if math.isfinite(x)]
        shown = ", ".join(map(str, diverged[:10])) + (", ..." if len(diverged) > 10 else "")
        lines.append(f"  {len(diverged)} episode(s) not finite (diverged): {shown}")
        if finite:
            m, c = mean_ci95(finite)
            lines.append(f"  mean of the {len(finite)} finite episodes: {metric} {m:.4f} ± {c:.4f}")
    elif lower_is_better and mean > 0:
        tail = max(1, n // 100)
        share = sum(scores[i] for i in worst[:tail]) / (mean * n)
        lines.append(f"  the worst {tail} episode(s) make up {100 * share:.1f}% of the mean")
    return "\n".join(lines)


def episodes(runs: list[Path], steps: int | None = None) -> str:
    """``metarun report --episodes RUN [RUN2]``: each run's per-episode spread and worst
    episodes; for two runs tested on the same episodes, the paired difference (second -
    first) with its 95% CI, much narrower than the two runs' own intervals."""
    loaded = [load_scores(run, steps) for run in runs]
    text = [describe(str(run), s, m) for run, (s, m, _) in zip(runs, loaded, strict=True)]
    if len(loaded) == 2:
        (a, metric_a, protocol_a), (b, metric_b, protocol_b) = loaded
        differ = [k for k in SAME_EPISODES if protocol_a.get(k) != protocol_b.get(k)]
        if metric_a != metric_b or len(a) != len(b) or differ:
            raise ReportError(
                "the two runs were not tested on the same episodes "
                f"(they differ in {differ or ['metric or number of episodes']}); a paired "
                "comparison needs the same dataset, split, eval episode shape, "
                "eval.episode_seed and eval.test_episodes"
            )
        pairs = list(zip(a, b, strict=True))
        diff, ci95 = mean_ci95([y - x for x, y in pairs])
        wins = sum((y < x) if metric_a != "acc" else (y > x) for x, y in pairs)
        text.append(
            f"paired, second - first: {metric_a} {diff:+.4f} ± {ci95:.4f} (95% CI over "
            f"{len(a)} episodes); the second run is better on {wins} of them"
        )
    return "\n".join(text)


# ---------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    """``metarun report ...`` (dispatched from :func:`metarun.cli.main`)."""
    parser = argparse.ArgumentParser(
        prog="metarun report",
        description="Compare finished runs: a table grouped over seeds (markdown, CSV, PNG), "
        "or per-episode test scores (--episodes).",
        epilog="Examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders and sweep folders")
    parser.add_argument("--out", type=Path, help="where to write (default: the folder given)")
    parser.add_argument(
        "--sort",
        metavar="METRIC",
        help="order by this value: val/acc, test/acc, val/mse, test/mse, time, tasks/s, "
        "continual/acc, continual/bwt, continual/forgetting, ... (best first)",
    )
    parser.add_argument(
        "--ignore",
        metavar="KEY",
        action="append",
        default=[],
        help="also group runs whose configs differ in this key (or under it), e.g. "
        "train.max_minutes; repeatable. Runs tested differently are still refused.",
    )
    parser.add_argument("--curves", metavar="TAG", help="also plot TAG (e.g. val/acc) per run")
    parser.add_argument("--no-plot", action="store_true", help="tables only")
    parser.add_argument(
        "--episodes",
        action="store_true",
        help="per-episode test scores of one run, or of two compared episode by episode",
    )
    parser.add_argument("--steps", type=int, help="--episodes: after this many adaptation steps")
    args = parser.parse_args(argv)
    try:
        if args.episodes:
            if len(args.runs) > 2:
                parser.error("--episodes takes one run folder, or two to compare")
            print(episodes(args.runs, args.steps))
            return 0
        if args.steps is not None:
            parser.error("--steps goes with --episodes")
        out = args.out or (
            args.runs[0] if len(args.runs) == 1 and args.runs[0].is_dir() else Path.cwd()
        )
        report(args.runs, out, args.sort, tuple(args.ignore), args.curves, not args.no_plot)
    except ReportError as err:
        print(f"metarun report: error: {err}", file=sys.stderr)
        return 2
    return 0
