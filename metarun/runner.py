"""The run: config -> objects -> meta-training -> validation -> test -> results.

``run(cfg, run_dir)`` is the whole job; ``metarun.cli`` only composes the config and
hands over Hydra's output folder. Read :func:`train` top to bottom for the loop.
``retest`` (``metarun test=RUN``) tests a trained run again, with :func:`test_and_report`
as the run's own test does.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import metarun
from metarun import checkpoint
from metarun.algorithms.base import CLASSIFICATION, TaskKind
from metarun.checkpoint import BEST, LAST, TrainState
from metarun.data.episodes import Episode, EpisodeSampler
from metarun.distributed import DataParallel
from metarun.evaluation import EvalResult, episode_sampler, evaluate, fixed_episodes
from metarun.metrics import NullLogger, RunLogger

log = logging.getLogger("metarun")


class RunInterrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM stopped training; ``last.pt`` holds the progress."""

    def __init__(self, run_dir: Path, iteration: int):
        self.run_dir, self.iteration = run_dir, iteration
        super().__init__(
            f"interrupted at iteration {iteration}; the checkpoint "
            f"{run_dir / 'checkpoints' / LAST} is saved. Continue with:\n"
            f"  metarun resume={run_dir}"
        )


class NonFiniteLossError(RuntimeError):
    """The meta-training loss became NaN or infinite; no update was applied."""


class _StopFlag:
    """Turns the first SIGINT/SIGTERM/SIGUSR2 into a request to stop at the end of the
    current iteration (so the checkpoint is consistent); a second SIGINT interrupts at once.

    SIGUSR2 is what Slurm sends before a time limit or preemption (``--signal=USR2@90``;
    submitit does the same): once the checkpoint is written, a Python handler that was
    installed before (submitit's, which requeues the job) is called as if it had received
    the signal itself."""

    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name)
    )

    def __init__(self) -> None:
        self.requested = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        forward = self._previous.get(self.received)
        if self.received == getattr(signal, "SIGUSR2", None) and callable(forward):
            forward(self.received, None)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.received = self.received or signum
        log.warning(
            "stop requested (%s): saving a checkpoint after this iteration",
            signal.Signals(signum).name,
        )


