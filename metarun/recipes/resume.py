"""The config a resumed run continues with: the one saved in its ``last.pt``, changed only
where the user asked and the recipe allows (a lower learning rate after a NaN, more
iterations, other hardware)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metarun import checkpoint
from metarun.errors import ConfigError

log = logging.getLogger("metarun")


def resume(
    cfg: DictConfig, run_dir: Path, keys: Sequence[str], allowed: Sequence[str]
) -> tuple[DictConfig, dict[str, Any], dict[str, Any]]:
    """Reads ``run_dir``'s ``last.pt``; returns the config to continue with (see
    :func:`resumed_config`), the checkpoint, and the values that changed."""
    saved = checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)
    resumed, changes = resumed_config(cfg, saved, keys, allowed, run_dir)
    log.info("resuming %s from iteration %d", run_dir, saved["iteration"])
    return resumed, saved, changes


def resumed_config(
    cfg: DictConfig,
    saved: dict[str, Any],
    keys: Sequence[str],
    allowed: Sequence[str],
    run_dir: Path,
    why: str = "resume continues a run with the config saved in its checkpoint",
) -> tuple[DictConfig, dict[str, Any]]:
    """The config saved in ``saved`` (a loaded ``last.pt``), with the value of each of
    ``keys`` taken from ``cfg``; returns it and the values that changed (recorded in
    ``results.json``).

    Raises:
        ConfigError: a key outside ``allowed`` (an exact key, or a group such as
            ``hardware`` that covers its sub-keys); the message starts with ``why``.
    """
    resumed = checkpoint.saved_config(saved, run_dir / "checkpoints" / checkpoint.LAST)
    changes: dict[str, Any] = {}
    for key in keys:
        if not any(key == a or key.startswith(f"{a}.") for a in allowed):
            raise ConfigError(
                f"{why}, so {key} cannot change; only {', '.join(allowed)} can. Start a new "
                f"run to change the rest."
            )
        new, old = OmegaConf.select(cfg, key), OmegaConf.select(resumed, key)
        if isinstance(new, DictConfig):
            new = OmegaConf.to_container(new, resolve=True, enum_to_str=True)
        new = getattr(new, "value", new)
        if new == old:
            continue
        if key in ("data_dir", "cache_dir"):  # the dataset's folders follow ${data_dir}
            for group in ("dataset", "scenario"):
                node = resumed.get(group)
                field = "root" if key == "data_dir" else "cache_dir"
                if isinstance(node, DictConfig) and node.get(field) == old:
                    node[field] = new
        OmegaConf.update(resumed, key, new, merge=False)
        changes[key] = new
    resumed.resume = str(run_dir)
    return resumed, changes
