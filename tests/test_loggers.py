"""``logger=``: every backend writes the same scalars as TensorBoard (read back from the event
files), for real: the CSV file, an MLflow file store and a W&B offline run."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from metarun.config import register_configs
from metarun.loggers import build_loggers, check_loggers
from tests.conftest import CONFIGS

# A run's shape: train values every step, validation every 3rd, the test at the end (new
# tags appearing late), two calls at one step, a NaN, and values that float32 rounds.
STREAM = [
    *[(s, {"train/loss": 1 / s + 0.1234567891, "train/acc": 0.1 * s}) for s in range(1, 4)],
    (3, {"val/acc": 0.4, "val/ci95": 0.05}),
    *[(s, {"train/loss": 1 / s + 0.1234567891, "train/acc": 0.1 * s}) for s in range(4, 7)],
    (6, {"val/acc": 0.55, "val/ci95": 0.04}),
    (6, {"test/acc": 0.61, "test/ci95": float("nan")}),
]


def expected() -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for step, values in STREAM:
        for tag, value in values.items():
            series.setdefault(tag, []).append((step, value))
    series["continual/bwt"] = [(6, -0.25)]  # a final metric: at the last step
    return {tag: sorted(points) for tag, points in series.items()}


def logger_cfg(*names: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"logger=[{','.join(names)}]"])
    return cfg.logger


def write_run(run_dir: Path, *names: str) -> None:
    import numpy as np

    loggers = build_loggers(logger_cfg(*names), run_dir, run_name="test-run")
    try:
        for step, values in STREAM:
            loggers.log_scalars(step, values)
            if step == 2:
                loggers.flush()  # a flush in the middle of a step: its row is completed later
        image = np.zeros((3, 8, 12), dtype=np.uint8)
        image[0] = 255
        loggers.log_figure("stream/accuracy_matrix", image, 6)
        loggers.log_text("stream/accuracy_matrix_table", "| a | b |\n|---|---|\n| 1 | 2 |", 6)
        final = {"test/acc": 0.61, "continual/bwt": -0.25}  # the second one: no scalar yet
        loggers.log_hparams({"algo": "maml", "train.meta_lr": 0.001}, final)
    finally:
        loggers.close()


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if not t.startswith("hparam")]
    return {t: sorted((e.step, e.value) for e in events.Scalars(t)) for t in tags}


def assert_same(got: dict, reference: dict) -> None:
    """Same tags, steps and values (to float32 precision, as TensorBoard stores them)."""
    assert set(got) == set(reference)
    for tag in reference:
        assert [s for s, _ in got[tag]] == [s for s, _ in reference[tag]], tag
        for (_, a), (_, b) in zip(got[tag], reference[tag], strict=True):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6), tag


def test_tensorboard_and_csv_write_the_same_scalars(tmp_path):
    from metarun.loggers.csv import read_csv

    write_run(tmp_path, "tensorboard", "csv")
    tb = tensorboard_scalars(tmp_path)
    assert_same(tb, expected())
    csv_series = read_csv(tmp_path / "metrics.csv")
    assert_same(csv_series, tb)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    # One row per step, columns in the order the tags appeared.
    header = "step,train/loss,train/acc,val/acc,val/ci95,test/acc,test/ci95,continual/bwt"
    assert lines[0] == header
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert lines[6].endswith(",0.55,0.04,0.61,nan,-0.25")
    assert lines[3].endswith(",0.4,0.05,,,")  # step 3: no test values
    hparams = json.loads((tmp_path / "hparams.json").read_text())
    assert hparams == {
        "hparams": {"algo": "maml", "train.meta_lr": 0.001},
        "metrics": {"test/acc": 0.61, "continual/bwt": -0.25},
    }
    assert (tmp_path / "figures" / "stream" / "accuracy_matrix" / "6.png").exists()
    text = tmp_path / "text" / "stream" / "accuracy_matrix_table" / "6.md"
    assert "| 1 | 2 |" in text.read_text()


def test_csv_resume_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    from metarun.loggers.csv import read_csv

    write_run(tmp_path, "csv")
    loggers = build_loggers(logger_cfg("csv"), tmp_path, start_step=4)
    loggers.log_scalars(5, {"train/loss": 9.0})
    loggers.close()
    series = read_csv(tmp_path / "metrics.csv")
    assert series["train/loss"][-2:] == [(4, STREAM[4][1]["train/loss"]), (5, 9.0)]
    assert series["val/acc"] == [(3, 0.4)]  # step 6's validation came after the checkpoint
    assert "test/acc" not in series


@pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="needs mlflow: pip install 'metarun[mlflow]'"
)
def test_mlflow_file_store_holds_the_same_scalars_as_tensorboard(tmp_path):
    from mlflow.tracking import MlflowClient

    write_run(tmp_path, "tensorboard", "mlflow")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("metarun").experiment_id])
    assert run.info.run_name == "test-run" and run.info.status == "FINISHED"
    assert run.data.params == {"algo": "maml", "train.meta_lr": "0.001"}
    series = {
        tag: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        for tag in run.data.metrics
    }
    assert_same(series, tensorboard_scalars(tmp_path))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "text")}
    assert artifacts == {"text/stream"}


def wandb_records(run_dir: Path) -> list:
    """The records of a W&B offline run file: W&B's header (``:W&B``, 2 magic bytes, a
    version byte), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte
    header (CRC-32C, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="needs wandb: pip install 'metarun[wandb]'"
)
def test_wandb_offline_run_holds_the_same_scalars_as_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_run(tmp_path, "tensorboard", "wandb")
    series: dict[str, list[tuple[int, float]]] = {}
    config, summary = {}, {}
    for record in wandb_records(tmp_path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            # The figure and the text are media, flattened into "<tag>/width", ...
            items = {k: v for k, v in items.items() if not k.startswith("stream/accuracy")}
            step = items.pop("_step")
            for tag, value in items.items():
                if not tag.startswith("_") and isinstance(value, (int, float)):
                    series.setdefault(tag, []).append((step, float(value)))
                elif isinstance(value, str) and value.lower() == "nan":
                    series.setdefault(tag, []).append((step, math.nan))
        elif kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "summary":
            summary |= {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.summary.update
            }
    assert_same({t: sorted(p) for t, p in series.items()}, tensorboard_scalars(tmp_path))
    assert config["algo"] == "maml" and config["train.meta_lr"] == 0.001
    assert summary["test/acc"] == 0.61


def test_a_backend_whose_package_is_missing_is_refused_with_the_extra(monkeypatch):
    cfg = logger_cfg("tensorboard", "wandb")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    with pytest.raises(ValueError, match=r"logger=wandb needs the package wandb.*metarun\[wandb\]"):
        check_loggers(cfg)


def test_a_run_writes_the_same_scalars_to_every_configured_logger(data_dir, cache_dir, tmp_path):
    """End to end: ``metarun logger=[tensorboard,csv,mlflow,wandb]``, a tiny run; the CSV
    file, the MLflow file store and the W&B offline run hold TensorBoard's scalars."""
    import os
    import subprocess

    from metarun.loggers.csv import read_csv
    from tests.conftest import tiny_overrides
    from tests.test_cli import METARUN

    names = ["tensorboard", "csv"] + [
        n for n in ("mlflow", "wandb") if importlib.util.find_spec(n) is not None
    ]
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            METARUN,
            *tiny_overrides(data_dir, cache_dir),
            "hardware.num_threads=1",
            f"logger=[{','.join(names)}]",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "WANDB_SILENT": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    tb = tensorboard_scalars(run_dir)
    assert {"train/loss", "train/acc", "val/acc", "test/acc", "perf/tasks_per_s"} <= set(tb)
    assert_same(read_csv(run_dir / "metrics.csv"), tb)
    if "mlflow" in names:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("metarun").experiment_id])
        series = {
            tag: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
            for tag in run.data.metrics
        }
        assert_same(series, tb)
    if "wandb" in names:
        history: dict[str, list[tuple[int, float]]] = {}
        for record in wandb_records(run_dir):
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                step = items.pop("_step")
                for tag, value in items.items():
                    if not tag.startswith("_"):
                        history.setdefault(tag, []).append((step, float(value)))
        assert_same({t: sorted(p) for t, p in history.items()}, tb)
