"""The errors metarun reports to its user as one message (no traceback).

Each names the problem and the way out. The command line (:mod:`metarun.cli`) prints the
message of every error in :data:`USER_ERRORS` and exits with code 2; a run stopped by a
signal (:class:`RunInterrupted`) exits with ``128 + the signal's number`` (130 for Ctrl-C,
143 for SIGTERM). This module imports nothing, so every layer can raise these errors.
"""

from __future__ import annotations

import signal
from pathlib import Path


class ConfigError(ValueError):
    """An option, a value or a combination of options that cannot run."""


class DataError(RuntimeError):
    """A dataset that is missing, corrupt or cannot be fetched; the message says what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (damaged, truncated, not metarun's) or written (disk
    full, no permission). The previous good checkpoint is never replaced by a bad one."""


class RunFolderBusy(RuntimeError):
    """Another live process owns the run folder."""


class NonFiniteError(RuntimeError):
    """The loss, a parameter or a statistic (batch-norm running mean or variance) became NaN
    or infinite. The update that would have produced it was not applied, or, for a
    parameter or a statistic, the state was not saved: the last checkpoint is still good."""


class RunInterrupted(Exception):
    """Ctrl-C (SIGINT), SIGTERM or SIGUSR2 stopped the run; ``last.pt`` holds its progress.

    Attributes:
        run_dir: the run folder.
        iteration: the iteration saved in ``last.pt``.
        signum: the signal that stopped it; the process exits with ``128 + signum``.
    """

    def __init__(
        self,
        run_dir: Path,
        iteration: int,
        signum: int | None,
        during: str = "",
        message: str | None = None,
    ):
        self.run_dir, self.iteration = run_dir, iteration
        self.signum = signum if signum is not None else signal.SIGINT
        where = f" during the {during}" if during else ""
        super().__init__(
            message
            or f"interrupted{where} at iteration {iteration}; the checkpoint "
            f"{Path(run_dir) / 'checkpoints' / 'last.pt'} is saved. Continue with:\n"
            f"  metarun resume={run_dir}"
        )

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    CheckpointError,
    RunFolderBusy,
    NonFiniteError,
    FileNotFoundError,
    ValueError,  # covers the data layer's EpisodeError and the continual ScenarioError
)
"""Errors caused by the input (config, data, a checkpoint) or by a diverging run: their
message is the whole report. Anything else is a bug and keeps its traceback."""