def run(cfg: DictConfig, run_dir: Path | str, started_at: float | None = None) -> dict[str, float]:
    """Meta-trains, validates and tests one configuration; returns the summary metrics.

    Args:
        cfg: the composed config (``configs/config.yaml``). With ``cfg.resume`` set, the
            config saved in that run folder's ``last.pt`` is used instead and the run
            continues there.
        run_dir: where this run writes (Hydra's output folder).
        started_at: ``time.perf_counter()`` at process start, to report start-up time.

    Returns:
        ``{"val/acc": best validation accuracy, "test/acc": ..., "test/ci95": ...}``; the
        value sweepers optimise is ``val/acc`` (never the test accuracy).
    """
    started_at = started_at or time.perf_counter()
    resume_from = None
    if cfg.get("resume"):
        run_dir = Path(cfg.resume).expanduser().resolve()
        resume_from = checkpoint.load(run_dir / "checkpoints" / LAST)
        cfg = OmegaConf.create(resume_from["config"])
        log.info("resuming %s from iteration %d", run_dir, resume_from["iteration"])
    from metarun.continual.loop import run_stream, wants_stream

    if wants_stream(cfg):  # a task stream (scenario=...): lifelong learning
        return run_stream(cfg, run_dir, started_at, resume_from)
    check_eval_budget(cfg.eval)  # before any data is loaded
    hardware = instantiate(cfg.hardware)
    parallel = DataParallel(hardware.device)  # one process unless started by torchrun
    run_dir = Path(parallel.broadcast(str(run_dir)))  # rank 0's folder for every process
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)

    torch.manual_seed(cfg.seed)
    dataset, pools, task, algo = build(cfg, hardware)
    t, e = cfg.train, cfg.eval
    train_sampler = episode_sampler(
        pools["train"], t.ways, t.shots, t.query_shots, cfg.seed, *_train_kind(t)
    )
    optimizer = meta_optimizer(algo, t)
    scheduler = lr_scheduler(optimizer, t)
    state = TrainState()
    if resume_from is not None:
        state = checkpoint.restore(
            resume_from,
            algo=algo,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=hardware.scaler,
            sampler=train_sampler,
        )
    elif parallel.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    parallel.copy_from_main(algo)

    def save(name: str) -> None:
        checkpoint.save(
            run_dir / "checkpoints" / name,
            algo=algo,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=hardware.scaler,
            state=state,
            sampler_state=train_sampler.get_state(),
            config=config,
        )

    def validate() -> EvalResult:
        sampler = fixed_episodes(
            pools["val"], e.ways, e.shots, e.query_shots, e.episode_seed, _eval_kind(e)
        )
        return evaluate(algo, sampler, e.val_episodes, hardware, task.score, task.metric)

    logger = (RunLogger if parallel.is_main else NullLogger)(
        run_dir, t.iterations, state.iteration, cfg.log_every
    )
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
    try:
        with logger.console(), _StopFlag() as stop:
            startup_s = time.perf_counter() - started_at
            train(
                algo,
                optimizer,
                scheduler,
                hardware,
                train_sampler,
                t.meta_batch_size,
                t.iterations,
                state,
                logger,
                stop,
                validate,
                save,
                e.val_every,
                cfg.checkpoint_every,
                run_dir,
                task,
                parallel,
                t.max_minutes * 60 if t.max_minutes else None,
                t.grad_clip,
            )
        if state.iteration < t.iterations and not state.budget_reached:  # stopped by a signal
            raise RunInterrupted(run_dir, state.iteration)
        if t.iterations == 0 and parallel.is_main:  # nothing to train (algo=ensemble)
            if e.val_every:  # validated once, so runs without training compare on validation
                val = validate()
                log.info("validation %s", val)
                logger.log(0, {f"val/{task.metric}": val.mean, "val/ci95": val.ci95})
                best = val.mean if task.higher_is_better else -val.mean
                state.best_val_acc, state.best_iteration = best, 0
            save(LAST)  # the checkpoint that test= and metarun-lake read
        if not parallel.is_main:  # rank 0 validates, tests and writes the results
            return {}
        if (run_dir / "checkpoints" / BEST).exists():
            algo.load_state_dict(checkpoint.load(run_dir / "checkpoints" / BEST)["algo"])
        test, test_block = test_and_report(
            algo, dataset, pools, task, e, hardware, logger, state.iteration, run_dir
        )
        m = task.metric
        best_val = state.best_val_acc if task.higher_is_better else -state.best_val_acc
        summary = {
            f"val/{m}": best_val if state.best_iteration >= 0 else float("nan"),
            f"test/{m}": test.mean,
            "test/ci95": test.ci95,
        }
        hparams = _hparams(config)
        logger.tb.add_hparams(hparams, {f"hparam/test_{m}": test.mean}, run_name=".")
        results = {
            "test": test_block,
            "val": {f"best_{m}": summary[f"val/{m}"], "best_iteration": state.best_iteration},
            "protocol": _protocol(cfg, pools, algo),
            "training": {
                "iterations": state.iteration,
                "ended_by_time_budget": state.budget_reached,
                "seconds": round(state.train_seconds, 1),
                "tasks_per_s": round(
                    state.iteration * t.meta_batch_size / max(state.train_seconds, 1e-9), 2
                ),
                "startup_seconds": None if resume_from else round(startup_s, 2),
                "hardware": hardware.describe(),
                "cpu": platform.processor() or platform.machine(),
            },
            "versions": _versions(),
            "config": config,
        }
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return summary
    finally:
        logger.close()
        parallel.close()


