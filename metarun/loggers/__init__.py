"""Where a run's numbers, figures and text go: one small interface, several backends.

``logger=`` picks the backends (``configs/logger``): ``tensorboard`` (the default),
``csv``, ``wandb`` (offline), ``mlflow`` (a file store in the run folder), or several at
once, ``logger=[tensorboard,csv]``. :func:`build_loggers` makes the configured backends for
a run folder and returns them as one :class:`Loggers`, which hands every call to each.
Every backend but TensorBoard is an optional extra, imported only when it is built;
:func:`check_loggers` says which extra is missing before a run loads any data.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

# The package each backend imports and the extra that installs it.
REQUIRES = {
    "TensorBoardLogger": ("tensorboard", "metarun"),
    "CSVLogger": (None, "metarun"),
    "WandbLogger": ("wandb", "metarun[wandb]"),
    "MLflowLogger": ("mlflow", "metarun[mlflow]"),
}


class Logger(Protocol):
    """What every backend does. ``step`` is the run's iteration (update count)."""

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Records ``values`` (tags such as ``train/loss``) at ``step``."""

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Records the run's hyperparameters (flat: ``{"algo": "maml", "train.meta_lr":
        0.001}``) and its final metrics (``{"val/acc": ..., "test/acc": ...}``), once."""

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        """Records a figure: a matplotlib ``Figure`` or an image, ``(3, H, W)`` uint8."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Records text; markdown (tables) where the backend renders it."""

    def flush(self) -> None:
        """Writes everything recorded so far to disk."""

    def close(self) -> None:
        """Flushes and releases the backend; nothing may be logged after."""


def image_hwc(figure: Any) -> Any:
    """A figure or a ``(3, H, W)`` image (tensor or array) as a ``(H, W, 3)`` uint8 array."""
    import numpy as np

    if hasattr(figure, "savefig"):  # a matplotlib Figure
        from metarun.figures import to_rgb

        return to_rgb(figure).transpose(1, 2, 0)
    array = np.asarray(figure.detach().cpu() if hasattr(figure, "detach") else figure)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"an image must be (3, H, W), got {array.shape}")
    return np.ascontiguousarray(array.transpose(1, 2, 0)).astype(np.uint8)


class Loggers:
    """Several backends as one :class:`Logger`: each call goes to each backend, in order."""

    def __init__(self, backends: list[Logger]):
        self.backends = backends

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for backend in self.backends:
            backend.log_scalars(step, values)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        for backend in self.backends:
            backend.log_hparams(hparams, metrics)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        for backend in self.backends:
            backend.log_figure(tag, figure, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for backend in self.backends:
            backend.log_text(tag, text, step)

    def flush(self) -> None:
        for backend in self.backends:
            backend.flush()

    def close(self) -> None:
        """Closes every backend, even when one of them fails (the first error is raised)."""
        error: BaseException | None = None
        for backend in self.backends:
            try:
                backend.close()
            except Exception as err:  # noqa: BLE001 - close the others, then raise
                error = error or err
        if error is not None:
            raise error


def _class_name(node: Any) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def check_loggers(cfg: Mapping[str, Any] | None) -> None:
    """Refuses a ``logger=`` choice whose package is not installed, naming the extra, before
    the run starts.

    Raises:
        ValueError: a backend's package is missing, or a ``logger`` entry is not a backend.
    """
    for name, node in (cfg or {}).items():
        if node is None:
            continue
        cls = _class_name(node)
        if cls not in REQUIRES:
            raise ValueError(
                f"logger.{name}: {node.get('_target_')!r} is not a metarun logger; choose "
                f"logger= tensorboard, csv, wandb or mlflow (or a list: [tensorboard,csv])"
            )
        package, extra = REQUIRES[cls]
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"logger={name} needs the package {package}, which is not installed: "
                f"pip install '{extra}' (or drop {name} from logger=)"
            )


def build_loggers(
    cfg: Mapping[str, Any] | None,
    run_dir: Path | str,
    start_step: int = 0,
    run_name: str | None = None,
) -> Loggers:
    """The backends of ``cfg`` (the config's ``logger`` node: ``{name: backend config}``)
    for ``run_dir``. ``start_step`` > 0 resumes: what a backend recorded after that step
    is dropped where it can be (TensorBoard, CSV). ``run_name`` names the run in W&B and
    MLflow (default: the run folder's name)."""
    from hydra.utils import instantiate

    check_loggers(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    backends: list[Logger] = []
    try:
        for node in (cfg or {}).values():
            if node is None:
                continue
            make = instantiate(node)  # a partial: the backend's class with its options
            backends.append(make(run_dir=run_dir, start_step=start_step, run_name=run_name))
    except BaseException:
        Loggers(backends).close()
        raise
    return Loggers(backends)


def __getattr__(name: str) -> Any:  # metarun.loggers.CSVLogger, ... imported when used
    modules = {
        "TensorBoardLogger": "tensorboard",
        "CSVLogger": "csv",
        "WandbLogger": "wandb",
        "MLflowLogger": "mlflow",
    }
    if name in modules:
        module = importlib.import_module(f"metarun.loggers.{modules[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'metarun.loggers' has no attribute {name!r}")
