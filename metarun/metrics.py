"""What a run writes as it goes: ``metrics.jsonl``, TensorBoard events, and progress."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("metarun")


class RunLogger:
    """Writes every logged value to ``metrics.jsonl`` and TensorBoard under ``run_dir``, and
    shows progress: a bar on a terminal, a log line every ``log_every`` iterations otherwise.

    On resume (``start_iteration > 0``) lines and events after the checkpoint are dropped,
    so the history reads as if the run had never stopped.

    ``loggers`` (the config's ``logger`` node) adds backends of :mod:`metarun.loggers`
    (``csv``, ``wandb``, ``mlflow``), which get every scalar too; TensorBoard is always
    written (``self.tb``), as hparams and images still go there only.
    """

    def __init__(
        self,
        run_dir: Path,
        total: int,
        start_iteration: int,
        log_every: int,
        loggers: Mapping[str, Any] | None = None,
    ):
        from torch.utils.tensorboard import SummaryWriter  # heavy: only when a run starts

        from metarun.loggers import build_loggers

        others = {k: v for k, v in (loggers or {}).items() if k != "tensorboard"}
        self.backends = build_loggers(others, run_dir, start_step=start_iteration)

        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            _keep_until(self.path, start_iteration)
        self.jsonl = open(self.path, "a")
        self.tb = SummaryWriter(
            str(run_dir), purge_step=start_iteration + 1 if start_iteration else None
        )
        self.total, self.log_every = total, log_every
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_iteration, unit="it", dynamic_ncols=True)
        self._window_start = (start_iteration, time.perf_counter())

    def console(self) -> contextlib.AbstractContextManager:
        """Routes log lines through the bar while it is shown, so they do not break it."""
        if self.bar is None:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def log(self, iteration: int, values: dict[str, float]) -> None:
        """Records ``values`` (TensorBoard tags such as ``train/loss``) at ``iteration``."""
        self.jsonl.write(json.dumps({"iteration": iteration, **values}) + "\n")
        for tag, value in values.items():
            self.tb.add_scalar(tag, value, iteration)
        self.backends.log_scalars(iteration, values)

    def progress(
        self,
        iteration: int,
        loss: float,
        acc: float,
        tasks_per_iteration: int,
        metric: str = "acc",
    ) -> None:
        """Updates the bar every iteration; every ``log_every`` iterations also logs the rate
        (``perf/tasks_per_s``) and, without a terminal, a plain progress line. ``acc`` is the
        task's metric, shown under its name ``metric`` (``acc``, or ``mse`` for regression)."""
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)
            self.bar.set_postfix({"loss": f"{loss:.3f}", metric: f"{acc:.3f}"}, refresh=False)
        if iteration % self.log_every and iteration != self.total:
            return
        start_it, start_t = self._window_start
        now = time.perf_counter()
        rate = (iteration - start_it) * tasks_per_iteration / max(now - start_t, 1e-9)
        self._window_start = (iteration, now)
        self.log(iteration, {"perf/tasks_per_s": rate})
        self.jsonl.flush()
        self.backends.flush()
        if self.bar is not None:
            postfix = {"loss": f"{loss:.3f}", metric: f"{acc:.3f}", "tasks_s": f"{rate:.1f}"}
            self.bar.set_postfix(postfix)
        else:
            eta = (self.total - iteration) * tasks_per_iteration / max(rate, 1e-9)
            log.info(
                "it %d/%d  loss %.4f  %s %.3f  %.1f tasks/s  eta %s",
                iteration,
                self.total,
                loss,
                metric,
                acc,
                rate,
                _duration(eta),
            )

    def flush(self) -> None:
        """Puts every line and event logged so far on the disk (``fsync``); called before
        each checkpoint, so that after a crash every iteration up to the checkpoint is in
        ``metrics.jsonl``."""
        self.jsonl.flush()
        os.fsync(self.jsonl.fileno())
        self.tb.flush()
        self.backends.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        self.tb.close()
        self.backends.close()


def _keep_until(path: Path, iteration: int) -> None:
    """Keeps the lines of ``metrics.jsonl`` up to ``iteration`` (those the checkpoint a run
    resumes from covers), so the resumed run logs every later iteration exactly once; a
    line cut short by a killed process is dropped. Rewritten atomically."""
    from metarun.data.files import atomic_write

    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a process killed mid-write
        if record["iteration"] <= iteration:
            kept.append(line)
    atomic_write("".join(f"{line}\n" for line in kept).encode(), path)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class NullLogger:
    """A :class:`RunLogger` that records nothing: used by every process but rank 0 of a
    ``torchrun`` job, so one process writes the run folder."""

    def __init__(
        self,
        run_dir: Path,
        total: int,
        start_iteration: int,
        log_every: int,
        loggers: Mapping[str, Any] | None = None,
    ):
        pass

    def console(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def log(self, iteration: int, values: dict[str, float]) -> None:
        pass

    def progress(
        self,
        iteration: int,
        loss: float,
        acc: float,
        tasks_per_iteration: int,
        metric: str = "acc",
    ) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