def build(cfg: DictConfig, hardware: Any) -> tuple[Any, dict, TaskKind, torch.nn.Module]:
    """The config's dataset, its train/val/test pools, the task kind and the algorithm (with
    its backbone), on ``hardware``. Fails at once if the evaluation episodes are impossible."""
    dataset = instantiate(cfg.dataset)
    pools = {split: dataset.pool(split) for split in ("train", "val", "test")}
    # Classification unless the dataset says otherwise (sinusoids are regression).
    task: TaskKind = getattr(dataset, "task", CLASSIFICATION)
    e = cfg.eval
    for split in ("val", "test"):
        fixed_episodes(pools[split], e.ways, e.shots, e.query_shots, e.episode_seed, _eval_kind(e))
    backbone = hardware.compile_backbone(instantiate(cfg.model)(input_shape=dataset.image_shape))
    algo = hardware.prepare(instantiate(cfg.algo)(backbone=backbone, task=task))
    return dataset, pools, task, algo


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
        ValueError: an override of anything else (the model or the algorithm must stay as
            they were trained), or a task-stream run.
    """
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if not o.startswith("test=")]
    for key in keys:
        if key.split(".")[0] not in RETEST_KEYS:
            raise ValueError(
                f"test= tests a trained run with its saved config, so {key} cannot be "
                f"changed; only eval.* (episodes, episode_seed, report_steps, ...), hardware "
                f"and data_dir/cache_dir can. Train a new run to change the rest."
            )
    path = Path(cfg.test).expanduser().resolve()
    if path.is_dir():
        found = [path / "checkpoints" / name for name in (BEST, LAST)]
        path = next((ckpt for ckpt in found if ckpt.exists()), None)
        if path is None:
            raise FileNotFoundError(
                f"test={cfg.test}: no checkpoints/{BEST} or checkpoints/{LAST} in that folder. "
                f"Give a run folder that metarun wrote, or a checkpoint file (.pt)."
            )
    saved = checkpoint.load(path)
    test_cfg = OmegaConf.create(saved["config"])
    for key in keys:
        OmegaConf.update(test_cfg, key, OmegaConf.select(cfg, key), merge=False)
    for key, folder in (("data_dir", "root"), ("cache_dir", "cache_dir")):
        if cfg[key] is None:  # not set here (METARUN_DATA, METARUN_CACHE): the run's own
            continue
        if test_cfg.dataset.get(folder, "") == test_cfg.get(key):  # it came from ${data_dir}
            test_cfg.dataset[folder] = cfg[key]
        test_cfg[key] = cfg[key]
    from metarun.continual.loop import wants_stream

    if wants_stream(test_cfg):
        raise ValueError(
            f"test={cfg.test} is a task-stream (lifelong) run: its results.json already holds "
            f"its evaluation after every task; test= re-tests meta-learning runs."
        )
    check_eval_budget(test_cfg.eval)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hardware = instantiate(test_cfg.hardware)
    dataset, pools, task, algo = build(test_cfg, hardware)
    algo.load_state_dict(saved["algo"])
    trained = test_cfg.train.iterations
    if saved["iteration"] < trained and not test_cfg.train.get("max_minutes"):
        log.warning("%s stopped at iteration %d of %d", path, saved["iteration"], trained)
    log.info("testing %s (iteration %d), run folder %s", path, saved["iteration"], run_dir)
    OmegaConf.save(test_cfg, run_dir / "config.yaml", resolve=True)
    logger = RunLogger(run_dir, saved["iteration"], saved["iteration"], test_cfg.log_every)
    try:
        _, block = test_and_report(
            algo, dataset, pools, task, test_cfg.eval, hardware, logger, saved["iteration"], run_dir
        )
    finally:
        logger.close()
    results = {
        "test": block,
        "tested": {"checkpoint": str(path), "iteration": saved["iteration"]},
        "protocol": _protocol(test_cfg, pools, algo),
        "versions": _versions(),
        "config": OmegaConf.to_container(test_cfg, resolve=True),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return block


def train(
    algo: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    hardware: Any,
    sampler: EpisodeSampler,
    meta_batch_size: int,
    iterations: int,
    state: TrainState,
    logger: RunLogger,
    stop: _StopFlag,
    validate: Any,
    save: Any,
    val_every: int,
    checkpoint_every: int,
    run_dir: Path,
    task: TaskKind = CLASSIFICATION,
    parallel: DataParallel | None = None,
    max_seconds: float | None = None,
    grad_clip: float | None = None,
) -> None:
    """The meta-training loop: meta-batch -> adaptation and query loss per task ->
    meta-update -> logging -> validation -> checkpoint. Updates ``state`` in place.
    ``task`` names the metric (``train/acc`` or ``train/mse``) and its direction; under
    ``torchrun``, ``parallel`` splits each meta-batch across the processes. With
    ``max_seconds``, training ends (as if at the last iteration) once that much time has
    been spent in training steps; ``state.budget_reached`` records it. With ``grad_clip``,
    the meta-gradient's norm is clipped to it before each update (and logged)."""
    parallel = parallel or DataParallel(hardware.device)
    algo.train()
    while state.iteration < iterations:
        tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=hardware.device)
        acc_sum = torch.zeros((), device=hardware.device)
        meta_batch = [sampler.sample() for _ in range(meta_batch_size)]  # same on every rank
        for episode in task_batches(algo, parallel.share(meta_batch)):
            episode = episode.to(hardware.device, hardware.memory_format)
            with hardware.autocast():
                loss, acc = algo.meta_loss(episode)  # inner loop + query loss
            hardware.scaler.scale(loss * episode.tasks / meta_batch_size).backward()
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
        mean_loss = loss_sum.item() / meta_batch_size
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"the meta-training loss is {mean_loss} at iteration {state.iteration + 1}; "
                f"no update was applied. The last good checkpoint is "
                f"{run_dir / 'checkpoints' / LAST}. Lower train.meta_lr or the inner "
                f"learning rate, or try hardware.amp=off."
            )
        lr = optimizer.param_groups[0]["lr"]  # the meta learning rate of this update
        scalars = {}
        if grad_clip:
            hardware.scaler.unscale_(optimizer)  # clip the true gradient, not a scaled one
            norm = torch.nn.utils.clip_grad_norm_(algo.parameters(), grad_clip)
            scalars["train/grad_norm"] = norm.item()  # before clipping
        hardware.scaler.step(optimizer)
        hardware.scaler.update()
        if scheduler is not None:
            scheduler.step()
        parallel.average_buffers(algo)
        state.iteration += 1
        state.train_seconds += time.perf_counter() - tic

        mean_acc = acc_sum.item() / meta_batch_size
        logger.log(
            state.iteration,
            {"train/loss": mean_loss, f"train/{task.metric}": mean_acc, "train/lr": lr, **scalars},
        )
        logger.progress(state.iteration, mean_loss, mean_acc, meta_batch_size, task.metric)
        stopping = stop_votes.item() > 0  # Ctrl-C or SIGTERM: every rank stops here
        # The time budget (train.max_minutes) is spent on rank 0: every rank ends here.
        state.budget_reached = over_budget.item() > 0
        last = state.iteration == iterations or state.budget_reached
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
) -> tuple[EvalResult, dict[str, Any]]:
    """Tests ``algo`` on the fixed test episodes of ``e`` (``eval``), and again after each of
    ``e.report_steps``; logs the numbers, writes each episode's score to
    ``test_scores.json`` and the dataset's figures (adapted sinusoid curves) to TensorBoard.
    Returns the test result and the ``test`` entry of ``results.json``."""
    m = task.metric  # "acc", or "mse" for regression

    def episodes() -> EpisodeSampler:  # the same episodes, in the same order, every time
        kind = _eval_kind(e)
        return fixed_episodes(pools["test"], e.ways, e.shots, e.query_shots, e.episode_seed, kind)

    test = evaluate(algo, episodes(), e.test_episodes, hardware, task.score, m)
    log.info("test %s", test)
    logger.log(iteration, {f"test/{m}": test.mean, "test/ci95": test.ci95})
    if test.extra:  # per-episode metrics of the algorithm (MANN: accuracy by instance)
        log.info("test %s", {k: round(v["mean"], 4) for k, v in test.extra.items()})
        logger.log(iteration, {f"test/{k}": v["mean"] for k, v in test.extra.items()})
    after_steps = {}  # the same test episodes after other numbers of adaptation steps
    scores = {"metric": m, "episode_seed": e.episode_seed, "episodes": test.scores}
    for steps in e.report_steps:
        result = evaluate(algo, episodes(), e.test_episodes, hardware, task.score, m, steps)
        log.info("test after %d adaptation steps: %s", steps, result)
        logger.log(iteration, {f"test/{m}_step{steps}": result.mean})
        after_steps[str(steps)] = {m: result.mean, "ci95": result.ci95}
        scores.setdefault("after_steps", {})[str(steps)] = result.scores
    # Each test episode's score, for paired comparisons and tails (scripts/episode_scores.py).
    (run_dir / "test_scores.json").write_text(json.dumps(scores) + "\n")
    if hasattr(dataset, "figures"):  # e.g. a few adapted sinusoid curves
        for tag, image in dataset.figures(algo, episodes(), e.report_steps).items():
            logger.tb.add_image(f"test/{tag}", image, iteration)
    block = (
        {m: test.mean, "ci95": test.ci95, "episodes": test.episodes}
        | ({"after_steps": after_steps} if after_steps else {})
        | ({"episode_metrics": test.extra} if test.extra else {})
    )
    return test, block


