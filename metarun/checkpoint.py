"""Self-describing checkpoints: state dicts, optimiser, iteration, RNG states, best
validation and the resolved config. Written atomically; loaded with ``weights_only``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metarun.data.files import atomic_torch_save

LAST, BEST = "last.pt", "best.pt"


@dataclass
class TrainState:
    """What the training loop needs to continue exactly where it stopped."""

    iteration: int = 0
    best_val_acc: float = -1.0
    best_iteration: int = -1
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


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


def load(path: Path) -> dict[str, Any]:
    """Reads a checkpoint; the error names the file when it is missing or damaged."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"checkpoint {path} is unreadable ({err}); it may be truncated") from err
