"""The meta-learning recipe: config -> objects -> meta-training -> validation -> test ->
results.

``run(cfg, run_dir)`` is the whole job; read :func:`train` top to bottom for the loop.
``retest`` (``metarun test=RUN``) tests a trained run again, with :func:`test_and_report`
as the run's own test does. The run folder, its lock, the stop signals and the results'
blocks come from :mod:`metarun.run_control`; the sibling recipe for task streams is
:mod:`metarun.recipes.continual`, and neither imports the other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metarun import checkpoint, trained
from metarun.checkpoint import BEST, LAST
from metarun.checks import check_meta_learning, task_of_dataset
from metarun.data.episodes import Episode, EpisodeSampler
from metarun.distributed import DataParallel
from metarun.errors import ConfigError, NonFiniteError, RunInterrupted
from metarun.evaluation import (
    EvalResult,
    EvaluationStopped,
    episode_sampler,
    evaluate,
    fixed_episodes,
)
from metarun.hparams import log_run
from metarun.metrics import NullLogger, RunLogger
from metarun.recipes.resume import resume
from metarun.run_control import (
    RunFolder,
    StopFlag,
    check_finite,
    last_good_checkpoint,
    machine,
    versions,
)
from metarun.tasks import TaskKind

log = logging.getLogger("metarun")

RECIPE = "meta_learning"
RESUME_KEYS = (
    "train.meta_lr",
    "train.min_lr",
    "train.grad_clip",
    "train.iterations",
    "train.max_minutes",
    "algo.fast_lr",
    "hardware",
    "log_every",
    "checkpoint_every",
    "data_dir",
    "cache_dir",
)
"""What ``metarun resume=RUN key=value`` may change: the optimisation (to get past a NaN),
the budget, the hardware and the data folders; the model, the algorithm's structure and the
episodes stay as they were."""


@dataclass
class TrainState:
    """What the training loop needs to continue exactly where it stopped."""

    iteration: int = 0
    best_val_acc: float = -math.inf  # the best validation score (negated MSE for regression)
    best_iteration: int = -1
    train_seconds: float = 0.0
    budget_reached: bool = False  # training ended at train.max_minutes


def run(
    cfg: DictConfig,
    run_dir: Path | str,
    started_at: float | None = None,
    resume_keys: Sequence[str] = (),
) -> dict[str, float]:
    """Meta-trains, validates and tests one configuration; returns the summary metrics.

    Args:
        cfg: the composed config (``configs/config.yaml``). With ``cfg.resume`` set, the run
            in that folder continues from its ``last.pt`` with the config saved there,
            changed only by ``resume_keys``.
        run_dir: where a new run writes (Hydra's output folder); unused when resuming.
        started_at: ``time.perf_counter()`` at process start, to report start-up time.
        resume_keys: keys of ``cfg`` to take over when resuming (among :data:`RESUME_KEYS`).

    Returns:
        ``{"val/acc": best validation accuracy, "test/acc": ..., "test/ci95": ...}``
        (``mse`` for regression); sweepers optimise ``val/acc``, never the test accuracy.
    """
    started_at = started_at or time.perf_counter()
    resuming = bool(cfg.get("resume"))
    run_dir = Path(cfg.resume if resuming else run_dir).expanduser().resolve()
    is_main = int(os.environ.get("RANK", "0")) == 0
    folder = RunFolder(run_dir, resume=resuming) if is_main else None  # one live owner
    try:
        saved, changes = None, {}
        if resuming:
            cfg, saved, changes = resume(cfg, run_dir, resume_keys, RESUME_KEYS)
        check_meta_learning(cfg)  # every option, before any data is loaded
        hardware = instantiate(cfg.hardware)
        parallel = DataParallel(hardware.device)  # one process unless started by torchrun
        run_dir = Path(parallel.broadcast(str(run_dir)))  # rank 0's folder for every process
        try:
            return _train_and_test(
                cfg, run_dir, folder, hardware, parallel, saved, changes, started_at
            )
        finally:
            parallel.close()
    finally:
        if folder is not None:
            folder.close()


def _train_and_test(
    cfg: DictConfig,
    run_dir: Path,
    folder: RunFolder | None,
    hardware: Any,
    parallel: DataParallel,
    saved: dict | None,
    changes: dict,
    started_at: float,
) -> dict[str, float]:
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.manual_seed(cfg.seed)
    dataset, pools, task, algo = build(cfg, hardware)
    t, e = cfg.train, cfg.eval
    train_sampler = episode_sampler(
        pools["train"], t.ways, t.shots, t.query_shots, cfg.seed, *_train_kind(t)
    )
    optimizer = meta_optimizer(algo, t)
    scheduler = lr_scheduler(optimizer, t)
    state, resumes = TrainState(), []
    if saved is not None:
        state, resumes = restore(saved, algo, optimizer, scheduler, hardware.scaler, train_sampler)
        set_meta_lr(optimizer, scheduler, t.meta_lr)
        if changes:
            resumes.append({"iteration": state.iteration, "overrides": changes})
    if folder is not None and (saved is None or changes):
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if folder is not None and hasattr(dataset, "write_split"):  # the user's data: its split
        dataset.write_split(run_dir / "split")
    parallel.copy_from_main(algo)

    def save(name: str) -> None:
        check_finite(algo, type(algo).__name__, state.iteration, run_dir)
        logger.flush()  # every metric line up to this checkpoint is on disk before it
        checkpoint.save(
            run_dir / "checkpoints" / name,
            recipe=RECIPE,
            iteration=state.iteration,
            config=config,
            input_shape=dataset.image_shape,
            task=task.name,
            algo=algo.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            grad_scaler=hardware.scaler.state_dict(),
            train=asdict(state),
            train_sampler=train_sampler.get_state(),
            resumes=resumes,
        )

    def validate() -> EvalResult:
        sampler = fixed_episodes(
            pools["val"], e.ways, e.shots, e.query_shots, e.episode_seed, _eval_kind(e)
        )
        with logger.evaluation("val", e.val_episodes) as step:
            return evaluate(
                algo, sampler, e.val_episodes, hardware, task.score, task.metric, on_episode=step
            )

    logger = (RunLogger if parallel.is_main else NullLogger)(
        run_dir, t.iterations, state.iteration, cfg.log_every, loggers=cfg.get("logger")
    )
    try:
        log.info(
            "%s on %s (%s split): %s/%s/%s train/val/test classes, %s, run folder %s",
            type(algo).__name__,
            type(dataset).__name__,
            cfg.dataset.get("split", "-"),
            pools["train"].n_classes,
            pools["val"].n_classes,
            pools["test"].n_classes,
            hardware.describe(),
            run_dir,
        )
        with logger.console(), StopFlag() as stop:
            startup_s = time.perf_counter() - started_at
            train(
                algo,
                optimizer,
                scheduler,
                hardware,
                train_sampler,
                state,
                logger,
                stop,
                validate,
                save,
                run_dir,
                t,
                val_every=e.val_every,
                checkpoint_every=cfg.checkpoint_every,
                task=task,
                parallel=parallel,
            )
            logger.end_training()  # the training bar's rate is training's alone
            if stop.requested:
                raise stop.interrupted(run_dir, state.iteration)
            if not parallel.is_main:  # rank 0 validates, tests and writes the results
                return {}
            if (run_dir / "checkpoints" / BEST).exists():
                algo.load_state_dict(checkpoint.load(run_dir / "checkpoints" / BEST)["algo"])
            try:
                test, test_block = test_and_report(
                    algo, dataset, pools, task, e, hardware, logger, state.iteration, run_dir,
                    should_stop=lambda: stop.requested,
                )  # fmt: skip
            except EvaluationStopped:
                raise stop.interrupted(run_dir, state.iteration, during="test") from None
        m = task.metric
        best_val = state.best_val_acc if task.higher_is_better else -state.best_val_acc
        summary = {
            f"val/{m}": best_val if state.best_iteration >= 0 else float("nan"),
            f"test/{m}": test.mean,
            "test/ci95": test.ci95,
        }
        if state.best_iteration >= 0:  # the validation score best.pt was kept for
            logger.log(state.iteration, {f"val/best_{m}": best_val})
        log_run(logger, config, run_dir, (f"val/{m}", f"val/best_{m}", f"test/{m}", "test/ci95"))
        results = {
            "test": test_block,
            "val": {f"best_{m}": summary[f"val/{m}"], "best_iteration": state.best_iteration},
            "protocol": protocol(cfg, pools, algo),
            "training": {
                "iterations": state.iteration,
                "ended_by_time_budget": state.budget_reached,
                "seconds": round(state.train_seconds, 1),
                "tasks_per_s": round(
                    state.iteration * t.meta_batch_size / max(state.train_seconds, 1e-9), 2
                ),
                "startup_seconds": None if saved else round(startup_s, 2),
                **machine(hardware),
            },
            **({"resumes": resumes} if resumes else {}),
            "versions": versions(),
            "config": config,
        }
        if folder is not None:
            folder.write_json("results.json", results)
        return summary
    finally:
        logger.close()


def build(cfg: DictConfig, hardware: Any) -> tuple[Any, dict, TaskKind, torch.nn.Module]:
    """The config's dataset, its train/val/test pools, the task kind and the algorithm (with
    its backbone), on ``hardware``. Fails at once if the evaluation episodes are impossible."""
    dataset = instantiate(cfg.dataset)
    pools = {split: dataset.pool(split) for split in ("train", "val", "test")}
    task = task_of_dataset(cfg.dataset)
    e = cfg.eval
    for split in ("val", "test"):
        fixed_episodes(pools[split], e.ways, e.shots, e.query_shots, e.episode_seed, _eval_kind(e))
    algo = trained.build_learner(cfg, hardware, dataset.image_shape, task)
    return dataset, pools, task, algo


def restore(
    ckpt: dict[str, Any],
    algo: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    sampler: Any,
) -> tuple[TrainState, list]:
    """Puts a ``last.pt`` back in place, RNG states included, so training continues exactly
    as if it had not stopped; returns the loop's state and the run's earlier resumes."""
    algo.load_state_dict(ckpt["algo"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["grad_scaler"])
    checkpoint.restore_rng(ckpt["rng"])
    if "train" in ckpt:
        state = TrainState(**ckpt["train"])
        sampler.set_state(ckpt["train_sampler"])
    else:  # format 1 (before issue 17)
        state = TrainState(
            ckpt["iteration"], ckpt["best_val_acc"], ckpt["best_iteration"], ckpt["train_seconds"]
        )
        sampler.set_state(ckpt["rng"]["train_sampler"])
    return state, list(ckpt.get("resumes", []))


def set_meta_lr(optimizer: torch.optim.Optimizer, scheduler: Any, meta_lr: float) -> None:
    """Gives a restored optimiser the configured ``train.meta_lr`` (a resume may lower it):
    the current rate and the schedule's base rate are scaled by the same factor."""
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        if base != meta_lr and base > 0:
            group["lr"] *= meta_lr / base
            if "initial_lr" in group:
                group["initial_lr"] = meta_lr
    if scheduler is not None:
        scheduler.base_lrs = [meta_lr for _ in scheduler.base_lrs]


