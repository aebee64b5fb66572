"""The run: config -> objects -> meta-training -> validation -> test -> results.

``run(cfg, run_dir)`` is the whole job; ``metarun.cli`` only composes the config and
hands over Hydra's output folder. Read :func:`train` top to bottom for the loop.
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
from metarun.checkpoint import BEST, LAST, TrainState
from metarun.data.episodes import EpisodeSampler
from metarun.evaluation import EvalResult, evaluate, fixed_episodes
from metarun.metrics import RunLogger

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
    """Turns the first SIGINT/SIGTERM into a request to stop at the end of the current
    iteration (so the checkpoint is consistent); a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: saving a checkpoint after this iteration")


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
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)

    hardware = instantiate(cfg.hardware)
    torch.manual_seed(cfg.seed)
    dataset = instantiate(cfg.dataset)
    pools = {split: dataset.pool(split) for split in ("train", "val", "test")}
    t = cfg.train
    train_sampler = EpisodeSampler(pools["train"], t.ways, t.shots, t.query_shots, seed=cfg.seed)
    # Fail now, not after training, if the evaluation episodes are impossible.
    e = cfg.eval
    for split in ("val", "test"):
        fixed_episodes(pools[split], e.ways, e.shots, e.query_shots, e.episode_seed)
    backbone = instantiate(cfg.model)(input_shape=dataset.image_shape)
    algo = instantiate(cfg.algo)(backbone=backbone).to(hardware.device)
    optimizer = torch.optim.Adam(algo.parameters(), lr=t.meta_lr)
    scheduler = (
        torch.optim.lr_scheduler.StepLR(optimizer, t.lr_decay_every, t.lr_decay_gamma)
        if t.lr_decay_every
        else None
    )
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
    else:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

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
        sampler = fixed_episodes(pools["val"], e.ways, e.shots, e.query_shots, e.episode_seed)
        return evaluate(algo, sampler, e.val_episodes, hardware)

    logger = RunLogger(run_dir, t.iterations, state.iteration, cfg.log_every)
    log.info(
        "%s on %s (%s split): %d/%d/%d train/val/test classes, %s, run folder %s",
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
            )
        if state.iteration < t.iterations:  # stopped by a signal
            raise RunInterrupted(run_dir, state.iteration)
        if (run_dir / "checkpoints" / BEST).exists():
            algo.load_state_dict(checkpoint.load(run_dir / "checkpoints" / BEST)["algo"])
        test_sampler = fixed_episodes(pools["test"], e.ways, e.shots, e.query_shots, e.episode_seed)
        test = evaluate(algo, test_sampler, e.test_episodes, hardware)
        log.info("test accuracy %s", test)
        logger.log(state.iteration, {"test/acc": test.mean, "test/ci95": test.ci95})
        summary = {
            "val/acc": state.best_val_acc if state.best_iteration >= 0 else float("nan"),
            "test/acc": test.mean,
            "test/ci95": test.ci95,
        }
        hparams = _hparams(config)
        logger.tb.add_hparams(hparams, {"hparam/test_acc": test.mean}, run_name=".")
        results = {
            "test": {"acc": test.mean, "ci95": test.ci95, "episodes": test.episodes},
            "val": {"best_acc": summary["val/acc"], "best_iteration": state.best_iteration},
            "protocol": _protocol(cfg, pools, algo),
            "training": {
                "iterations": state.iteration,
                "seconds": round(state.train_seconds, 1),
                "tasks_per_s": round(
                    state.iteration * t.meta_batch_size / max(state.train_seconds, 1e-9), 2
                ),
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
        return summary
    finally:
        logger.close()


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
) -> None:
    """The meta-training loop: meta-batch -> adaptation and query loss per task ->
    meta-update -> logging -> validation -> checkpoint. Updates ``state`` in place."""
    algo.train()
    while state.iteration < iterations and not stop.requested:
        tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=hardware.device)
        acc_sum = torch.zeros((), device=hardware.device)
        for _ in range(meta_batch_size):
            episode = sampler.sample().to(hardware.device)
            with hardware.autocast():
                loss, acc = algo.meta_loss(episode)  # inner loop + query loss
            hardware.scaler.scale(loss / meta_batch_size).backward()
            loss_sum += loss.detach()
            acc_sum += acc.detach()
        mean_loss = loss_sum.item() / meta_batch_size
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"the meta-training loss is {mean_loss} at iteration {state.iteration + 1}; "
                f"no update was applied. The last good checkpoint is "
                f"{run_dir / 'checkpoints' / LAST}. Lower train.meta_lr or the inner "
                f"learning rate, or try hardware.amp=off."
            )
        hardware.scaler.step(optimizer)
        hardware.scaler.update()
        if scheduler is not None:
            scheduler.step()
        state.iteration += 1
        state.train_seconds += time.perf_counter() - tic

        mean_acc = acc_sum.item() / meta_batch_size
        logger.log(state.iteration, {"train/loss": mean_loss, "train/acc": mean_acc})
        logger.progress(state.iteration, mean_loss, mean_acc, meta_batch_size)
        if val_every and (state.iteration % val_every == 0 or state.iteration == iterations):
            val = validate()
            logger.log(state.iteration, {"val/acc": val.mean, "val/ci95": val.ci95})
            log.info("it %d: validation accuracy %s", state.iteration, val)
            if val.mean > state.best_val_acc:
                state.best_val_acc, state.best_iteration = val.mean, state.iteration
                save(BEST)
        if (
            state.iteration % checkpoint_every == 0
            or state.iteration == iterations
            or stop.requested
        ):
            save(LAST)


def _protocol(cfg: DictConfig, pools: dict, algo: torch.nn.Module) -> dict[str, Any]:
    """Everything needed to compare this number with another: recorded next to it."""
    algo_cfg = OmegaConf.to_container(cfg.algo, resolve=True, enum_to_str=True)
    return {
        "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
        "split": cfg.dataset.get("split"),
        "image_size": cfg.dataset.get("image_size"),
        "test_classes": pools["test"].n_classes,
        "train_episode": {k: cfg.train[k] for k in ("ways", "shots", "query_shots")},
        "eval_episode": {k: cfg.eval[k] for k in ("ways", "shots", "query_shots")},
        "episode_seed": cfg.eval.episode_seed,
        "algorithm": type(algo).__name__,
        "algo": {k: v for k, v in algo_cfg.items() if not k.startswith("_")},
        "bn_mode": algo.bn_mode.value,
        "model": cfg.model._target_.rsplit(".", 1)[-1],
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

    walk("", {k: v for k, v in config.items() if k not in ("data_dir", "cache_dir", "resume")})
    return flat
