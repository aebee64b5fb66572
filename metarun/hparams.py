"""What tells one run from another in a table of runs (TensorBoard's HPARAMS tab, W&B's
config, MLflow's params, ``hparams.json``): a few named values and the config values the
command line changed, next to the run's final metrics.

Both recipes end with one call, :func:`log_run`. The hyperparameters of a run
(:func:`run_hparams`) are

- the config options the run was composed from, by the names a user types: ``algo``,
  ``dataset`` (meta-learning), ``model``, ``scenario`` (task streams), and ``experiment``,
  ``debug`` or ``sweep`` when chosen, e.g. ``{"algo": "maml", "dataset": "omniglot"}``,
  and ``seed``;
- every other value given on the command line (a sweep's swept values and the budget it
  shares, ``train.meta_lr=0.003``), flat (``"train.meta_lr": 0.003``) and as the run
  used it (after a ``resume=`` that changed it, the new value);
- never a machine's setting: data and cache folders, dataset paths, ``hardware``, logging
  and checkpoint intervals, the loggers (:data:`MACHINE_KEYS`).

The options and the command line are read from the run folder's ``.hydra/hydra.yaml`` and
``.hydra/overrides.yaml``, which Hydra writes when a run starts and a resumed run keeps (a
run tested again, ``metarun test=RUN``, takes the options of the run it tests). A run
started from Python without Hydra has no such record: its named values are then the class
(or function) names of its config's ``_target_`` s (``MAML``, ``Omniglot``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MACHINE_KEYS = (
    "data_dir",
    "cache_dir",
    "dataset.root",
    "dataset.cache_dir",
    "dataset.download",
    "dataset.mirror",
    "scenario.root",
    "scenario.cache_dir",
    "scenario.download",
    "resume",
    "test",
    "hardware",
    "log_every",
    "checkpoint_every",
    "logger",
)
"""Config keys that do not change what a run learns or how it is tested (a prefix covers
its sub-keys); ``metarun report`` groups runs over them too."""

PATH_KEYS = ("dataset.path", "dataset.split_dir")
"""Paths on this machine that name the user's own data (``dataset=tensors``,
``dataset=folder``): they change what a run learns, but are no column of a table."""

NAMED = ("algo", "dataset", "model", "scenario", "experiment", "debug", "sweep")
"""Config groups named by their option in every run's hyperparameters (when chosen)."""

Value = str | int | float
"""What every backend takes: booleans become ``"true"``/``"false"``, lists JSON text."""


def _covered(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _plain(value: Any) -> Value:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return value
    if value is None:
        return "null"
    return json.dumps(value, default=str)


def _select(config: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted ``key`` in a nested mapping."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _hydra_record(run_dir: Path | None) -> tuple[dict[str, Any], list[str]] | None:
    """The config choices and the command line's overrides that Hydra saved in the run
    folder, or None when it saved none."""
    if run_dir is None or not (Path(run_dir) / ".hydra" / "hydra.yaml").is_file():
        return None
    from omegaconf import OmegaConf  # reads YAML; nothing in it is run

    folder = Path(run_dir) / ".hydra"
    hydra = OmegaConf.load(folder / "hydra.yaml")
    choices = OmegaConf.to_container(hydra.hydra.runtime.choices, resolve=False)
    overrides: list[str] = []
    if (folder / "overrides.yaml").is_file():
        listed = OmegaConf.to_container(OmegaConf.load(folder / "overrides.yaml"))
        overrides = [str(o) for o in listed]
    return dict(choices), overrides


def _target_name(node: Any) -> str | None:
    if isinstance(node, Mapping) and node.get("_target_"):
        return str(node["_target_"]).rsplit(".", 1)[-1]
    return None


def run_hparams(
    config: Mapping[str, Any], run_dir: Path | None = None, tested: Path | None = None
) -> dict[str, Value]:
    """The hyperparameters of a run (see the module docstring), in this order: the named
    options, ``seed``, then the command line's other values.

    Args:
        config: the run's resolved config (``OmegaConf.to_container(cfg, resolve=True)``).
        run_dir: the run folder, where Hydra saved the choices and the command line.
        tested: for a run that tests another again (``test=``), the tested run's folder:
            the options are its, the command line is both runs'.
    """
    stream = config.get("scenario") is not None
    record = _hydra_record(tested or run_dir)
    if record is not None and tested is not None:
        again = _hydra_record(run_dir)
        record = (record[0], record[1] + (again[1] if again is not None else []))
    hparams: dict[str, Value] = {}
    for group in NAMED:
        if group == "dataset" and stream:  # a stream's data is its scenario's
            continue
        if record is not None:
            name = record[0].get(group)
        else:
            name = _target_name(config.get(group))
        if name not in (None, "null"):
            hparams[group] = str(name)
    hparams["seed"] = _plain(config.get("seed"))
    for override in record[1] if record is not None else []:
        key = override.split("=", 1)[0].lstrip("+~")
        if (
            key.startswith("hydra")
            or key in NAMED
            or key == "seed"
            or _covered(key, MACHINE_KEYS)
            or _covered(key, PATH_KEYS)
        ):
            continue
        found, value = _select(config, key)
        if found and not isinstance(value, Mapping):
            hparams[key] = _plain(value)
    return hparams


def log_run(
    logger: Any,
    config: Mapping[str, Any],
    run_dir: Path,
    tags: Sequence[str],
    tested: Path | None = None,
) -> dict[str, Value]:
    """Logs the run's hyperparameters (:func:`run_hparams`) with its final metrics, the last
    value logged of each of ``tags`` (``val/acc``, ``test/acc``, ``continual/bwt``, ...):
    what TensorBoard's HPARAMS tab shows for them too. ``logger`` is the run's
    :class:`~metarun.metrics.RunLogger`; returns the hyperparameters."""
    hparams = run_hparams(config, run_dir, tested)
    logger.log_hparams(hparams, {tag: logger.latest[tag] for tag in tags if tag in logger.latest})
    return hparams