def check_eval_budget(e: DictConfig) -> None:
    """Refuses validation or test settings that cannot be run, with the fix.

    ``eval.val_every=0`` is the one way to train without validation; whenever validation
    runs (``val_every > 0``) it needs ``eval.val_episodes >= 1``.

    Raises:
        ValueError: ``val_episodes < 1`` with ``val_every > 0``, ``test_episodes < 1``, or a
            negative ``val_every``.
    """
    if e.val_every < 0:
        raise ValueError(
            f"eval.val_every={e.val_every} is negative: set it to N > 0 to validate every N "
            f"iterations, or to 0 to train without validation."
        )
    if e.val_every > 0 and e.val_episodes < 1:
        raise ValueError(
            f"eval.val_episodes={e.val_episodes} with eval.val_every={e.val_every}: "
            f"validation needs at least one episode. Set eval.val_episodes to 1 or more "
            f"(100 by default), or eval.val_every=0 to train without validation."
        )
    if e.test_episodes < 1:
        raise ValueError(
            f"eval.test_episodes={e.test_episodes}: the test needs at least one episode; "
            f"set eval.test_episodes to 1 or more (600 by default)."
        )


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
    if getattr(algo, "stacks_tasks", False) and episodes:
        return [Episode.stack(episodes)]
    return episodes


