"""``logger=wandb``: Weights & Biases, offline by default (``pip install 'metarun[wandb]'``).

The run is written under ``<run folder>/wandb/`` and never leaves the machine unless
``logger.wandb.mode=online`` (which needs ``wandb login``); an offline run is uploaded
later with ``wandb sync <run folder>/wandb/offline-run-*``. A resumed metarun run
continues the same W&B run (its id is kept in ``<run folder>/wandb/metarun_run_id``).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class WandbLogger:
    """Scalars with ``run.log(values, step=step)``; hyperparameters into the run's config,
    final metrics into its summary (and at the last step, unless logged as scalars);
    figures as ``wandb.Image``, text as preformatted HTML.

    Args:
        project: the W&B project.
        entity: the W&B team or user (None: the default of the login).
        mode: ``offline`` (default), ``online`` or ``disabled``.
        tags: tags of the run.
    """

    def __init__(
        self,
        run_dir: Path,
        start_step: int = 0,
        run_name: str | None = None,
        project: str = "metarun",
        entity: str | None = None,
        mode: str = "offline",
        tags: list[str] | None = None,
    ):
        import wandb

        self._wandb = wandb
        folder = Path(run_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "metarun_run_id"
        run_id = id_file.read_text().strip() if start_step and id_file.exists() else None
        self.run = wandb.init(
            project=project,
            entity=entity,
            dir=str(run_dir),
            mode=mode,
            name=run_name or Path(run_dir).name,
            id=run_id,
            resume="allow" if run_id else None,
            tags=list(tags or []),
            reinit="create_new",  # several runs of a sweep in one process
            settings=wandb.Settings(
                console="off",  # metarun's log and progress bar stay as they are
                x_disable_stats=True,  # no system-metrics sampling
                silent=True,
                save_code=False,
                x_save_requirements=False,
            ),
        )
        id_file.write_text(self.run.id + "\n")
        self.tags: set[str] = set()
        self.last_step = start_step

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)
        self.tags.update(values)
        self.last_step = max(self.last_step, step)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.run.config.update(dict(hparams), allow_val_change=True)
        # A final metric not logged as a scalar yet is logged at the last step.
        self.log_scalars(self.last_step, {k: v for k, v in metrics.items() if k not in self.tags})
        self.run.summary.update(dict(metrics))

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        from metarun.loggers import image_hwc

        self.run.log({tag: self._wandb.Image(image_hwc(figure))}, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def flush(self) -> None:
        pass  # the W&B service process writes as it receives

    def close(self) -> None:
        self.run.finish()
        # wandb 0.31 returns from finish() before an offline run's file is written; its
        # service writes it when shut down (the next run of a sweep starts a new one).
        self._wandb.teardown()
