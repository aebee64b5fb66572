"""``metarun``: compose the config with Hydra and hand it to the recipe it asks for
(:func:`metarun.recipes.run`).

metarun algo=maml dataset=omniglot
metarun experiment=protonet_omniglot_5w1s
metarun --multirun algo=maml,protonet seed=0,1
metarun resume=outputs/runs/2026-11-22/10-00-00 [train.meta_lr=...]
metarun test=outputs/runs/2026-11-22/10-00-00 eval.test_episodes=6000
metarun report outputs/multirun/2026-11-22/10-00-00   (metarun.report)
metarun adapt outputs/runs/2026-11-22/10-00-00 support=DIR query=DIR   (metarun.adapt)

Exit status: 0 when the run (every job of a sweep) succeeded; 2 for a problem with the
input (config, data, checkpoint: the message says which and how to fix it); 1 when a job of
a sweep failed (the sweep ends with a summary of the failed jobs); 128 + the signal's
number when a signal stopped the run (130 for Ctrl-C, 143 for SIGTERM), ``last.pt`` saved.
"""

from __future__ import annotations

import time

_STARTED_AT = time.perf_counter()

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from metarun.config import register_configs  # noqa: E402
from metarun.resolvers import register_resolvers, sweep_overrides  # noqa: E402

log = logging.getLogger("metarun")
register_resolvers()  # here too: a sweep's worker processes (joblib) import only this module

FAILURE = "failure.json"  # written into a sweep job's folder when the job fails
_sweep_failures: list[dict[str, Any]] = []


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    job_started_at = time.perf_counter()
    from metarun.errors import USER_ERRORS, ConfigError, RunInterrupted

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
    overrides = list(hydra_cfg.overrides.task)
    if multirun:  # each job's log lines and bars say which job they are: [job 3] ...
        from metarun.metrics import tag_job

        tag_job(hydra_cfg.job.num)
    try:
        if cfg.resume and cfg.test:
            raise ConfigError(
                "resume= continues training and test= tests a trained run: give one of them."
            )
        if cfg.test:  # no training: test a trained run again, into this new run folder
            from metarun.recipes import retest

            retest(cfg, overrides, hydra_cfg.runtime.output_dir)
            return None
        from metarun.recipes import run

        # A sweep runs several jobs in one process: each job's start-up counts from its start.
        summary = run(
            cfg,
            hydra_cfg.runtime.output_dir,
            started_at=job_started_at if multirun else _STARTED_AT,
            resume_keys=[_key(o) for o in overrides if not o.startswith("resume=")],
        )
    except RunInterrupted as err:  # stops a sweep too: the user asked to stop
        _fail(str(err), code=err.exit_code)
    except Exception as err:
        err = _unwrap(err)
        if isinstance(err, RunInterrupted):
            _fail(str(err), code=err.exit_code)
        user_error = isinstance(err, USER_ERRORS) or _is_cuda_error(err)
        if not multirun:
            if not user_error:
                raise  # a bug: keep the traceback
            _fail(str(err))
        # In a sweep, one failed job must not stop the others; the sweep reports it at the end.
        message = str(err) if user_error else f"{type(err).__name__}: {err}"
        log.error("job failed: %s", message if user_error else traceback.format_exc())
        _record_failure(hydra_cfg, overrides, message)
        return None  # the Optuna sweeper records a failed trial (a NaN would stop it)
    if not summary:  # a torchrun process other than rank 0
        return None
    objective = summary["val/acc"] if "val/acc" in summary else summary["val/mse"]  # regression
    return None if math.isnan(objective) else objective  # NaN: no validation ran


def _carried(arg: str) -> str:
    """With ``test=RUN``, ``scenario.sizes=[600]`` -> ``++scenario.sizes=[600]``: a tested
    run's scenario and method come from its checkpoint, not from the groups this command
    line composes (no scenario by default), so Hydra is asked to add such a key to carry its
    value to :func:`metarun.recipes.retest`, which checks it against the tested run."""
    if arg.startswith(("scenario.", "algo.")) and "=" in arg:
        return "++" + arg
    return arg


def _key(override: str) -> str:
    """``train.meta_lr=0.1`` -> ``train.meta_lr`` (``+``/``~`` prefixes dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


def _unwrap(err: BaseException) -> BaseException:
    """The error inside Hydra's ``InstantiationException`` (a dataset that failed to load)."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def _is_cuda_error(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "CUDA" in str(err)


