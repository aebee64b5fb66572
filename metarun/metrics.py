"""What a run writes as it goes: ``metrics.jsonl``, the ``logger=`` backends (TensorBoard
always), and progress on the terminal or in the log.

``metrics.jsonl`` holds one JSON record per line: ``{"iteration": 250, "kind": "val",
"val/acc": 0.93, "val/ci95": 0.01}``. ``kind`` is the part of its tags before the ``/``
(``train``, ``val``, ``test``, ``perf``; in a stream also ``meta``, ``stream``,
``continual``), and a line holds the values of one kind logged at one iteration, so an
iteration has a ``train`` line and, when measured, ``val``, ``perf`` and ``test`` lines.
``pandas.read_json(path, lines=True)`` reads it; ``df[df.kind == "val"]`` is the
validation curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("metarun")

EVAL_LOG_SECONDS = 10.0
"""Without a terminal, a validation or test logs its progress at most this often."""

TENSORBOARD = {"_target_": "metarun.loggers.TensorBoardLogger", "_partial_": True}
"""The TensorBoard backend, written by every run (``logger=`` adds the others)."""


class RunLogger:
    """Writes every logged value to ``metrics.jsonl`` and to the ``logger=`` backends under
    ``run_dir`` (TensorBoard always, :mod:`metarun.loggers`), and shows progress: on a
    terminal, a bar for training and one for each validation and test; otherwise a log
    line every ``log_every`` iterations, and every :data:`EVAL_LOG_SECONDS` during a long
    validation or test.

    On resume (``start_iteration > 0``) lines and events after the checkpoint are dropped,
    so the history reads as if the run had never stopped. ``latest`` holds the last value
    logged of each tag (those kept from before a resume included).

    Args:
        run_dir: the run folder.
        total: the iterations of the whole run (the bar's length).
        start_iteration: where the run starts (the checkpoint's iteration on resume).
        log_every: iterations between ``perf/tasks_per_s`` values and progress lines.
        loggers: the config's ``logger`` node (``{name: backend config}``); TensorBoard is
            added when it is not there.
    """

    def __init__(
        self,
        run_dir: Path,
        total: int,
        start_iteration: int,
        log_every: int,
        loggers: Mapping[str, Any] | None = None,
    ):
        from metarun.loggers import build_loggers

        self.path = run_dir / "metrics.jsonl"
        self.latest: dict[str, float] = {}
        if self.path.exists():
            for record in _keep_until(self.path, start_iteration):
                self.latest.update({k: v for k, v in record.items() if "/" in k})
        nodes = {"tensorboard": TENSORBOARD, **{k: v for k, v in (loggers or {}).items() if v}}
        self.backends = build_loggers(nodes, run_dir, start_step=start_iteration)
        self.jsonl = open(self.path, "a")
        self.total, self.log_every = total, log_every
        self.start_iteration = start_iteration
        self.terminal = sys.stderr.isatty()
        self.bar: Any = None  # the training bar, opened at the first iteration
        self.rate: float | None = None  # tasks/s of the last window of log_every iterations
        self._window_start = (start_iteration, time.perf_counter())

    def console(self) -> contextlib.AbstractContextManager:
        """Routes log lines through the bars while they are shown (tqdm's redirect), so a
        log line is printed on a line of its own and no stale bar is left behind."""
        if not self.terminal:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def log(self, iteration: int, values: Mapping[str, float]) -> None:
        """Records ``values`` (tags such as ``train/loss``) at ``iteration``: one
        ``metrics.jsonl`` line per kind of tag, and every backend."""
        kinds: dict[str, dict[str, float]] = {}
        for tag, value in values.items():
            kinds.setdefault(tag.partition("/")[0], {})[tag] = value
        for kind, group in kinds.items():
            self.jsonl.write(json.dumps({"iteration": iteration, "kind": kind, **group}) + "\n")
        self.latest.update(values)
        self.backends.log_scalars(iteration, values)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The run's hyperparameters and final metrics, to every backend (TensorBoard's
        HPARAMS tab, ``hparams.json`` of ``logger=csv``, W&B's config, MLflow's params)."""
        self.backends.log_hparams(hparams, metrics)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure (drawn once) or a ``(3, H, W)`` uint8 image, to every backend."""
        if hasattr(figure, "savefig"):
            from metarun.figures import to_rgb

            figure = to_rgb(figure)
        self.backends.log_figure(tag, figure, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Markdown text (a table), to every backend."""
        self.backends.log_text(tag, text, step)

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
        task's metric, shown under its name ``metric`` (``acc``, or ``mse`` for regression).
        The bar always shows the rate in tasks/s: the last window's, or, in the first
        window, the rate so far."""
        start_it, start_t = self._window_start
        now = time.perf_counter()
        window_rate = (iteration - start_it) * tasks_per_iteration / max(now - start_t, 1e-9)
        measured = iteration % self.log_every == 0 or iteration == self.total
        if measured:
            self.rate = window_rate
            self._window_start = (iteration, now)
            self.log(iteration, {"perf/tasks_per_s": window_rate})
            self.jsonl.flush()
            self.backends.flush()
        shown = math.isfinite(loss)  # NaN: no loss at this step (a benchmark's stream)
        if self.terminal:
            rate = self.rate if self.rate is not None else window_rate
            postfix = {"loss": f"{loss:.3f}" if shown else "-", metric: f"{acc:.3f}"}
            postfix["tasks/s"] = f"{rate:.1f}"
            if self.bar is None:  # opened here, so that the start-up lines come before it
                self.bar = _tqdm(self.total, self.start_iteration, "it", "train", postfix)
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(iteration - self.bar.n)
        elif measured:
            eta = (self.total - iteration) * tasks_per_iteration / max(window_rate, 1e-9)
            log.info(
                "it %d/%d  loss %s  %s %.3f  %.1f tasks/s  eta %s",
                iteration,
                self.total,
                f"{loss:.4f}" if shown else "-",
                metric,
                acc,
                window_rate,
                _duration(eta),
            )

    def end_training(self) -> None:
        """Closes the training bar (its final rate is training's alone), before the test."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @contextlib.contextmanager
    def evaluation(self, name: str, episodes: int) -> Iterator[Callable[[], None]]:
        """Progress of a validation or test of ``episodes`` episodes, named ``name``
        (``val``, ``test``): yields a function to call after each episode. On a terminal it
        moves a bar of its own (episodes, rate, ETA; a validation's bar disappears when it
        is done, the test's stays); otherwise it logs a line at most every
        :data:`EVAL_LOG_SECONDS`."""
        started = last_line = time.perf_counter()
        done = 0
        bar = None
        if self.terminal:
            bar = _tqdm(episodes, 0, "episode", name, leave=not name.startswith("val"))

        def step() -> None:
            nonlocal done, last_line
            done += 1
            if bar is not None:
                bar.update(1)
                return
            now = time.perf_counter()
            if now - last_line >= EVAL_LOG_SECONDS and done < episodes:
                last_line = now
                rate = done / max(now - started, 1e-9)
                log.info(
                    "%s: %d/%d episodes  %.1f episodes/s  eta %s",
                    name,
                    done,
                    episodes,
                    rate,
                    _duration((episodes - done) / max(rate, 1e-9)),
                )

        try:
            yield step
        finally:
            if bar is not None:
                bar.close()

    def flush(self) -> None:
        """Puts every line and event logged so far on the disk (``fsync``); called before
        each checkpoint, so that after a crash every iteration up to the checkpoint is in
        ``metrics.jsonl``."""
        self.jsonl.flush()
        os.fsync(self.jsonl.fileno())
        self.backends.flush()

    def close(self) -> None:
        self.end_training()
        self.jsonl.close()
        self.backends.close()


def _tqdm(
    total: int, initial: int, unit: str, name: str, postfix: Any = None, leave: bool = True
) -> Any:
    """A bar on stderr, described by ``name`` (and the sweep job's number, see :func:`tag_job`)."""
    from tqdm import tqdm

    desc = f"job {_job} {name}" if _job is not None else name
    return tqdm(
        total=total,
        initial=initial,
        unit=unit,
        desc=desc,
        postfix=postfix,
        dynamic_ncols=True,
        leave=leave,
    )


_job: int | None = None
_job_filter: logging.Filter | None = None


class _JobTag(logging.Filter):
    def __init__(self, job: int):
        super().__init__()
        self.prefix = f"[job {job}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def tag_job(job: int | None) -> None:
    """Tags metarun's log lines (``[job 3] ...``) and bars with the number of the sweep's
    job this process runs now; ``None`` removes the tag."""
    global _job, _job_filter
    if _job_filter is not None:
        log.removeFilter(_job_filter)
        _job_filter = None
    _job = job
    if job is not None:
        _job_filter = _JobTag(job)
        log.addFilter(_job_filter)


def _keep_until(path: Path, iteration: int) -> list[dict[str, Any]]:
    """Keeps the lines of ``metrics.jsonl`` up to ``iteration`` (those the checkpoint a run
    resumes from covers), so the resumed run logs every later iteration exactly once; a
    line cut short by a killed process is dropped. Rewritten atomically. Returns the kept
    records."""
    from metarun.data.files import atomic_write

    kept, records = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a process killed mid-write
        if record["iteration"] <= iteration:
            kept.append(line)
            records.append(record)
    atomic_write("".join(f"{line}\n" for line in kept).encode(), path)
    return records


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
        self.latest = {}

    def console(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def log(self, iteration: int, values: Mapping[str, float]) -> None:
        pass

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        pass

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        pass

    def log_text(self, tag: str, text: str, step: int) -> None:
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

    def end_training(self) -> None:
        pass

    @contextlib.contextmanager
    def evaluation(self, name: str, episodes: int) -> Iterator[Callable[[], None]]:
        yield lambda: None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
