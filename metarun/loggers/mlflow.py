"""``logger=mlflow``: MLflow tracking, by default into a file store in the run folder
(``<run folder>/mlruns``, ``pip install 'metarun[mlflow]'``); ``mlflow ui
--backend-store-uri <run folder>/mlruns`` shows it. ``logger.mlflow.tracking_uri`` points
elsewhere (a server, ``sqlite:///...``). A resumed metarun run continues the same MLflow
run (its id is kept in ``<run folder>/mlruns/metarun_run_id``).

MLflow 3 keeps its file store in maintenance mode and refuses it unless
``MLFLOW_ALLOW_FILE_STORE=true``: for a ``file:`` URI this backend sets that variable (if
unset), as the file store is what it was asked for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class MLflowLogger:
    """Scalars as MLflow metrics at their step, hyperparameters as params, final metrics
    as metrics (at the last step, unless logged as scalars already), figures with
    ``log_image`` (at their step), text as artifacts ``text/<tag>/<step>.md``.

    Args:
        experiment_name: the MLflow experiment (created when missing).
        tracking_uri: where to track; None: ``file:`` + ``<run folder>/mlruns``.
    """

    def __init__(
        self,
        run_dir: Path,
        start_step: int = 0,
        run_name: str | None = None,
        experiment_name: str = "metarun",
        tracking_uri: str | None = None,
    ):
        folder = Path(run_dir).resolve() / "mlruns"
        uri = tracking_uri or folder.as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(experiment_name)
        )
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "metarun_run_id"
        if start_step and id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_name or Path(run_dir).name)
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n")
        self.last_step = start_step
        self.tags: set[str] = set()

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(v), now, step) for tag, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.tags.update(values)
        self.last_step = max(self.last_step, step)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in hparams.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        # A final metric not logged as a scalar yet is logged at the last step.
        self.log_scalars(self.last_step, {k: v for k, v in metrics.items() if k not in self.tags})

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        from metarun.loggers import image_hwc

        self.client.log_image(self.run_id, image_hwc(figure), key=tag, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"text/{tag}/{step}.md")

    def flush(self) -> None:
        pass  # the client writes each call through

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
