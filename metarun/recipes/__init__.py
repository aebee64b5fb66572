"""The two recipes of a run, siblings on one scaffold (:mod:`metarun.run_control`):

- :mod:`metarun.recipes.meta_learning`: meta-train an algorithm on episodes, validate, test;
- :mod:`metarun.recipes.continual`: learn a stream of tasks in order (lifelong learning),
  after a meta-training phase for the meta-continual methods.

:func:`run` picks the recipe a config asks for (``scenario=`` set: a stream) and runs it;
the command line and ``metarun.run`` both come through here. Neither recipe imports the
other.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from metarun.errors import ConfigError

CONTINUAL_METHODS = "naive, joint, er, ewc, oml, lamaml"
SCENARIOS = "split_mnist, split_mnist_task_il, permuted_mnist, omniglot_continual, sinusoid_stream"


def recipe_for(cfg: DictConfig) -> str:
    """``continual`` or ``meta_learning``: what ``cfg`` (or, with ``resume=``, the config
    saved in that run) asks for. A scenario with a meta-learning algorithm, or a continual
    method without a scenario, is refused with the fix."""
    if cfg.get("resume"):
        from metarun import checkpoint

        last = Path(cfg.resume).expanduser() / "checkpoints" / checkpoint.LAST
        saved = checkpoint.load(last)
        cfg = checkpoint.saved_config(saved, last)
    from metarun.checks import target_class
    from metarun.continual.methods import ContinualLearner

    algo = target_class(cfg.algo)
    continual = isinstance(algo, type) and issubclass(algo, ContinualLearner)
    has_scenario = cfg.get("scenario") is not None
    name = algo.__name__
    if has_scenario and not continual:
        raise ConfigError(
            f"a scenario (a task stream) was given with the meta-learning algorithm {name}, "
            f"which cannot learn one. Use a continual method (algo=one of "
            f"{CONTINUAL_METHODS}), or drop scenario= to meta-train {name}."
        )
    if continual and not has_scenario:
        raise ConfigError(
            f"algo {name} is a continual-learning method and needs a task stream: add "
            f"scenario=one of {SCENARIOS} (or experiment=split_mnist_class_il_er, ...), or "
            f"pick a meta-learning algorithm (maml, fomaml, protonet)."
        )
    return "continual" if continual else "meta_learning"


def run(
    cfg: DictConfig,
    run_dir: Path | str | None = None,
    started_at: float | None = None,
    resume_keys: Sequence[str] = (),
) -> dict[str, float]:
    """Runs the recipe ``cfg`` asks for; returns its summary metrics (``val/acc`` first).

    Args:
        cfg: a composed config (``configs/config.yaml`` with overrides).
        run_dir: the run folder; a new ``outputs/runs/<date>/<time>`` when omitted (unused
            when ``cfg.resume`` names the run to continue).
        started_at: ``time.perf_counter()`` at process start (reported start-up time).
        resume_keys: with ``cfg.resume``, the keys whose values in ``cfg`` replace the
            saved ones (the recipe says which it allows).
    """
    if run_dir is None and not cfg.get("resume"):
        run_dir = Path("outputs/runs") / time.strftime("%Y-%m-%d/%H-%M-%S")
    if recipe_for(cfg) == "continual":
        from metarun.recipes import continual as recipe
    else:
        from metarun.recipes import meta_learning as recipe
    from hydra.errors import InstantiationException

    try:
        return recipe.run(cfg, run_dir, started_at=started_at, resume_keys=resume_keys)
    except InstantiationException as err:  # a dataset or model that failed: its own error
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None


def retest(cfg: DictConfig, overrides: Sequence[str], run_dir: Path | str) -> None:
    """``metarun test=RUN``: tests a trained run again into the new folder ``run_dir``,
    with the recipe that trained it (a meta-learning run on more or other test episodes; a
    meta-continual benchmark run on its streams again, from its meta-trained state).

    Raises:
        FileNotFoundError: no checkpoint at ``cfg.test``.
    """
    from metarun import checkpoint

    try:
        path = checkpoint.pick(Path(cfg.test))
    except FileNotFoundError:  # the meta-learning test checks the options, then says so
        path = None
    saved = None if path is None else checkpoint.load(path)
    if saved is not None and saved.get("recipe") == "continual":
        from metarun.recipes import continual

        continual.retest(cfg, path, saved, overrides, run_dir)
    else:
        from metarun.recipes import meta_learning

        meta_learning.retest(cfg, overrides, run_dir)
