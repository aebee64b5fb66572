"""metarun: a config-driven experiment runner for meta-learning and lifelong learning.

``import metarun`` stays light: torch, TensorBoard and the data loaders are imported by the
modules that use them. The Python API loads on first use:

- ``metarun.run(cfg, run_dir=None)``: runs a composed config (either recipe) and returns
  its summary metrics (:func:`metarun.recipes.run`);
- ``metarun.load(run_or_checkpoint)``: a trained run's algorithm, ready to adapt to new
  tasks (:func:`metarun.trained.load`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "run":
        from metarun.recipes import run

        return run
    if name == "load":
        from metarun.trained import load

        return load
    raise AttributeError(f"module 'metarun' has no attribute {name!r}")
