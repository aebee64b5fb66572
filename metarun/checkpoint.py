"""Self-describing checkpoints for both recipes: state dicts, optimiser, iteration, RNG
states and the resolved config, written atomically and read back without running code.

A checkpoint is a dict written by :func:`save`: ``format``, ``recipe``
(``meta_learning`` or ``continual``), ``iteration``, ``config`` (the resolved config),
``rng`` (the torch and CUDA generator states), ``input_shape`` and ``task`` (what the
learner takes, so a trained model can be rebuilt without its data), plus each recipe's
own state dicts (``algo``, ``optimizer``, ... or ``method``, ``stream``). It is read with
``torch.load(weights_only=True)``, which builds tensors and plain containers only, and its
config goes through :func:`saved_config`, which refuses any ``_target_`` that is not one
of metarun's own classes or functions: a checkpoint cannot make metarun run code.
"""

from __future__ import annotations

import errno
import importlib
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from metarun.data.files import atomic_torch_save, stale_temporary_files
from metarun.errors import CheckpointError, ConfigError

LAST, BEST = "last.pt", "best.pt"
FORMAT = 2  # 1: meta-learning checkpoints before the run scaffold of issue 17 (still read)


def rng_state() -> dict[str, Any]:
    """The global torch generator's state and, where CUDA is up, every device's."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Puts back what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    path: Path,
    *,
    recipe: str,
    iteration: int,
    config: dict,
    input_shape: tuple[int, ...],
    task: str,
    **state: Any,
) -> None:
    """Writes a checkpoint of ``recipe`` at ``iteration`` to ``path`` atomically (the file
    that was there stays until the new one is complete on disk).

    Args:
        path: ``<run>/checkpoints/last.pt`` or ``best.pt``.
        recipe: ``meta_learning`` or ``continual``.
        iteration: the x-axis of the run's metrics at this point.
        config: the resolved config (plain containers).
        input_shape: the shape of one input, e.g. ``(1, 28, 28)``.
        task: the task kind's name (``classification`` or ``regression``).
        state: the recipe's state dicts and counters (tensors and plain containers only).

    Raises:
        CheckpointError: the write failed (disk full, no permission); nothing changed.
    """
    payload = {
        "format": FORMAT,
        "recipe": recipe,
        "iteration": iteration,
        "config": config,
        "input_shape": list(input_shape),
        "task": task,
        "rng": rng_state(),
        **state,
    }
    try:
        atomic_torch_save(payload, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            cause = f"the disk is full ({free / 2**20:.1f} MiB free)"
        else:
            cause = f"{type(err).__name__}: {err.strerror or err}"
        previous = (
            f"the previous {path.name} is kept" if path.exists() else f"no {path.name} existed"
        )
        raise CheckpointError(
            f"could not write the checkpoint {path}: {cause}; {previous}. Free some space "
            f"(or fix the folder's permissions), then continue with `metarun resume=` on the "
            f"run folder."
        ) from err


def load(path: Path) -> dict[str, Any]:
    """Reads a checkpoint (tensors and plain containers only: nothing in it can run code).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, damaged or not a metarun checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        size = path.stat().st_size
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({size} bytes): it is truncated or damaged, or "
            f"not a metarun checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}). "
            f"Use the run's other checkpoint (best.pt or last.pt) or train again."
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a metarun checkpoint (it holds no state dicts).")
    return ckpt


def pick(target: Path) -> Path:
    """The checkpoint a trained run is used from: ``target`` itself for a ``.pt`` file, else
    the run folder's ``checkpoints/best.pt`` (the best validation), else ``last.pt``.

    Raises:
        FileNotFoundError: neither exists.
    """
    target = Path(target).expanduser().resolve()
    if target.is_file():
        return target
    if not target.is_dir():
        raise FileNotFoundError(
            f"{target} does not exist: give a run folder that metarun wrote, or a checkpoint "
            f"file (.pt)."
        )
    for name in (BEST, LAST):
        if (target / "checkpoints" / name).is_file():
            return target / "checkpoints" / name
    raise FileNotFoundError(
        f"{target} has no checkpoints/{BEST} or checkpoints/{LAST}: give a run folder that "
        f"metarun wrote, or a checkpoint file (.pt)."
    )


def saved_config(ckpt: dict[str, Any], path: Path | str = "the checkpoint") -> DictConfig:
    """The config saved in ``ckpt``, once every ``_target_`` in it is checked to be one of
    metarun's own classes or functions; interpolations are resolved (they only read values).

    Raises:
        ConfigError: a ``_target_`` outside metarun, named with its key.
    """
    if "config" not in ckpt:
        raise CheckpointError(f"{path} is not a metarun checkpoint: it holds no config.")
    cfg = OmegaConf.create(ckpt["config"])
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    check_targets(cfg, f"the config saved in {path}")
    return cfg


def check_targets(node: Any, source: str, key: str = "") -> None:
    """Refuses a ``_target_`` anywhere in ``node`` that does not name a class or function
    defined in metarun (checked by importing only ``metarun.*`` modules)."""
    if isinstance(node, DictConfig) or isinstance(node, dict):
        for name, value in node.items():
            where = f"{key}.{name}" if key else str(name)
            if name == "_target_" and not _is_metarun_object(value):
                raise ConfigError(
                    f"{source} has {where}={value!r}, which is not one of metarun's own "
                    f"classes: a saved config may only build metarun's objects. Refusing to "
                    f"load it; if you trust this file, copy the values you need into a new "
                    f"run's overrides instead."
                )
            check_targets(value, source, where)
    elif isinstance(node, list) or OmegaConf.is_list(node):
        for i, value in enumerate(node):
            check_targets(value, source, f"{key}[{i}]")


def _is_metarun_object(target: Any) -> bool:
    if not isinstance(target, str) or not target.startswith("metarun."):
        return False
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        defined_in = getattr(obj, "__module__", None) or ""
        return callable(obj) and (defined_in == "metarun" or defined_in.startswith("metarun."))
    return False


def clean_stale(folder: Path) -> list[Path]:
    """Removes the temporary files of checkpoint writes that a killed process left in
    ``folder``; returns them. Call it only while owning the run folder."""
    stale = stale_temporary_files(folder)
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_backbone(backbone: torch.nn.Module, path: Path) -> None:
    """Loads into ``backbone`` the backbone weights of a metarun checkpoint (any
    algorithm's: ProtoNet keeps them under ``backbone.``, MAML under ``model.0.``; or a
    continual method's, e.g. a pretrained or OML encoder after its meta-training)."""
    ckpt = load(Path(path).expanduser())
    state = ckpt.get("algo", ckpt.get("method"))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no algorithm or method weights.")
    wanted = backbone.state_dict()
    first = next(iter(wanted))
    prefixes = [key[: -len(first)] for key in state if key.endswith(first)]
    prefixes = [p for p in prefixes if all(p + k in state for k in wanted)]
    if len(prefixes) != 1:
        raise ValueError(
            f"cannot find the backbone in {path}: "
            + (
                f"{len(prefixes)} candidate prefixes ({prefixes})."
                if prefixes
                else f"no key ends with {first!r}, so it was written with another model=."
            )
            + " algo.encoder_checkpoint needs a checkpoint of a run with the same model= "
            "(and model settings) as this one."
        )
    prefix = prefixes[0]
    try:
        backbone.load_state_dict({k: state[prefix + k] for k in wanted})
    except RuntimeError as err:
        raise ValueError(
            f"the backbone in {path} does not fit this run's model ({err}). Use the same "
            f"model= and model settings (e.g. model.hidden) as the run that wrote it."
        ) from err
