"""The OmegaConf resolvers that metarun's own configs use (``configs/config.yaml``,
``configs/hydra/help/metarun.yaml``); :func:`register_resolvers` registers them.

``${metarun.run_name:run}`` and ``${metarun.run_name:sweep}`` name run folders so that runs
are told apart at a glance (TensorBoard shows the folder names as run names):

- a single run: the time, then the algorithm and the dataset (or the scenario), e.g.
  ``outputs/runs/2026-11-22/10-00-00_maml_omniglot``; a run tested again (``test=RUN``):
  ``..._test_<the tested run's folder name>``.
- a job of a sweep: the algorithm, the dataset, the overrides that differ between the
  sweep's jobs and the seed, e.g. ``maml,omniglot,seed=0`` or
  ``maml,omniglot,meta_lr=0.001,seed=1``. Overrides that every job shares (the budget:
  ``train.iterations=...``, the data folder, ...) are left out; a key is shortened to its
  last part where that stays unambiguous, a long number to 4 significant digits (then the
  job number is added, ``job=7``, so two jobs can never share a folder).

Which overrides differ: the keys swept on the command line (``algo=maml,protonet``,
``range(...)``, ``choice(...)``), which ``metarun`` finds before Hydra starts and passes to
every job as ``hydra.job.env_set.METARUN_SWEPT_KEYS`` (:func:`sweep_overrides`), and the
keys of ``hydra.sweeper.params`` (an Optuna search space, ``sweep=maml_optuna``).

``${metarun.config_groups:}`` lists the user-facing config groups and their options (the
folders of ``configs/``) for ``metarun --help``.
"""

from __future__ import annotations

import textwrap
from importlib import resources
from typing import Any

SWEPT_KEYS = "METARUN_SWEPT_KEYS"
NAMED_ALWAYS = ("algo", "dataset", "scenario", "seed")  # in every name anyway
MAX_NAME = 100  # characters of a sweep job's folder name, the job number included


def sweep_overrides(args: list[str]) -> list[str]:
    """The Hydra override that tells each job of a ``--multirun`` command which keys the
    sweep varies (``args``: the command line without the program name); none when the
    command sweeps nothing or does not parse (Hydra then reports the error itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    keys = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except HydraException:
            return []
        key = override.key_or_group
        if override.is_sweep_override() and not key.startswith("hydra") and key not in keys:
            keys.append(key)
    if not keys:
        return []
    return [f"++hydra.job.env_set.{SWEPT_KEYS}='{','.join(keys)}'"]


def _short_value(value: str) -> tuple[str, bool]:
    """A value for a folder name, and whether it was shortened."""
    text = value.strip("'\"").replace("/", "-")
    try:
        number = float(text)
    except ValueError:
        return text, False
    if len(text) > 7 and not text.lstrip("-").isdigit():
        short = f"{number:.4g}"
        return short, short != text
    return text, False


def _choice(choices: Any, group: str) -> str | None:
    value = choices.get(group) if choices is not None else None
    return None if value in (None, "null") else str(value).replace("/", "-")


def run_name(kind: str, *, _root_: Any) -> str:
    """``${metarun.run_name:run}`` or ``${metarun.run_name:sweep}``: see the module docs."""
    hydra = _root_.hydra
    choices = hydra.runtime.get("choices")
    algo = _choice(choices, "algo") or "run"
    data = _choice(choices, "scenario") or _choice(choices, "dataset") or "data"
    if kind == "run":
        tested = _root_.get("test")
        if tested:
            return f"test_{str(tested).rstrip('/').rsplit('/', 1)[-1]}"[:80]
        return f"{algo}_{data}"
    if kind != "sweep":
        raise ValueError(f"metarun.run_name takes 'run' or 'sweep', not {kind!r}")
    swept = [k for k in str(hydra.job.env_set.get(SWEPT_KEYS, "")).split(",") if k]
    params = hydra.sweeper.get("params") if "sweeper" in hydra else None
    swept += [str(k) for k in (params or {}) if str(k) not in swept]
    differing = []
    for override in hydra.overrides.task:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if key in swept and key not in NAMED_ALWAYS:
            differing.append((key, value))
    lasts = [key.rsplit(".", 1)[-1] for key, _ in differing]
    parts, shortened = [algo, data], False
    for (key, value), last in zip(differing, lasts, strict=True):
        text, cut = _short_value(value)
        shortened |= cut
        parts.append(f"{last if lasts.count(last) == 1 else key}={text}")
    parts.append(f"seed={_root_.get('seed')}")
    name = ",".join(parts)
    suffix = f",job={hydra.job.num}"
    if len(name) > MAX_NAME:
        return name[: MAX_NAME - len(suffix) - 3] + "..." + suffix
    return name + suffix if shortened else name


def config_groups() -> str:
    """``group: option, option, ...`` for each user-facing config group (the folders of
    ``metarun/configs``), one per line."""
    root = resources.files("metarun.configs")
    lines = []
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if not folder.is_dir() or folder.name in ("hydra", "__pycache__"):
            continue
        options = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        if options:
            text = f"{folder.name}: {', '.join(options)}"
            lines += textwrap.wrap(text, 98, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def register_resolvers() -> None:
    """Registers ``metarun.run_name`` and ``metarun.config_groups`` with OmegaConf (again
    harmlessly: a second call replaces them)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("metarun.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("metarun.config_groups", config_groups, replace=True)
