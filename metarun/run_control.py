"""What every run shares, whichever recipe it follows (meta-training or a continual stream):
the run folder and its lock, the stop signals, the finiteness checks, and the blocks of
``results.json`` that describe where and with what a number was measured.

The recipes (:mod:`metarun.recipes`) build on this module; it imports neither of them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from metarun import checkpoint
from metarun.data.files import atomic_write
from metarun.errors import NonFiniteError, RunFolderBusy, RunInterrupted

log = logging.getLogger("metarun")

LOCK = ".lock"
_HELD: dict[Path, Any] = {}  # run folders this process owns -> their open lock file
RUN_FILES = ("checkpoints", "metrics.jsonl", "results.json")  # what shows a run was here


class RunFolder:
    """A run folder owned by this process: an exclusive lock on ``<run>/.lock`` (``flock``,
    released by the operating system when the process ends, however it ends), so a second
    run or a ``resume=`` into a folder in use is refused, while a folder whose process was
    killed can be resumed at once. Leftovers of killed checkpoint writes are removed.

    Args:
        path: the folder.
        resume: whether a run is continued there (it must hold ``checkpoints/last.pt``);
            otherwise a new run starts there, which it refuses if a run is already there.
    """

    def __init__(self, path: Path | str, resume: bool = False):
        self.path = Path(path).resolve()
        if resume and not (self.path / "checkpoints" / checkpoint.LAST).is_file():
            raise FileNotFoundError(
                f"resume={self.path}: no checkpoints/{checkpoint.LAST} there; give the folder "
                f"of a metarun run (it is printed when a run stops)."
            )
        acquire(self.path)
        if not resume and any((self.path / name).exists() for name in RUN_FILES):
            release(self.path)
            raise RunFolderBusy(
                f"{self.path} already holds a run (checkpoints, metrics.jsonl or results.json):"
                f" continue it with `metarun resume={self.path}`, or start the new run in "
                f"another folder (drop hydra.run.dir= to get a fresh one)."
            )
        for stale in checkpoint.clean_stale(self.path / "checkpoints"):
            log.info("removed %s, left by a checkpoint write that was killed", stale)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_json(self, name: str, content: Any) -> None:
        """Writes ``<run>/<name>`` atomically, as indented JSON."""
        atomic_write((json.dumps(content, indent=2) + "\n").encode(), self.path / name)

    def close(self) -> None:
        release(self.path)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def acquire(path: Path) -> None:
    """Takes this process's lock on the run folder ``path`` (created if missing); a lock
    this process already holds is kept. Raises :class:`RunFolderBusy` if another live
    process holds it."""
    path = Path(path).resolve()
    if path in _HELD:
        return
    path.mkdir(parents=True, exist_ok=True)
    lock = open(path / LOCK, "a+")
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the folder is used without a lock
        _HELD[path] = lock
        return
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise RunFolderBusy(
            f"{path} is in use by a running metarun process ({owner}): two runs in one folder "
            f"would overwrite each other's checkpoints and metrics. Wait for it to end (or "
            f"stop it with Ctrl-C), or use another folder."
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {platform.node()}\n")
    lock.flush()
    _HELD[path] = lock


def release(path: Path) -> None:
    """Gives up this process's lock on ``path`` (if it holds it)."""
    lock = _HELD.pop(Path(path).resolve(), None)
    if lock is not None:
        lock.close()  # closing the file drops the flock


class StopFlag:
    """Turns the first SIGINT/SIGTERM/SIGUSR2 into a request to stop at the next safe point
    (the end of an iteration, or the next evaluation episode), so the checkpoint is
    consistent; a second SIGINT interrupts at once.

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

    def __enter__(self) -> StopFlag:
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
            "stop requested (%s): stopping at the next safe point", signal.Signals(signum).name
        )

    def interrupted(self, run_dir: Path, iteration: int, during: str = "") -> RunInterrupted:
        """The error a recipe raises once it has saved ``last.pt`` after a stop request."""
        return RunInterrupted(run_dir, iteration, self.received, during)


def check_finite(module: torch.nn.Module, what: str, iteration: int, run_dir: Path) -> None:
    """Raises :class:`NonFiniteError` if a parameter or a floating-point buffer of
    ``module`` (batch-norm statistics) holds NaN or infinity; the message names the run's
    last good checkpoint (:func:`last_good_checkpoint`)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if bool(finite):
        return
    names = [
        name
        for name, t in (*module.named_parameters(), *module.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    raise NonFiniteError(
        f"{what} holds NaN or infinite values after iteration {iteration} ({', '.join(names[:4])}"
        f"{', ...' if len(names) > 4 else ''}); the run stopped without saving them. "
        f"{last_good_checkpoint(run_dir)} Lower the learning rates (train.meta_lr, "
        f"algo.fast_lr or algo.lr) or set train.grad_clip, then continue with "
        f"`metarun resume=RUN train.meta_lr=...`."
    )


def last_good_checkpoint(run_dir: Path) -> str:
    """A sentence naming the run's last good checkpoint, or saying that there is none yet."""
    last = Path(run_dir) / "checkpoints" / checkpoint.LAST
    if not last.is_file():
        return "No checkpoint has been written yet, so nothing is lost but this run's start."
    try:
        iteration = checkpoint.load(last)["iteration"]
    except Exception:  # noqa: BLE001 - the sentence is advice; the error is reported anyway
        return f"The last checkpoint is {last}."
    return f"The last good checkpoint is {last} (iteration {iteration})."


def versions() -> dict[str, str]:
    """The software a number was measured with."""
    from importlib import metadata

    try:
        version = metadata.version("metarun")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        version = "unknown"
    return {
        "metarun": version,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine(hardware: Any) -> dict[str, Any]:
    """The hardware a number was measured on (``results.json``'s ``training`` block)."""
    return {"hardware": hardware.describe(), "cpu": platform.processor() or platform.machine()}