def _record_failure(hydra_cfg: Any, overrides: list[str], message: str) -> None:
    """Writes ``failure.json`` into the failed job's folder (read by :class:`SweepSummary`,
    also when the job ran in another process, as with the joblib launcher)."""
    job_dir = Path(hydra_cfg.runtime.output_dir)
    record = {
        "job": hydra_cfg.job.num,
        "overrides": overrides,
        "error": message,
        "log": str(job_dir / f"{hydra_cfg.job.name}.log"),
    }
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / FAILURE).write_text(json.dumps(record, indent=2) + "\n")


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in ``configs/config.yaml``): at the end of a
    sweep, lists the jobs that failed (number, overrides, error, log file) and makes
    ``metarun`` exit with status 1 if any did."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from metarun.metrics import tag_job

        tag_job(None)  # the summary is the sweep's, not its last job's
        sweep_dir = Path(config.hydra.sweep.dir)
        failures = [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob(FAILURE))]
        failures.sort(key=lambda f: f["job"])
        _sweep_failures.extend(failures)
        if not failures:
            return
        lines = [f"{len(failures)} job(s) of the sweep in {sweep_dir} failed:"]
        for f in failures:
            lines.append(f"  job {f['job']} ({' '.join(f['overrides'])}): {f['error']}")
            lines.append(f"    log: {f['log']}")
        log.error("%s", "\n".join(lines))
        print("metarun: " + "\n".join(lines), file=sys.stderr)


def _fail(message: str, code: int = 2) -> None:
    """Logs ``message``, repeats it on stderr and exits with ``code``."""
    log.error("%s", message)
    print(f"metarun: {'stopped' if code > 128 else 'error'}: {message}", file=sys.stderr)
    sys.exit(code)


def _claim_run_folder(argv: list[str]) -> None:
    """Before Hydra writes anything: a ``resume=`` folder must hold a run (else nothing is
    created), and a folder named by ``resume=`` or ``hydra.run.dir=`` must not be in use by
    another process (its lock is taken now and kept until this process ends), so a refused
    run leaves the other run's files as they were."""
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), "")
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), "")
    if resume and any(a.startswith("test=") for a in argv):
        print(
            "metarun: error: resume= continues training and test= tests a trained run: give "
            "one of them.",
            file=sys.stderr,
        )
        sys.exit(2)
    if resume and "," not in resume:
        if not (Path(resume).expanduser() / "checkpoints" / "last.pt").is_file():
            what = "does not exist" if not Path(resume).expanduser().exists() else "holds no run"
            print(
                f"metarun: error: resume={resume} {what} (no checkpoints/last.pt there): give "
                f"the folder of a metarun run, as printed when it stopped.",
                file=sys.stderr,
            )
            sys.exit(2)
        run_dir = run_dir or resume
    if not run_dir or "${" in run_dir or any(a in ("-m", "--multirun") for a in argv):
        return
    from metarun.errors import RunFolderBusy
    from metarun.run_control import RunFolder

    try:
        RunFolder(Path(run_dir).expanduser(), resume=bool(resume))  # held until exit
    except (RunFolderBusy, FileNotFoundError) as err:
        print(f"metarun: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point (``[project.scripts] metarun``)."""
    if sys.argv[1:2] == ["report"]:  # metarun report RUN_OR_SWEEP...: compare finished runs
        from metarun.report import main as report

        sys.exit(report(sys.argv[2:]))
    if sys.argv[1:2] == ["adapt"]:  # metarun adapt RUN support=... query=...: a new task
        from metarun.adapt import main as adapt

        sys.exit(adapt(sys.argv[2:]))
    register_configs()
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # under torchrun only rank 0 writes the run folder (metarun.distributed)
        scratch = Path(tempfile.gettempdir()) / f"metarun-rank{rank}"
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
        sys.argv += [f"hydra.run.dir={scratch}"]
    resume = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("resume=")), "")
    if rank == 0:
        _claim_run_folder(sys.argv[1:])
    if (
        rank == 0
        and resume
        and "," not in resume
        and not any(arg.startswith("hydra.run.dir=") for arg in sys.argv[1:])
    ):
        # A resumed run logs into its own folder's metarun.log, and Hydra makes no new one.
        sys.argv += [f"hydra.run.dir={resume}", "hydra.output_subdir=null"]
    if any(arg.startswith("test=") for arg in sys.argv[1:]):
        sys.argv[1:] = [_carried(arg) for arg in sys.argv[1:]]
    if "-m" in sys.argv[1:] or "--multirun" in sys.argv[1:]:  # folders named by what differs
        sys.argv += sweep_overrides(sys.argv[1:])
    _main()
    if _sweep_failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
