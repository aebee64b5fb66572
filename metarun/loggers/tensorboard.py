"""``logger=tensorboard``: event files in the run folder (``tensorboard --logdir outputs``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TensorBoardLogger:
    """Scalars, hparams (the HPARAMS tab), images and markdown text in TensorBoard event
    files under ``run_dir``. On resume (``start_step`` > 0) events after that step are
    purged, so the curves read as if the run had never stopped."""

    def __init__(self, run_dir: Path, start_step: int = 0, run_name: str | None = None):
        from torch.utils.tensorboard import SummaryWriter  # heavy: only when a run starts

        self.writer = SummaryWriter(str(run_dir), purge_step=start_step + 1 if start_step else None)
        self.tags: set[str] = set()
        self.last_step = start_step

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.tags.update(values)
        self.last_step = max(self.last_step, step)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The HPARAMS tab's row of this run: its columns are ``hparams`` and the metric
        tags, whose values TensorBoard reads from the run's scalars; a metric not logged
        as a scalar yet is logged at the last step. (``SummaryWriter.add_hparams`` would
        write a second run and put each metric at step 0.)"""
        from torch.utils.tensorboard.summary import hparams as summaries

        writer = self.writer._get_file_writer()
        for summary in summaries(dict(hparams), dict(metrics)):
            writer.add_summary(summary)
        self.log_scalars(self.last_step, {k: v for k, v in metrics.items() if k not in self.tags})

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        from metarun.loggers import image_hwc

        self.writer.add_image(tag, image_hwc(figure), step, dataformats="HWC")

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)  # TensorBoard's text plugin renders markdown

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
