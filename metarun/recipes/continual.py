"""The continual (lifelong) recipe: config -> scenario and method -> (meta-training) ->
tasks in order -> matrix of the scenario's metric (accuracy, or MSE for regression) ->
results.

The run folder and its lock, ``metrics.jsonl``, TensorBoard, checkpoints
(:mod:`metarun.checkpoint`), hardware (device, ``amp``, ``channels_last``, ``compile``),
Ctrl-C and resume work as in the sibling meta-learning recipe, on the same scaffold
(:mod:`metarun.run_control`). Read :func:`run` top to bottom for the loop.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metarun import checkpoint
from metarun.checkpoint import LAST
from metarun.checks import check_continual, target_class
from metarun.continual import meta_test
from metarun.continual.methods import ContinualLearner, masked_logits
from metarun.continual.metrics import summarize
from metarun.continual.scenarios import MetaTestBenchmark, Scenario, draw, omniglot_meta_continual
from metarun.errors import ConfigError
from metarun.hparams import log_run
from metarun.metrics import RunLogger
from metarun.recipes.resume import resume, resumed_config
from metarun.run_control import (
    RunFolder,
    StopFlag,
    check_finite,
    machine,
    versions,
)

log = logging.getLogger("metarun")

RECIPE = "continual"
RESUME_KEYS = (
    "algo.lr",
    "algo.fast_lr",
    "algo.meta_lr",
    "hardware",
    "log_every",
    "checkpoint_every",
    "data_dir",
    "cache_dir",
)
"""What ``metarun resume=RUN key=value`` may change in a stream: the learning rates, the
hardware and the data folders; the scenario, the model and the method stay."""

RETEST_KEYS = (
    "scenario.sizes",
    "scenario.draws",
    "scenario.selection_draws",
    "scenario.lr_grid",
    "scenario.seed",
    "algo.stream_outputs",
    "hardware",
    "log_every",
    "checkpoint_every",
    "data_dir",
    "cache_dir",
)
"""What ``metarun test=RUN key=value`` may change when it runs a meta-continual benchmark's
streams again from RUN's meta-trained state: which streams (sizes, draws, seed), the rates
to choose from, how the stream trains the head, the hardware and the data folders."""


@dataclass
class StreamState:
    """Where the stream is, so it continues exactly where it stopped."""

    iteration: int = 0  # updates so far, meta-training included (the metrics' x-axis)
    meta_iteration: int = 0  # meta-training steps done
    task: int = 0  # the task being learned
    step: int = 0  # updates done on that task
    initial: list[float] | None = None  # metric of each task before the stream (b)
    matrix: list[list[float]] = field(default_factory=list)  # rows done of R (acc or MSE)
    train_seconds: float = 0.0
    meta_seconds: float = 0.0  # of which meta-training (its budget: algo.meta_max_minutes)
    meta_budget_reached: bool = False
    streams: dict[str, dict[str, float]] = field(default_factory=dict)  # benchmark streams


def batch_indices(seed: int, task: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    """Training examples of update ``step`` on ``task``: batches of a fresh permutation of
    ``0..n-1`` per epoch, drawn from a generator seeded by ``(seed, task, epoch)``, so any
    step can be recomputed after a resume."""
    per_epoch = math.ceil(n / batch_size)
    epoch, b = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(((seed * 1_000_003 + task) * 1_000_003 + epoch) % 2**62)
    return torch.randperm(n, generator=g)[b * batch_size : (b + 1) * batch_size]


@torch.no_grad()
def score(
    method: torch.nn.Module, scenario: Scenario, after: int, task: int, hardware: Any
) -> float:
    """Accuracy on ``task``'s test examples with the outputs in play after training on tasks
    ``0..after``; 0 when no output is in play yet (class-incremental, before any task).
    For a regression stream, the mean squared error on them instead."""
    t = scenario.tasks[task]
    method.eval()
    if scenario.task.outputs is not None:  # regression: the mean of the squared errors
        total = 0.0
        for idx in torch.arange(t.size("test")).split(1000):
            x, y = t.inputs("test", idx)
            with hardware.autocast():
                predictions = method(_to(x, hardware))
            error = predictions.float().cpu() - y
            total += float(error.double().pow(2).mean(1).sum())
        return total / t.size("test")
    classes = scenario.eval_classes(after, task)
    if classes.numel() == 0:
        return 0.0
    correct = 0
    for idx in torch.arange(t.size("test")).split(1000):
        x, y = t.inputs("test", idx)
        with hardware.autocast():
            logits = masked_logits(method(_to(x, hardware)), classes)
        correct += int((logits.argmax(1).cpu() == y).sum())
    return correct / t.size("test")


def _to(x: torch.Tensor, hardware: Any) -> torch.Tensor:
    """Inputs on the run's device, in its memory format (NHWC with channels_last)."""
    x = x.to(hardware.device, non_blocking=True)
    return x.contiguous(memory_format=hardware.memory_format) if x.dim() == 4 else x


