"""``logger=csv``: ``metrics.csv`` in the run folder, one row per step, for any tool that
reads a table (pandas, a spreadsheet, R).

The first column is ``step``; each tag gets a column when it is first logged (columns in
that order), and a row holds every value logged at its step, with empty cells for the tags
not logged then. When a new tag appears after rows were written, the file is rewritten
with the wider header (a few times in a run: validation and test tags come later).
Steps come in order (several calls may log at one step); a call for an earlier step starts
another row for it. Values are written in full precision (Python's ``repr``); ``nan`` and
``inf`` as such.
Figures go to ``figures/<tag>/<step>.png``, text to ``text/<tag>/<step>.md``, the
hyperparameters and final metrics to ``hparams.json`` (a final metric that was not logged
as a scalar is also added at the last step, as the other backends do).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_csv(path: Path | str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of a ``metrics.csv``, empty cells left out."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = int(row.pop("step"))
        for tag, cell in row.items():
            if cell != "":
                series.setdefault(tag, []).append((step, float(cell)))
    return series


class CSVLogger:
    """See the module docstring. ``filename`` is relative to ``run_dir``."""

    def __init__(
        self,
        run_dir: Path,
        start_step: int = 0,
        run_name: str | None = None,
        filename: str = "metrics.csv",
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.columns: list[str] = []
        self.row: dict[str, float] = {}  # the values of the current step, not yet final
        self.step: int | None = None
        self.row_offset: int | None = None  # where the current step's row starts on disk
        if self.path.exists() and start_step > 0:  # resume: keep the rows up to the step
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = [c for c in reader.fieldnames or [] if c != "step"]
                kept = [r for r in reader if int(r["step"]) <= start_step]
            self._rewrite(kept)
        else:
            self._rewrite([])
        self.file = open(self.path, "a", newline="")

    def _line(self, row: Mapping[str, Any]) -> str:
        buffer = io.StringIO()
        cells = [row.get("step", "")] + [_cell(row.get(c, "")) for c in self.columns]
        csv.writer(buffer, lineterminator="\n").writerow(cells)
        return buffer.getvalue()

    def _rewrite(self, rows: list[Mapping[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            f.write(self._line({"step": "step", **{c: c for c in self.columns}}))
            for row in rows:
                f.write(self._line(row))
        os.replace(tmp, self.path)

    def _existing_rows(self) -> list[dict[str, str]]:
        self.file.flush()
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _write_row(self) -> None:
        """Writes (or rewrites) the current step's row at the end of the file."""
        if self.step is None:
            return
        new = [tag for tag in self.row if tag not in self.columns]
        if new:  # a wider header: rewrite the rows written so far
            kept = self._existing_rows()
            if self.row_offset is not None:
                kept = kept[:-1]  # the current step's row is written again below
            self.file.close()
            self.columns += new
            self._rewrite(kept)
            self.file = open(self.path, "a", newline="")
            self.row_offset = None
        if self.row_offset is not None:  # this step's row is on disk: replace it
            self.file.flush()
            self.file.truncate(self.row_offset)
        self.file.seek(0, os.SEEK_END)
        self.row_offset = self.file.tell()
        self.file.write(self._line({"step": self.step, **self.row}))

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        if step != self.step:
            if self.row and self.row_offset is None:
                self._write_row()
            self.step, self.row, self.row_offset = step, {}, None
        self.row.update({tag: float(v) for tag, v in values.items()})
        if self.row_offset is not None:  # already flushed once: keep the file current
            self._write_row()

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        # A final metric not logged as a scalar yet is logged at the last step.
        unseen = {k: v for k, v in metrics.items() if k not in self.columns and k not in self.row}
        if unseen:
            self.log_scalars(self.step or 0, unseen)
        body = {"hparams": dict(hparams), "metrics": dict(metrics)}
        (self.run_dir / "hparams.json").write_text(json.dumps(body, indent=2, default=str) + "\n")

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        from PIL import Image

        from metarun.loggers import image_hwc

        path = self.run_dir / "figures" / tag / f"{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_hwc(figure)).save(path)

    def log_text(self, tag: str, text: str, step: int) -> None:
        path = self.run_dir / "text" / tag / f"{step}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    def flush(self) -> None:
        if self.row and self.row_offset is None:
            self._write_row()
        self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.flush()
            self.file.close()


def _cell(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