def train(
    algo: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    hardware: Any,
    sampler: EpisodeSampler,
    state: TrainState,
    logger: RunLogger,
    stop: StopFlag,
    validate: Callable[[], EvalResult],
    save: Callable[[str], None],
    run_dir: Path,
    t: DictConfig,
    val_every: int,
    checkpoint_every: int,
    task: TaskKind,
    parallel: DataParallel,
) -> None:
    """The meta-training loop: meta-batch -> adaptation and query loss per task ->
    meta-update -> logging -> validation -> checkpoint. Updates ``state`` in place.

    ``t`` is the ``train`` config (``meta_batch_size``, ``iterations``, ``max_minutes``,
    ``grad_clip``). ``task`` names the metric (``train/acc`` or ``train/mse``) and its
    direction; under ``torchrun``, ``parallel`` splits each meta-batch across the processes.
    With ``t.max_minutes``, training ends (as if at the last iteration) once that much time
    has been spent in training steps; ``state.budget_reached`` records it. With
    ``t.grad_clip``, the meta-gradient's norm is clipped to it before each update (and
    logged). A non-finite loss stops before the update; non-finite weights or statistics
    stop before they are saved. With ``t.iterations=0`` (an algorithm that is not trained,
    ``algo=ensemble``) it validates once (if ``val_every``) and saves ``last.pt``."""
    if t.iterations == 0:  # an algorithm that is not trained (algo=ensemble)
        if parallel.is_main:
            if val_every:  # validated once, so runs without training compare on validation
                val = validate()
                logger.log(0, {f"val/{task.metric}": val.mean, "val/ci95": val.ci95})
                log.info("validation %s", val)
                state.best_val_acc = val.mean if task.higher_is_better else -val.mean
                state.best_iteration = 0
            save(LAST)  # the checkpoint that test= and metarun-lake read
        return
    max_seconds = t.max_minutes * 60 if t.max_minutes else None
    algo.train()
    while state.iteration < t.iterations and not state.budget_reached:
        tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=hardware.device)
        acc_sum = torch.zeros((), device=hardware.device)
        meta_batch = [sampler.sample() for _ in range(t.meta_batch_size)]  # same on every rank
        for episode in task_batches(algo, parallel.share(meta_batch)):
            episode = episode.to(hardware.device, hardware.memory_format)
            with hardware.autocast():
                loss, acc = algo.meta_loss(episode)  # inner loop + query loss
            hardware.scaler.scale(loss * episode.tasks / t.meta_batch_size).backward()
            loss_sum += loss.detach() * episode.tasks
            acc_sum += acc.detach() * episode.tasks
        parallel.sum_gradients(algo)  # the whole meta-batch's gradient on every rank
        # One all-reduce: the meta-batch's loss and metric, and whether any rank must stop.
        stop_votes = torch.tensor(float(stop.requested), device=hardware.device)
        # Rank 0's clock alone decides: the others' would count its validation pauses.
        spent = state.train_seconds + time.perf_counter() - tic
        over_budget = torch.tensor(
            float(parallel.is_main and bool(max_seconds) and spent >= max_seconds)
        )
        loss_sum, acc_sum, stop_votes, over_budget = parallel.sum(
            loss_sum, acc_sum, stop_votes, over_budget.to(hardware.device)
        )
        mean_loss = loss_sum.item() / t.meta_batch_size
        if not math.isfinite(mean_loss):
            raise NonFiniteError(
                f"the meta-training loss is {mean_loss} at iteration {state.iteration + 1}; "
                f"no update was applied. {last_good_checkpoint(run_dir)} Lower train.meta_lr "
                f"or the inner learning rate (algo.fast_lr), set train.grad_clip, or try "
                f"hardware.amp=off; `metarun resume=RUN train.meta_lr=...` continues from "
                f"the last checkpoint with a new rate."
            )
        lr = optimizer.param_groups[0]["lr"]  # the meta learning rate of this update
        scalars = {}
        if t.grad_clip:
            hardware.scaler.unscale_(optimizer)  # clip the true gradient, not a scaled one
            norm = torch.nn.utils.clip_grad_norm_(algo.parameters(), t.grad_clip)
            scalars["train/grad_norm"] = norm.item()  # before clipping
        hardware.scaler.step(optimizer)
        hardware.scaler.update()
        if scheduler is not None:
            scheduler.step()
        parallel.average_buffers(algo)
        state.iteration += 1
        state.train_seconds += time.perf_counter() - tic
        check_finite(algo, type(algo).__name__, state.iteration, run_dir)

        mean_acc = acc_sum.item() / t.meta_batch_size
        logger.log(
            state.iteration,
            {"train/loss": mean_loss, f"train/{task.metric}": mean_acc, "train/lr": lr, **scalars},
        )
        logger.progress(state.iteration, mean_loss, mean_acc, t.meta_batch_size, task.metric)
        stopping = stop_votes.item() > 0  # Ctrl-C or SIGTERM: every rank stops here
        # The time budget (train.max_minutes) is spent on rank 0: every rank ends here.
        state.budget_reached = over_budget.item() > 0
        last = state.iteration == t.iterations or state.budget_reached
        if stopping:
            stop.requested = True  # another rank's signal: this rank stops too
        if not parallel.is_main:  # validation and checkpoints: rank 0 only
            if stopping or last:
                break
            continue
        if val_every and (state.iteration % val_every == 0 or last):
            val = validate()
            logger.log(state.iteration, {f"val/{task.metric}": val.mean, "val/ci95": val.ci95})
            log.info("it %d: validation %s", state.iteration, val)
            # best_val_acc holds the best score, negated when lower is better (MSE).
            score = val.mean if task.higher_is_better else -val.mean
            if score > state.best_val_acc:
                state.best_val_acc, state.best_iteration = score, state.iteration
                save(BEST)
        if state.iteration % checkpoint_every == 0 or last or stopping:
            save(LAST)
        if stopping or state.budget_reached:
            break