def run(
    cfg: DictConfig,
    run_dir: Path | str,
    started_at: float | None = None,
    resume_keys: Sequence[str] = (),
) -> dict[str, float]:
    """Learns ``cfg.scenario``'s tasks in order with ``cfg.algo``; writes the matrix of the
    scenario's metric (accuracy, or MSE for regression) and its summaries to
    ``results.json``; returns them.

    Args:
        cfg: the composed config, with ``scenario`` set. With ``cfg.resume``, the stream in
            that folder continues from its ``last.pt``, changed only by ``resume_keys``.
        run_dir: the run folder of a new run.
        started_at: ``time.perf_counter()`` at process start.
        resume_keys: keys of ``cfg`` to take over when resuming (among :data:`RESUME_KEYS`).

    Returns:
        ``{"continual/acc", "continual/bwt", "continual/fwt", "continual/forgetting"}``
        (NaN where undefined) and ``val/acc`` = NaN (a stream has no validation split);
        ``continual/mse`` and ``val/mse`` instead of the ``acc`` keys for regression.
    """
    started_at = started_at or time.perf_counter()
    resuming = bool(cfg.get("resume"))
    run_dir = Path(cfg.resume if resuming else run_dir).expanduser().resolve()
    if int(os.environ.get("RANK", "0")) > 0:
        raise ValueError("task streams run in one process: start them without torchrun")
    with RunFolder(run_dir, resume=resuming) as folder:
        saved, changes = None, {}
        if resuming:
            cfg, saved, changes = resume(cfg, run_dir, resume_keys, RESUME_KEYS)
        check_continual(cfg)  # every option, before any data is loaded
        return _stream(cfg, folder, saved, changes, started_at)


def retest(
    cfg: DictConfig, path: Path, saved: dict, overrides: Sequence[str], run_dir: Path | str
) -> dict[str, float]:
    """Runs the streams of a meta-continual benchmark run again from its meta-trained state,
    without meta-training: ``metarun test=RUN algo.stream_outputs=seen`` or ``metarun
    test=RUN 'scenario.sizes=[600]' scenario.draws=20``. The run's saved config is used,
    changed only by the :data:`RETEST_KEYS` in ``overrides`` (the command line's); the data
    folders are this machine's when set. Writes a new run folder ``run_dir`` (the tested run
    is left as it is; an interrupted test continues with ``resume=``) whose
    ``results.json`` names the tested checkpoint under ``tested``.

    Args:
        cfg: the command line's config (``cfg.test`` names the run).
        path: the tested run's ``last.pt``.
        saved: that checkpoint, loaded (:func:`metarun.checkpoint.load`).
        overrides: the command line's overrides.
        run_dir: the new run folder.

    Raises:
        ConfigError: an override outside :data:`RETEST_KEYS` or not an option of the run's
            method, a run that is not a benchmark run, or one whose meta-training has not
            finished.
    """
    started_at = time.perf_counter()
    tested = checkpoint.saved_config(saved, path)
    if target_class(tested.scenario) is not omniglot_meta_continual:
        raise ConfigError(
            f"{path} is a task stream, not a meta-continual benchmark run: its checkpoint "
            f"holds the learner after its stream, and its results.json has the stream's "
            f"evaluation. test= runs a benchmark's streams again (scenario="
            f"omniglot_meta_continual); to learn a stream again, start a new run."
        )
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if not o.startswith("test=")]
    keys += [k for k in ("data_dir", "cache_dir") if cfg[k] is not None and k not in keys]
    why = "test= runs a benchmark run's streams again from its meta-trained state"
    test_cfg, _ = resumed_config(cfg, saved, keys, RETEST_KEYS, path.parent.parent, why)
    for key in keys:
        if key.startswith(("scenario.", "algo.")) and OmegaConf.select(tested, key) is None:
            raise ConfigError(
                f"{key} is not an option of the tested run's {key.split('.')[0]} "
                f"({tested[key.split('.')[0]]._target_.rsplit('.', 1)[-1]})."
            )
    test_cfg.resume, test_cfg.test = None, str(path)
    check_continual(test_cfg)
    done = StreamState(**saved["stream"])
    meta_iterations = int(test_cfg.algo.get("meta_iterations", 0))
    if done.meta_iteration < meta_iterations and not done.meta_budget_reached:
        raise ConfigError(
            f"{path}'s meta-training stopped at step {done.meta_iteration} of "
            f"{meta_iterations}: finish it with `metarun resume={path.parent.parent}` "
            f"(its benchmark then runs), or test it after that."
        )
    start = StreamState(
        meta_iteration=done.meta_iteration,
        meta_seconds=done.meta_seconds,
        meta_budget_reached=done.meta_budget_reached,
    )
    fresh = {"method": saved["method"], "stream": asdict(start), "rng": saved["rng"]}
    tested_by = {"checkpoint": str(path), "meta_iterations": done.meta_iteration}
    run_dir = Path(run_dir).expanduser().resolve()
    log.info("testing %s (meta-training step %d), run folder %s", path, start.meta_iteration,
             run_dir)  # fmt: skip
    with RunFolder(run_dir) as folder:
        return _stream(test_cfg, folder, fresh, {}, started_at, tested=tested_by)


