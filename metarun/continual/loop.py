"""The stream: config -> scenario and method -> (meta-training) -> tasks in order ->
matrix of the scenario's metric (accuracy, or MSE for regression) -> results.
:func:`metarun.runner.run` hands over here when a scenario is set; the run folder,
``metrics.jsonl``, TensorBoard, checkpoints, Ctrl-C and resume work as in meta-training.
Read :func:`run_stream` top to bottom for the loop.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

import metarun
from metarun.checkpoint import LAST
from metarun.continual.methods import ContinualLearner, masked_logits
from metarun.continual.metrics import heatmap, summarize
from metarun.continual.scenarios import Scenario, ScenarioError, draw
from metarun.data.files import atomic_torch_save
from metarun.metrics import RunLogger

log = logging.getLogger("metarun")

METHODS = "naive, joint, er, ewc, oml, lamaml"
SCENARIOS = "split_mnist, split_mnist_task_il, permuted_mnist, omniglot_continual, sinusoid_stream"


def is_continual_method(algo_cfg: DictConfig) -> bool:
    """Whether ``algo=`` names a continual learner (as opposed to a meta-learner)."""
    target = get_class(algo_cfg._target_)
    return isinstance(target, type) and issubclass(target, ContinualLearner)


def wants_stream(cfg: DictConfig) -> bool:
    """Whether this run is a task stream; a scenario with a meta-learning algorithm, or a
    continual method without a scenario, is refused with the fix in the message."""
    has_scenario = cfg.get("scenario") is not None
    continual = is_continual_method(cfg.algo)
    name = cfg.algo._target_.rsplit(".", 1)[-1]
    if has_scenario and not continual:
        raise ScenarioError(
            f"a scenario (a task stream) was given with the meta-learning algorithm {name}, "
            f"which cannot learn one. Use a continual method (algo=one of {METHODS}), or "
            f"drop scenario= to meta-train {name}."
        )
    if continual and not has_scenario:
        raise ScenarioError(
            f"algo {name} is a continual-learning method and needs a task stream: add "
            f"scenario=one of {SCENARIOS} (or experiment=split_mnist_class_il_er, ...), or "
            f"pick a meta-learning algorithm (maml, fomaml, protonet)."
        )
    return has_scenario


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
    method: torch.nn.Module, scenario: Scenario, after: int, task: int, device: torch.device
) -> float:
    """Accuracy on ``task``'s test examples with the outputs in play after training on tasks
    ``0..after``; 0 when no output is in play yet (class-incremental, before any task).
    For a regression stream, the mean squared error on them instead."""
    t = scenario.tasks[task]
    if scenario.task.outputs is not None:  # regression: the mean of the squared errors
        method.eval()
        total = 0.0
        for idx in torch.arange(t.size("test")).split(1000):
            x, y = t.inputs("test", idx)
            error = method(x.to(device)).cpu() - y
            total += float(error.double().pow(2).mean(1).sum())
        return total / t.size("test")
    classes = scenario.eval_classes(after, task)
    if classes.numel() == 0:
        return 0.0
    method.eval()
    correct = 0
    for idx in torch.arange(t.size("test")).split(1000):
        x, y = t.inputs("test", idx)
        logits = masked_logits(method(x.to(device)), classes)
        correct += int((logits.argmax(1).cpu() == y).sum())
    return correct / t.size("test")


def run_stream(
    cfg: DictConfig,
    run_dir: Path | str,
    started_at: float | None = None,
    resume_from: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Learns ``cfg.scenario``'s tasks in order with ``cfg.algo``; writes the matrix of the
    scenario's metric (accuracy, or MSE for regression) and its summaries to
    ``results.json``; returns them.

    Args:
        cfg: the composed config, with ``scenario`` set.
        run_dir: the run folder.
        started_at: ``time.perf_counter()`` at process start.
        resume_from: a loaded ``last.pt`` of this run folder, to continue from.

    Returns:
        ``{"continual/acc", "continual/bwt", "continual/fwt", "continual/forgetting"}``
        (NaN where undefined) and ``val/acc`` = NaN (a stream has no validation split);
        ``continual/mse`` and ``val/mse`` instead of the ``acc`` keys for regression.
    """
    from metarun.runner import RunInterrupted, _StopFlag

    started_at = started_at or time.perf_counter()
    wants_stream(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    hardware = instantiate(cfg.hardware)
    device = hardware.device
    torch.manual_seed(cfg.seed)
    scenario: Scenario = instantiate(cfg.scenario)
    backbone = instantiate(cfg.model)(input_shape=scenario.input_shape)
    method: ContinualLearner = instantiate(cfg.algo)(
        backbone=backbone,
        n_classes=scenario.n_classes,
        input_shape=scenario.input_shape,
        seed=cfg.seed,
        task=scenario.task,
    ).to(device)
    m = scenario.task.metric  # what R holds: "acc", or "mse" for a regression stream
    T = len(scenario.tasks)
    sizes = [
        sum(scenario.tasks[k].size("train") for k in method.training_tasks(i)) for i in range(T)
    ]
    plan = [scenario.epochs * math.ceil(n / scenario.batch_size) for n in sizes]
    total = method.meta_iterations + sum(plan)

    state = StreamState()
    if resume_from is not None:
        method.load_state_dict(resume_from["method"])
        state = StreamState(**resume_from["stream"])
        torch.set_rng_state(resume_from["rng"]["torch"])
    else:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    def save() -> None:
        atomic_torch_save(
            {
                "method": method.state_dict(),
                "stream": asdict(state),
                "iteration": state.iteration,
                "rng": {"torch": torch.get_rng_state()},
                "config": config,
            },
            run_dir / "checkpoints" / LAST,
        )

    logger = RunLogger(run_dir, total, state.iteration, cfg.log_every, cfg.get("logger"))
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
    try:
        with logger.console(), _StopFlag() as stop:
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
                method.pretrain(scenario.meta_train, state.meta_iteration, after_meta_step)
                state.train_seconds += time.perf_counter() - tic
                if stop.requested:
                    raise RunInterrupted(run_dir, state.iteration)
                save()
            if state.initial is None:  # b[j]: before any update on the stream
                state.initial = [score(method, scenario, j - 1, j, device) for j in range(T)]
            # 2. The stream: tasks in order, each scored on every task afterwards.
            while state.task < T:
                i = state.task
                learn_from = [scenario.tasks[k] for k in method.training_tasks(i)]
                classes = scenario.train_classes(i).to(device)
                while state.step < plan[i] and not stop.requested:
                    tic = time.perf_counter()
                    idx = batch_indices(cfg.seed, i, state.step, sizes[i], scenario.batch_size)
                    x, y = draw(learn_from, "train", idx)
                    loss, metric = method.observe(x.to(device), y.to(device), classes)
                    state.step += 1
                    state.iteration += 1
                    state.train_seconds += time.perf_counter() - tic
                    logger.log(state.iteration, {"train/loss": loss, f"train/{m}": metric})
                    logger.progress(state.iteration, loss, metric, 1, m)
                    if state.step % cfg.checkpoint_every == 0 or stop.requested:
                        save()
                if stop.requested:
                    raise RunInterrupted(run_dir, state.iteration)
                method.end_task(_task_sampler(scenario, i, cfg.seed), classes)
                row = [score(method, scenario, i, j, device) for j in range(T)]
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
            "protocol": _protocol(cfg, scenario, method),
            "training": {
                "updates": state.iteration,
                "meta_iterations": state.meta_iteration,
                "seconds": round(state.train_seconds, 1),
                "startup_seconds": None if resume_from else round(startup_s, 2),
                "hardware": hardware.describe(),
                "cpu": platform.processor() or platform.machine(),
            },
            "versions": {
                "metarun": metarun.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "config": config,
        }
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return {f"val/{m}": float("nan"), **summary}
    finally:
        logger.close()


def _task_sampler(scenario: Scenario, task: int, seed: int):
    """``sample(n)``: ``n`` training examples of ``task`` (all of them if it has fewer),
    a draw seeded by ``(seed, task)``, for methods that summarise a task (EWC)."""

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = scenario.tasks[task]
        g = torch.Generator().manual_seed(seed * 7919 + task)
        idx = torch.randperm(t.size("train"), generator=g)[:n]
        return t.inputs("train", idx)

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


def _protocol(cfg: DictConfig, scenario: Scenario, method: ContinualLearner) -> dict[str, Any]:
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
