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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metarun import checkpoint
from metarun.checkpoint import LAST
from metarun.checks import check_continual
from metarun.continual.methods import ContinualLearner, masked_logits
from metarun.continual.metrics import heatmap, summarize
from metarun.continual.scenarios import Scenario, draw
from metarun.metrics import RunLogger
from metarun.recipes.resume import resume
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


def _stream(
    cfg: DictConfig,
    folder: RunFolder,
    saved: dict | None,
    changes: dict,
    started_at: float,
) -> dict[str, float]:
    run_dir = folder.path
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
    if saved is None or changes:
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
        )

    logger = RunLogger(run_dir, total, state.iteration, cfg.log_every, cfg.get("logger"))
    try:
        log.info(
            "%s on %s: %d tasks (%s-incremental), %d updates, %s, run folder %s",
            type(method).__name__,
            scenario.info.get("benchmark", type(scenario).__name__),
            T,
            scenario.incremental,
            total,
            hardware.describe(),
            run_dir,
        )
        with logger.console(), StopFlag() as stop:
            startup_s = time.perf_counter() - started_at
            # 1. Meta-training before the stream (OML); nothing for the other methods.
            if state.meta_iteration < method.meta_iterations:

                def after_meta_step(it: int, loss: float, metric: float) -> bool:
                    state.meta_iteration = it
                    state.iteration += 1
                    logger.log(state.iteration, {"meta/loss": loss, f"meta/{m}": metric})
                    logger.progress(state.iteration, loss, metric, 1, m)
                    if it % cfg.checkpoint_every == 0 or stop.requested:
                        save()
                    return stop.requested

                tic = time.perf_counter()
                with hardware.autocast():
                    method.pretrain(scenario.meta_train, state.meta_iteration, after_meta_step)
                state.train_seconds += time.perf_counter() - tic
                if stop.requested:
                    raise stop.interrupted(run_dir, state.iteration)
                save()
            if state.initial is None:  # b[j]: before any update on the stream
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
                    logger.log(state.iteration, {"train/loss": loss, f"train/{m}": metric})
                    logger.progress(state.iteration, loss, metric, 1, m)
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
                _log_row(logger, state, row, i, m)
                save()
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
                "startup_seconds": None if saved else round(startup_s, 2),
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


def _log_row(logger: RunLogger, state: StreamState, row: list[float], i: int, m: str) -> None:
    """After task ``i``: the mean metric ``m`` (``acc`` or ``mse``) over the tasks seen so
    far and over all tasks, each task's, and the matrix so far as a heatmap image (MSE
    drawn on [0, the largest MSE of the matrix and of the untrained model])."""
    values = {
        f"stream/{m}_seen": sum(row[: i + 1]) / (i + 1),
        f"stream/{m}_all": sum(row) / len(row),
        **{f"stream/task_{j:03d}": v for j, v in enumerate(row)},
    }
    logger.log(state.iteration, values)
    matrix = torch.tensor(state.matrix)
    if m == "acc":
        image = heatmap(matrix)
    else:
        worst = max(float(matrix.max()), max(state.initial or [0.0]), 1e-12)
        image = heatmap(matrix, higher_is_better=False, scale=worst)
    logger.tb.add_image(f"stream/{_NAMES[m]}_matrix", image, state.iteration)
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