def _stream(
    cfg: DictConfig,
    folder: RunFolder,
    saved: dict | None,
    changes: dict,
    started_at: float,
    tested: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Learns ``cfg``'s stream (or benchmark) into ``folder``: from the start, from
    ``saved`` (a resumed run, with ``changes``), or, with ``tested`` (``metarun test=``),
    from another run's meta-trained state in ``saved``."""
    run_dir = folder.path
    resumed = saved is not None and tested is None
    if resumed:  # a test= run that was interrupted keeps naming what it tests
        tested = saved.get("tested")
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    hardware = instantiate(cfg.hardware)
    torch.manual_seed(cfg.seed)
    scenario: Scenario = instantiate(cfg.scenario)
    backbone = hardware.compile_backbone(instantiate(cfg.model)(input_shape=scenario.input_shape))
    method: ContinualLearner = instantiate(cfg.algo)(
        backbone=backbone,
        n_classes=scenario.n_classes,
        input_shape=scenario.input_shape,
        seed=cfg.seed,
        task=scenario.task,
    )
    method = hardware.prepare(method)
    m = scenario.task.metric  # what R holds: "acc", or "mse" for a regression stream
    benchmark = isinstance(scenario, MetaTestBenchmark)
    if benchmark:  # many short streams after one meta-training (continual/meta_test.py)
        T, plan, sizes = 0, [], []
        streams = len(scenario.sizes) * scenario.draws
        total = (0 if tested else method.meta_iterations) + meta_test.stream_count(method, scenario)
    else:
        T = len(scenario.tasks)
        sizes = [
            sum(scenario.tasks[k].size("train") for k in method.training_tasks(i)) for i in range(T)
        ]
        plan = [scenario.epochs * math.ceil(n / scenario.batch_size) for n in sizes]
        total = method.meta_iterations + sum(plan)

    state, resumes = StreamState(), []
    if saved is not None:
        method.load_state_dict(saved["method"])
        method.reset_learning_rates()  # the configured ones: a resume may have changed them
        state = StreamState(**saved["stream"])
        checkpoint.restore_rng(saved["rng"])
        resumes = list(saved.get("resumes", []))
        if changes:
            resumes.append({"iteration": state.iteration, "overrides": changes})
    if not resumed or changes:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    def save() -> None:
        check_finite(method, type(method).__name__, state.iteration, run_dir)
        logger.flush()  # every metric line up to this checkpoint is on disk before it
        checkpoint.save(
            run_dir / "checkpoints" / LAST,
            recipe=RECIPE,
            iteration=state.iteration,
            config=config,
            input_shape=scenario.input_shape,
            task=scenario.task.name,
            method=method.state_dict(),
            stream=asdict(state),
            resumes=resumes,
            **({"tested": tested} if tested else {}),
        )

    logger = RunLogger(run_dir, total, state.iteration, cfg.log_every, cfg.get("logger"))
    try:
        log.info(
            "%s on %s: %s, %s, run folder %s",
            type(method).__name__,
            scenario.info.get("benchmark", type(scenario).__name__),
            f"{streams} streams of N = {scenario.sizes}, {total} progress steps "
            f"(meta-training steps, then streams, rate selection included)"
            if benchmark
            else f"{T} tasks ({scenario.incremental}-incremental), {total} updates",
            hardware.describe(),
            run_dir,
        )
        with logger.console(), StopFlag() as stop:
            startup_s = time.perf_counter() - started_at
            # 1. Meta-training before the stream; nothing for the methods without one.
            _meta_train(method, scenario, state, logger, stop, save, hardware, cfg, m)
            if benchmark:  # 2'. the meta-continual benchmark's streams
                results = _benchmark(method, scenario, state, logger, stop, save, hardware)
                if results is None:
                    raise stop.interrupted(run_dir, state.iteration)
                return _benchmark_results(
                    folder, cfg, config, scenario, method, state, results, logger, hardware,
                    resumes, None if resumed else startup_s, tested,
                )  # fmt: skip
            if state.initial is None:  # b[j]: before any update on the stream
                method.begin_stream(None)
                state.initial = [score(method, scenario, j - 1, j, hardware) for j in range(T)]
            # 2. The stream: tasks in order, each scored on every task afterwards.
            while state.task < T:
                i = state.task
                learn_from = [scenario.tasks[k] for k in method.training_tasks(i)]
                classes = scenario.train_classes(i).to(hardware.device)
                while state.step < plan[i] and not stop.requested:
                    tic = time.perf_counter()
                    idx = batch_indices(cfg.seed, i, state.step, sizes[i], scenario.batch_size)
                    x, y = draw(learn_from, "train", idx)
                    with hardware.autocast():
                        loss, metric = method.observe(
                            _to(x, hardware), y.to(hardware.device), classes
                        )
                    state.step += 1
                    state.iteration += 1
                    state.train_seconds += time.perf_counter() - tic
                    values = {f"train/{m}": metric} | ({} if loss is None else {"train/loss": loss})
                    logger.log(state.iteration, values)
                    logger.progress(
                        state.iteration, math.nan if loss is None else loss, metric, 1, m
                    )
                    if state.step % cfg.checkpoint_every == 0 or stop.requested:
                        save()
                if stop.requested:
                    raise stop.interrupted(run_dir, state.iteration)
                with hardware.autocast():
                    method.end_task(_task_sampler(scenario, i, cfg.seed, hardware), classes)
                check_finite(method, type(method).__name__, state.iteration, run_dir)
                row = [score(method, scenario, i, j, hardware) for j in range(T)]
                state.matrix.append(row)
                state.task, state.step = i + 1, 0
                _log_row(logger, state, row, i, m, [t.name for t in scenario.tasks])
                save()
            logger.end_training()
        R, b = state.matrix, state.initial
        metrics = summarize(R, b, m)
        log.info("%s matrix (row i: after task i):\n%s", _NAMES[m], _format(R, m))
        log.info(
            "%s %.4f  BWT %s  FWT %s  forgetting %s",
            "ACC" if m == "acc" else "average MSE",
            metrics[m],
            *(
                f"{metrics[k]:.4f}" if metrics[k] is not None else "n/a"
                for k in ("bwt", "fwt", "forgetting")
            ),
        )
        summary = {f"continual/{k}": (float("nan") if v is None else v) for k, v in metrics.items()}
        logger.log(state.iteration, summary)
        log_run(logger, config, run_dir, tuple(summary))
        results = {
            "metric": m,
            "continual": metrics,
            "matrix": R,
            "initial": b,
            "stream": scenario.describe(),
            "protocol": protocol(cfg, scenario, method),
            "training": {
                "updates": state.iteration,
                "meta_iterations": state.meta_iteration,
                "seconds": round(state.train_seconds, 1),
                "startup_seconds": None if resumed else round(startup_s, 2),
                **machine(hardware),
            },
            **({"resumes": resumes} if resumes else {}),
            "versions": versions(),
            "config": config,
        }
        folder.write_json("results.json", results)
        return {f"val/{m}": float("nan"), **summary}
    finally:
        logger.close()


def _meta_train(
    method: ContinualLearner,
    scenario: Any,
    state: StreamState,
    logger: RunLogger,
    stop: StopFlag,
    save: Callable[[], None],
    hardware: Any,
    cfg: DictConfig,
    m: str,
) -> None:
    """Meta-training (resumable), within ``method.meta_max_minutes`` of training time."""
    if state.meta_iteration >= method.meta_iterations or state.meta_budget_reached:
        return
    budget = method.meta_max_minutes
    tic = time.perf_counter()
    spent_before = state.meta_seconds

    def after_meta_step(it: int, loss: float, metric: float) -> bool:
        state.meta_iteration = it
        state.iteration += 1
        state.meta_seconds = spent_before + time.perf_counter() - tic
        logger.log(state.iteration, {"meta/loss": loss, f"meta/{m}": metric})
        logger.progress(state.iteration, loss, metric, 1, m)
        state.meta_budget_reached = bool(budget) and state.meta_seconds >= 60 * budget
        if it % cfg.checkpoint_every == 0 or stop.requested:
            save()
        return stop.requested or state.meta_budget_reached

    method.autocast = hardware.autocast  # entered once per meta-training step (base.py)
    method.pretrain(scenario.meta_train, state.meta_iteration, after_meta_step)
    state.train_seconds += time.perf_counter() - tic
    if stop.requested:
        raise stop.interrupted(Path(logger.path).parent, state.iteration)
    if state.meta_budget_reached:
        log.info(
            "meta-training ended by its budget (algo.meta_max_minutes=%s) at step %d",
            budget,
            state.meta_iteration,
        )
    save()


def _benchmark(
    method: ContinualLearner,
    bench: MetaTestBenchmark,
    state: StreamState,
    logger: RunLogger,
    stop: StopFlag,
    save: Callable[[], None],
    hardware: Any,
) -> dict[str, Any] | None:
    """The meta-continual benchmark's streams (:func:`metarun.continual.meta_test.
    run_benchmark`); each finished stream is kept in ``state`` (a resumed run skips it) and
    a checkpoint written at most once a minute. ``None`` when a signal stopped it."""
    clock = {"last": time.perf_counter(), "saved": time.perf_counter()}

    def progress(key: str, result: dict[str, float]) -> bool:
        now = time.perf_counter()
        state.train_seconds += now - clock["last"]
        clock["last"] = now
        state.streams[key] = result
        state.iteration += 1
        phase = key.split("/")[0]
        logger.log(
            state.iteration,
            {f"{phase}/test_acc": result["test"], f"{phase}/train_acc": result["train"]},
        )
        logger.progress(state.iteration, float("nan"), result["test"], 1, "acc")
        if stop.requested or now - clock["saved"] > 60:
            save()
            clock["saved"] = now
        return stop.requested

    results = meta_test.run_benchmark(method, bench, hardware, state.streams, progress)
    return results


def _benchmark_results(
    folder: RunFolder,
    cfg: DictConfig,
    config: dict,
    bench: MetaTestBenchmark,
    method: ContinualLearner,
    state: StreamState,
    results: dict[str, Any],
    logger: RunLogger,
    hardware: Any,
    resumes: list,
    startup_s: float | None,
    tested: dict[str, Any] | None,
) -> dict[str, float]:
    """Logs and writes the benchmark's table (accuracy against N, with 95% CIs) and its
    figure; returns the summary metrics."""
    per_size = results["per_size"]
    summary: dict[str, float] = {}
    lines = ["| N | meta-test test | meta-test train | learning rate |", "|---|---|---|---|"]
    for n, entry in per_size.items():
        test, train, lr = entry["test"], entry["train"], entry["lr"] or "none"  # none: no rate
        summary[f"meta_test/test_acc_N{n}"] = test["mean"]
        summary[f"meta_test/train_acc_N{n}"] = train["mean"]
        lines.append(
            f"| {n} | {100 * test['mean']:.2f} ± {100 * (test['ci95'] or 0):.2f} | "
            f"{100 * train['mean']:.2f} ± {100 * (train['ci95'] or 0):.2f} | {lr} |"
        )
    table = "\n".join(lines)
    log.info(
        "meta-continual benchmark, %s (mean ± 95%% CI over draws):\n%s",
        type(method).__name__,
        table,
    )
    logger.end_training()
    logger.log(state.iteration, summary)
    log_run(logger, config, folder.path, tuple(summary))
    summary["val/acc"] = float("nan")  # for a sweeper: the benchmark has no validation split
    logger.log_text("meta_test/table", table, state.iteration)
    from metarun import figures

    if figures.warn_missing():
        series = {
            part: [(int(n), e[part]["mean"], e[part]["ci95"] or 0.0) for n, e in per_size.items()]
            for part in ("test", "train")
        }
        fig = figures.accuracy_vs_n(
            {f"meta-test {k}": v for k, v in series.items()},
            title=f"{type(method).__name__}: accuracy against the number of classes",
        )
        logger.log_figure("meta_test/accuracy_vs_n", fig, state.iteration)
    folder.write_json(
        "results.json",
        {
            "metric": "acc",
            "meta_test": per_size,
            "benchmark": bench.describe(),
            "protocol": {
                "scenario": bench.info.get("benchmark"),
                "method": type(method).__name__,
                "algo": {
                    k: v
                    for k, v in OmegaConf.to_container(cfg.algo, resolve=True).items()
                    if not k.startswith("_")
                },
                "model": cfg.model._target_.rsplit(".", 1)[-1],
                "seed": cfg.seed,
                "metrics": "accuracy among the N classes of a stream after learning it, on "
                "each class's other drawings (meta-test test) and on its training drawings "
                "(meta-test train); mean and 95% CI (Student's t) over the draws",
            },
            "training": {
                "meta_iterations": state.meta_iteration,
                "meta_seconds": round(state.meta_seconds, 1),
                "meta_ended_by_time_budget": state.meta_budget_reached,
                "seconds": round(state.train_seconds, 1),
                "startup_seconds": None if startup_s is None else round(startup_s, 2),
                **machine(hardware),
            },
            **({"tested": tested} if tested else {}),
            **({"resumes": resumes} if resumes else {}),
            "versions": versions(),
            "config": config,
        },
    )
    return summary


def _task_sampler(scenario: Scenario, task: int, seed: int, hardware: Any):
    """``sample(n)``: ``n`` training examples of ``task`` (all of them if it has fewer),
    a draw seeded by ``(seed, task)``, for methods that summarise a task (EWC)."""

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = scenario.tasks[task]
        g = torch.Generator().manual_seed(seed * 7919 + task)
        idx = torch.randperm(t.size("train"), generator=g)[:n]
        x, y = t.inputs("train", idx)
        return _to(x, hardware), y

    return sample


_NAMES = {"acc": "accuracy", "mse": "mse"}


def _log_row(
    logger: RunLogger,
    state: StreamState,
    row: list[float],
    i: int,
    m: str,
    labels: list[str],
) -> None:
    """After task ``i``: the mean metric ``m`` (``acc`` or ``mse``) over the tasks seen so
    far and over all tasks, each task's, and the matrix so far (tasks named by ``labels``)
    as a figure with its numbers (:func:`metarun.figures.accuracy_matrix`; skipped, with
    one warning, without matplotlib) and as a markdown table."""
    from metarun import figures

    values = {
        f"stream/{m}_seen": sum(row[: i + 1]) / (i + 1),
        f"stream/{m}_all": sum(row) / len(row),
        **{f"stream/task_{j:03d}": v for j, v in enumerate(row)},
    }
    logger.log(state.iteration, values)
    tag = f"stream/{_NAMES[m]}_matrix"
    if figures.warn_missing():
        figure = figures.accuracy_matrix(state.matrix, labels, m)
        logger.log_figure(tag, figure, state.iteration)
    table = figures.matrix_markdown(state.matrix, labels, m)
    logger.log_text(f"{tag}_table", table, state.iteration)
    log.info(
        "after task %d: %s on the tasks seen so far %.4f", i, _NAMES[m], values[f"stream/{m}_seen"]
    )


def _format(R: list[list[float]], m: str = "acc") -> str:
    if m == "acc":
        return "\n".join(" ".join(f"{100 * v:5.1f}" for v in row) for row in R)
    return "\n".join(" ".join(f"{v:7.3f}" for v in row) for row in R)


def protocol(cfg: DictConfig, scenario: Scenario, method: ContinualLearner) -> dict[str, Any]:
    algo_cfg = OmegaConf.to_container(cfg.algo, resolve=True, enum_to_str=True)
    return {
        "scenario": scenario.info.get("benchmark"),
        "incremental": scenario.incremental,
        "n_tasks": len(scenario.tasks),
        "epochs": scenario.epochs,
        "batch_size": scenario.batch_size,
        "method": type(method).__name__,
        "algo": {k: v for k, v in algo_cfg.items() if not k.startswith("_")},
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "seed": cfg.seed,
        "metrics": _METRICS_PROTOCOL[scenario.task.metric],
    }


_METRICS_PROTOCOL = {
    "acc": "R[i][j] = test accuracy on task j after training on task i; forgetting "
    "max-based (Chaudhry et al. 2018) from the row after learning j",
    "mse": "R[i][j] = test mean squared error on task j after training on task i; BWT and "
    "FWT signed so that positive is better (lower MSE); forgetting = R[T-1][j] minus the "
    "lowest MSE from the row after learning j (Chaudhry et al. 2018's max-based "
    "forgetting for an error), positive = worse",
}