def test_and_report(
    algo: torch.nn.Module,
    dataset: Any,
    pools: dict,
    task: TaskKind,
    e: DictConfig,
    hardware: Any,
    logger: RunLogger,
    iteration: int,
    run_dir: Path,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[EvalResult, dict[str, Any]]:
    """Tests ``algo`` on the fixed test episodes of ``e`` (``eval``), and again after each of
    ``e.report_steps``; logs the numbers, writes each episode's score to
    ``test_scores.json`` and the dataset's figures (adapted sinusoid curves) to the logger.
    Returns the test result and the ``test`` entry of ``results.json``. Nothing is logged
    or written until every evaluation is done, so a test stopped by ``should_stop``
    (:class:`~metarun.evaluation.EvaluationStopped`) leaves no partial record."""
    m = task.metric  # "acc", or "mse" for regression

    def episodes() -> EpisodeSampler:  # the same episodes, in the same order, every time
        kind = _eval_kind(e)
        return fixed_episodes(pools["test"], e.ways, e.shots, e.query_shots, e.episode_seed, kind)

    def run_test(steps: int | None = None) -> EvalResult:
        name = "test" if steps is None else f"test ({steps} steps)"
        with logger.evaluation(name, e.test_episodes) as step:
            return evaluate(
                algo, episodes(), e.test_episodes, hardware, task.score, m, steps, should_stop,
                on_episode=step, views=e.get("test_views", 0),
            )  # fmt: skip

    test = run_test()
    after = {steps: run_test(steps) for steps in e.report_steps}
    log.info("test %s", test)
    logger.log(iteration, {f"test/{m}": test.mean, "test/ci95": test.ci95})
    if test.extra:  # per-episode metrics of the algorithm (MANN: accuracy by instance)
        log.info("test %s", {k: round(v["mean"], 4) for k, v in test.extra.items()})
        logger.log(iteration, {f"test/{k}": v["mean"] for k, v in test.extra.items()})
    after_steps = {}  # the same test episodes after other numbers of adaptation steps
    scores = {"metric": m, "episode_seed": e.episode_seed, "episodes": test.scores}
    for steps, result in after.items():
        log.info("test after %d adaptation steps: %s", steps, result)
        logger.log(iteration, {f"test/{m}_step{steps}": result.mean})
        after_steps[str(steps)] = {m: result.mean, "ci95": result.ci95}
        scores.setdefault("after_steps", {})[str(steps)] = result.scores
    # Each test episode's score, for paired comparisons and tails (metarun report --episodes).
    (run_dir / "test_scores.json").write_text(json.dumps(scores) + "\n")
    if hasattr(dataset, "figures"):  # e.g. a few adapted sinusoid curves
        for tag, image in dataset.figures(algo, episodes(), e.report_steps).items():
            logger.log_figure(f"test/{tag}", image, iteration)
    block = (
        {m: test.mean, "ci95": test.ci95, "episodes": test.episodes}
        | ({"after_steps": after_steps} if after_steps else {})
        | ({"episode_metrics": test.extra} if test.extra else {})
    )
    return test, block


# What ``test=`` may change in the tested run's config: how it is tested, on what, where.
RETEST_KEYS = ("eval", "hardware", "data_dir", "cache_dir")


def retest(cfg: DictConfig, overrides: list[str], run_dir: Path | str) -> dict[str, Any]:
    """Tests a trained run again, e.g. on more or other test episodes: ``metarun
    test=RUN_DIR eval.test_episodes=20000 eval.episode_seed=1``. ``RUN_DIR`` gives its
    ``best.pt`` (``last.pt`` if it has none); a ``.pt`` file gives that checkpoint. The
    run's saved config is used, changed only by the ``eval.*`` and ``hardware`` overrides
    in ``overrides`` (the command line's); the data folders are this machine's when set
    (``METARUN_DATA``, ``METARUN_CACHE``, ``data_dir=``), else the run's. Writes
    ``results.json`` and ``test_scores.json`` to ``run_dir`` (a new folder: the tested run
    is left as it is) and returns the ``test`` entry of ``results.json``.

    Raises:
        FileNotFoundError: no checkpoint at ``cfg.test``.
        ConfigError: an override of anything else (the model or the algorithm must stay as
            they were trained), or a task-stream run.
    """
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if not o.startswith("test=")]
    for key in keys:
        if key.split(".")[0] not in RETEST_KEYS:
            raise ConfigError(
                f"test= tests a trained run with its saved config, so {key} cannot be "
                f"changed; only eval.* (episodes, episode_seed, report_steps, ...), hardware "
                f"and data_dir/cache_dir can. Train a new run to change the rest."
            )
    saved = trained.read(Path(cfg.test))
    test_cfg = saved.config
    for key in keys:
        OmegaConf.update(test_cfg, key, OmegaConf.select(cfg, key), merge=False)
    for key, node in (("data_dir", "root"), ("cache_dir", "cache_dir")):
        if cfg[key] is None:  # not set here (METARUN_DATA, METARUN_CACHE): the run's own
            continue
        if test_cfg.dataset.get(node, "") == test_cfg.get(key):  # it came from ${data_dir}
            test_cfg.dataset[node] = cfg[key]
        test_cfg[key] = cfg[key]
    check_meta_learning(test_cfg)
    with RunFolder(run_dir) as folder:
        hardware = instantiate(test_cfg.hardware)
        dataset = instantiate(test_cfg.dataset)
        pools = {split: dataset.pool(split) for split in ("train", "val", "test")}
        e = test_cfg.eval
        fixed_episodes(pools["test"], e.ways, e.shots, e.query_shots, e.episode_seed, _eval_kind(e))
        algo = trained.restore(saved, hardware, test_cfg)
        if saved.iteration < test_cfg.train.iterations and not test_cfg.train.get("max_minutes"):
            log.warning(
                "%s stopped at iteration %d of %d",
                saved.path,
                saved.iteration,
                test_cfg.train.iterations,
            )
        log.info("testing %s (iteration %d), run folder %s", saved.path, saved.iteration, run_dir)
        OmegaConf.save(test_cfg, folder.path / "config.yaml", resolve=True)
        if hasattr(dataset, "write_split"):  # the user's data: its class split
            dataset.write_split(folder.path / "split")
        config = OmegaConf.to_container(test_cfg, resolve=True)
        logger = RunLogger(folder.path, saved.iteration, saved.iteration, test_cfg.log_every)
        try:
            with StopFlag() as stop:
                try:
                    _, block = test_and_report(
                        algo, dataset, pools, saved.task(), e, hardware, logger,
                        saved.iteration, folder.path, should_stop=lambda: stop.requested,
                    )  # fmt: skip
                except EvaluationStopped:
                    raise RunInterrupted(
                        folder.path,
                        saved.iteration,
                        stop.received,
                        message=f"interrupted during the test; no results were written. "
                        f"Run `metarun test={cfg.test}` again to test it.",
                    ) from None
            # A row in TensorBoard's HPARAMS under the tested run's options (algo, dataset).
            tested = saved.path.parent
            tested = tested.parent if tested.name == "checkpoints" else tested
            m = saved.task().metric
            log_run(logger, config, folder.path, (f"test/{m}", "test/ci95"), tested=tested)
        finally:
            logger.close()
        folder.write_json(
            "results.json",
            {
                "test": block,
                "tested": {"checkpoint": str(saved.path), "iteration": saved.iteration},
                "protocol": protocol(test_cfg, pools, algo),
                "versions": versions(),
                "config": config,
            },
        )
    return block


