"""``metarun``: compose the config with Hydra and hand it to :func:`metarun.runner.run`.

metarun algo=maml dataset=omniglot
metarun experiment=protonet_omniglot_5w1s
metarun --multirun algo=maml,protonet seed=0,1
metarun resume=outputs/runs/2026-11-22/10-00-00
metarun test=outputs/runs/2026-11-22/10-00-00 eval.test_episodes=6000
metarun report outputs/multirun/2026-11-22/10-00-00   (metarun.report)
"""

from __future__ import annotations

import time

_STARTED_AT = time.perf_counter()

import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from metarun.config import register_configs  # noqa: E402
from metarun.resolvers import register_resolvers, sweep_overrides  # noqa: E402

log = logging.getLogger("metarun")
register_resolvers()  # here too: a sweep's worker processes (joblib) import only this module


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    job_started_at = time.perf_counter()
    from metarun.runner import RunInterrupted, run

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
    if cfg.resume and cfg.test:
        _fail("resume= continues training and test= tests a trained run: give one of them.")
    if cfg.resume:
        others = [o for o in hydra_cfg.overrides.task if not o.startswith("resume=")]
        if others:
            _fail(
                f"resume continues a run with the config saved in its checkpoint; drop the "
                f"other overrides ({' '.join(others)}) or start a new run without resume."
            )
    try:
        # A sweep runs several jobs in one process: each job's start-up counts from its start.
        started_at = job_started_at if multirun else _STARTED_AT
        if cfg.test:  # no training: test a trained run again, into this new run folder
            from metarun.runner import retest

            retest(cfg, list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir)
            return None
        summary = run(cfg, hydra_cfg.runtime.output_dir, started_at=started_at)
    except RunInterrupted as err:
        _fail(str(err), code=130)
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        # In a sweep, one failed job must not stop the others.
        if multirun:
            log.error("job failed: %s", message)
            return None  # the Optuna sweeper records a failed trial (a NaN would stop it)
        _fail(message)
    if not summary:  # a torchrun process other than rank 0
        return None
    objective = summary["val/acc"] if "val/acc" in summary else summary["val/mse"]  # regression
    return None if math.isnan(objective) else objective  # NaN: no validation ran


def _user_error(err: BaseException) -> str | None:
    """The message of an error caused by input (data, config, episode shape, a diverging
    run), looking through Hydra's InstantiationException; None for a bug."""
    from hydra.errors import InstantiationException

    from metarun.data.episodes import EpisodeError
    from metarun.data.files import DataError
    from metarun.runner import NonFiniteLossError

    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    user_errors = (DataError, EpisodeError, NonFiniteLossError, FileNotFoundError, ValueError)
    is_cuda_error = isinstance(err, RuntimeError) and "CUDA" in str(err)
    return str(err) if isinstance(err, user_errors) or is_cuda_error else None


def _fail(message: str, code: int = 2) -> None:
    """Logs ``message``, repeats it on stderr and exits with ``code``."""
    log.error("%s", message)
    print(f"metarun: {'stopped' if code == 130 else 'error'}: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console entry point (``[project.scripts] metarun``)."""
    if sys.argv[1:2] == ["report"]:  # metarun report RUN_OR_SWEEP...: compare finished runs
        from metarun.report import main as report

        sys.exit(report(sys.argv[2:]))
    register_configs()
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # under torchrun only rank 0 writes the run folder (metarun.distributed)
        scratch = Path(tempfile.gettempdir()) / f"metarun-rank{rank}"
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
        sys.argv += [f"hydra.run.dir={scratch}"]
    resume = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("resume=")), "")
    if (
        rank == 0
        and resume
        and "," not in resume
        and not any(arg.startswith("hydra.run.dir=") for arg in sys.argv[1:])
    ):
        # A resumed run logs into its own folder's metarun.log, and Hydra makes no new one.
        sys.argv += [f"hydra.run.dir={resume}", "hydra.output_subdir=null"]
    if "-m" in sys.argv[1:] or "--multirun" in sys.argv[1:]:  # folders named by what differs
        sys.argv += sweep_overrides(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
