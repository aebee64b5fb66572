"""Self-describing checkpoints: state dicts, optimiser, iteration, RNG states, best
validation and the resolved config. Written atomically; loaded with ``weights_only``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metarun.data.files import atomic_torch_save

LAST, BEST = "last.pt", "best.pt"


@dataclass
class TrainState:
    """What the training loop needs to continue exactly where it stopped."""

    iteration: int = 0
    best_val_acc: float = -math.inf  # the best validation score (negated MSE for regression)
    best_iteration: int = -1
    train_seconds: float = 0.0
    budget_reached: bool = False  # training ended at train.max_minutes


def save(
    path: Path,
    *,
    algo: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    sampler_state: torch.Tensor,
    config: dict,
) -> None:
    atomic_torch_save(
        {
            "algo": algo.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "grad_scaler": scaler.state_dict(),
            "iteration": state.iteration,
            "best_val_acc": state.best_val_acc,
            "best_iteration": state.best_iteration,
            "train_seconds": state.train_seconds,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "train_sampler": sampler_state,
            },
            "config": config,
        },
        path,
    )


def restore(
    ckpt: dict[str, Any],
    *,
    algo: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    sampler: Any,
) -> TrainState:
    """Puts everything :func:`save` wrote back in place, RNG states included, so training
    continues exactly as if it had not stopped; returns the loop's state."""
    algo.load_state_dict(ckpt["algo"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["grad_scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    sampler.set_state(ckpt["rng"]["train_sampler"])
    return TrainState(
        ckpt["iteration"], ckpt["best_val_acc"], ckpt["best_iteration"], ckpt["train_seconds"]
    )


def load(path: Path) -> dict[str, Any]:
    """Reads a checkpoint; the error names the file when it is missing or damaged."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"checkpoint {path} is unreadable ({err}); it may be truncated") from err


def load_backbone(backbone: torch.nn.Module, path: Path) -> None:
    """Loads into ``backbone`` the backbone weights of a metarun checkpoint (any
    algorithm's: ProtoNet keeps them under ``backbone.``, MAML under ``model.0.``)."""
    state = load(path.expanduser())["algo"]
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