def _protocol(cfg: DictConfig, pools: dict, algo: torch.nn.Module) -> dict[str, Any]:
    """Everything needed to compare this number with another: recorded next to it."""
    algo_cfg = OmegaConf.to_container(cfg.algo, resolve=True, enum_to_str=True)
    return {
        "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
        "split": cfg.dataset.get("split"),
        "image_size": cfg.dataset.get("image_size"),
        "test_classes": pools["test"].n_classes,  # None for regression
        "train_episode": {k: cfg.train[k] for k in ("ways", "shots", "query_shots")}
        | dict(zip(("episodes", "augment"), _train_kind(cfg.train), strict=True)),
        "eval_episode": {k: cfg.eval[k] for k in ("ways", "shots", "query_shots")}
        | {"episodes": _eval_kind(cfg.eval)},
        "episode_seed": cfg.eval.episode_seed,
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
    """``train``'s kind of episodes (``standard``, ``within_alphabet``) and augmentation."""
    return _option(t, "episodes", "standard"), _option(t, "augment", "none")


def _eval_kind(e: DictConfig) -> str:
    """``eval``'s kind of episodes (``standard``, ``within_alphabet``)."""
    return _option(e, "episodes", "standard")


def _versions() -> dict[str, str]:
    return {
        "metarun": metarun.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _hparams(config: dict) -> dict[str, Any]:
    """Flattened scalar config values for TensorBoard's HPARAMS tab."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not key.startswith("_"):
                    walk(f"{prefix}{key}.", value)
        elif isinstance(node, (int, float, str, bool)):
            flat[prefix[:-1]] = node

    machine_or_mode = ("data_dir", "cache_dir", "resume", "test")
    walk("", {k: v for k, v in config.items() if k not in machine_or_mode})
    return flat