def meta_optimizer(algo: torch.nn.Module, t: DictConfig) -> torch.optim.Optimizer:
    """The meta-optimiser of ``train``: Adam, or plain SGD, at ``train.meta_lr``."""
    if getattr(t.optimizer, "value", t.optimizer) == "sgd":
        return torch.optim.SGD(algo.parameters(), lr=t.meta_lr)
    return torch.optim.Adam(algo.parameters(), lr=t.meta_lr)


def lr_scheduler(
    optimizer: torch.optim.Optimizer, t: DictConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The meta-learning-rate schedule of ``train``: step decay, cosine or linear annealing
    to ``train.min_lr`` over ``train.iterations``, or none."""
    schedule = getattr(t.lr_schedule, "value", t.lr_schedule)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t.iterations, t.min_lr)
    if schedule == "linear":
        end = t.min_lr / t.meta_lr
        return torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, end, total_iters=t.iterations)
    if t.lr_decay_every:
        return torch.optim.lr_scheduler.StepLR(optimizer, t.lr_decay_every, t.lr_decay_gamma)
    return None


def task_batches(algo: torch.nn.Module, episodes: list[Episode]) -> list[Episode]:
    """The episodes one at a time, or stacked into one batch (:meth:`Episode.stack`) for an
    algorithm that computes a whole meta-batch at once (``algo.stacks_tasks``: MAML's
    ``algo.engine=vmap``, MANN's batched sequences)."""
    if algo.stacks_tasks and episodes:
        return [Episode.stack(episodes)]
    return episodes


def protocol(cfg: DictConfig, pools: dict, algo: torch.nn.Module) -> dict[str, Any]:
    """Everything needed to compare this number with another: recorded next to it."""
    algo_cfg = OmegaConf.to_container(cfg.algo, resolve=True, enum_to_str=True)
    # Where each split's classes came from, for datasets that say (the user's own data).
    origins = {s: p.origin for s, p in pools.items() if getattr(p, "origin", "")}
    return {
        "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
        "split": cfg.dataset.get("split"),
        **({"split_from": origins} if origins else {}),
        "image_size": cfg.dataset.get("image_size"),
        "test_classes": pools["test"].n_classes,  # None for regression
        "train_episode": {k: cfg.train[k] for k in ("ways", "shots", "query_shots")}
        | dict(zip(("episodes", "augment"), _train_kind(cfg.train), strict=True)),
        "eval_episode": {k: cfg.eval[k] for k in ("ways", "shots", "query_shots")}
        | {"episodes": _eval_kind(cfg.eval)},
        "episode_seed": cfg.eval.episode_seed,
        "test_views": cfg.eval.get("test_views", 0),  # test-time distortions per episode
        "algorithm": type(algo).__name__,
        "algo": {k: v for k, v in algo_cfg.items() if not k.startswith("_")},
        "bn_mode": algo.bn_mode.value,
        "model": cfg.model._target_.rsplit(".", 1)[-1],
    }


def _option(section: DictConfig, key: str, default: str) -> str:
    """``section.key`` as a string (enum or str), ``default`` in a config saved before the
    option existed (``train.episodes``, ``train.augment``, ``eval.episodes``)."""
    value = section.get(key, default)
    return str(getattr(value, "value", value))


def _train_kind(t: DictConfig) -> tuple[str, str]:
    """``train``'s kind of episodes (``standard``, ``within_alphabet``) and augmentation
    (``none``, ``affine``)."""
    return _option(t, "episodes", "standard"), _option(t, "augment", "none")


def _eval_kind(e: DictConfig) -> str:
    """``eval``'s kind of episodes (``standard``, ``within_alphabet``)."""
    return _option(e, "episodes", "standard")
