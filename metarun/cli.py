"""``metarun``: compose the config with Hydra and hand it to :func:`metarun.runner.run`.

metarun algo=maml dataset=omniglot
metarun experiment=protonet_omniglot_5w1s
metarun --multirun algo=maml,protonet seed=0,1
metarun resume=outputs/runs/2026-11-22/10-00-00
"""

from __future__ import annotations

import time

_STARTED_AT = time.perf_counter()

import logging  # noqa: E402
import sys  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from metarun.config import register_configs  # noqa: E402

log = logging.getLogger("metarun")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def _main(cfg: DictConfig) -> float:
    from metarun.runner import RunInterrupted, run

    hydra_cfg = HydraConfig.get()
    if cfg.resume:
        others = [o for o in hydra_cfg.overrides.task if not o.startswith("resume=")]
        if others:
            _fail(
                f"resume continues a run with the config saved in its checkpoint; drop the "
                f"other overrides ({' '.join(others)}) or start a new run without resume."
            )
    try:
        summary = run(cfg, hydra_cfg.runtime.output_dir, started_at=_STARTED_AT)
    except RunInterrupted as err:
        _fail(str(err), code=130)
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        # In a sweep, one failed job must not stop the others.
        if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
            log.error("job failed: %s", message)
            return float("nan")
        _fail(message)
    return summary["val/acc"]


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
    register_configs()
    _main()


if __name__ == "__main__":
    main()
