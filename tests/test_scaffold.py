"""The run scaffold shared by both recipes (issue 17): checkpoints that cannot run code, one
live process per run folder, metrics that survive a kill, sweeps that report their failed
jobs, verified data, errors that name their cause, NaN handling and range checks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch

from tests.conftest import REPO, diverge_after, tiny_overrides
from tests.test_cli import METARUN, metarun, read_metrics


@pytest.fixture
def tiny(data_dir, cache_dir):
    return tiny_overrides(data_dir, cache_dir)


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [METARUN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _wait_for(condition, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _iteration(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["iteration"]
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return -1


# --- 1. a checkpoint cannot run code ------------------------------------------------------


def test_a_checkpoint_whose_config_names_a_foreign_target_is_refused_everywhere(tiny, tmp_path):
    run_dir = tmp_path / "run"
    done = metarun(*tiny, "algo=protonet", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    victim = tmp_path / "created-by-the-checkpoint"
    for name in ("last.pt", "best.pt"):
        path = run_dir / "checkpoints" / name
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"]["hardware"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
        torch.save(ckpt, path)
    (run_dir / "results.json").unlink()

    resumed = metarun(f"resume={run_dir}", cwd=tmp_path)
    tested = metarun(f"test={run_dir}", f"hydra.run.dir={tmp_path / 't'}", cwd=tmp_path)
    lake = subprocess.run(
        [str(Path(METARUN).with_name("metarun-lake")), str(run_dir), "--force", "--no-download"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    for done in (resumed, tested, lake):
        assert done.returncode == 2, done.stderr
        assert "hardware._target_='builtins.open'" in done.stderr
        assert "not one of metarun's own classes" in done.stderr
    assert not victim.exists()


def test_targets_are_checked_by_what_they_resolve_to():
    from metarun.checkpoint import check_targets
    from metarun.errors import ConfigError

    check_targets({"algo": {"_target_": "metarun.algorithms.MAML"}}, "x")  # metarun's own
    check_targets({"scenario": {"_target_": "metarun.continual.scenarios.split_mnist"}}, "x")
    for target in ("os.system", "metarun.checkpoint.torch.load", "metarun.nothing.Here"):
        with pytest.raises(ConfigError, match="model._target_"):
            check_targets({"model": {"_target_": target}}, "x")
    with pytest.raises(ConfigError, match=r"hooks\[1\]._target_"):
        check_targets({"hooks": [{}, {"_target_": "subprocess.run"}]}, "x")


# --- 2. one live process per run folder ---------------------------------------------------


def test_a_run_folder_in_use_is_refused_and_a_killed_owner_does_not_block_resume(tiny, tmp_path):
    run_dir = tmp_path / "run"
    long = [*tiny, "algo=protonet", "train.iterations=100000", "checkpoint_every=2"]
    first = _start(*long, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    try:
        _wait_for(lambda: _iteration(run_dir / "checkpoints" / "last.pt") >= 2)
        hydra_files = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        second = metarun(*tiny, "seed=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert second.returncode == 2
        assert "in use by a running metarun process" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        again = metarun(f"resume={run_dir}", cwd=tmp_path)
        assert again.returncode == 2 and "in use" in again.stderr
        assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock is left behind as a file
        first.communicate()
    resumed = _start(f"resume={run_dir}", cwd=tmp_path)
    try:
        stopped_at = _iteration(run_dir / "checkpoints" / "last.pt")
        _wait_for(lambda: _iteration(run_dir / "checkpoints" / "last.pt") > stopped_at)
    finally:
        resumed.send_signal(signal.SIGINT)
        _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, stderr


def test_a_new_run_into_a_folder_that_holds_a_run_is_refused(tiny, tmp_path):
    run_dir = tmp_path / "run"
    assert metarun(*tiny, "algo=protonet", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    results = (run_dir / "results.json").read_bytes()
    done = metarun(*tiny, "algo=protonet", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 2
    assert "already holds a run" in done.stderr and f"metarun resume={run_dir}" in done.stderr
    assert (run_dir / "results.json").read_bytes() == results


# --- 3. kill -9 loses no metric line ------------------------------------------------------


def test_kill_9_then_resume_keeps_every_metric_line_exactly_once(tiny, tmp_path):
    args = [*tiny, "train.iterations=40", "checkpoint_every=3", "log_every=1000"]
    assert metarun(*args, f"hydra.run.dir={tmp_path / 'ref'}", cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "run"
    proc = _start(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _wait_for(lambda: _iteration(run_dir / "checkpoints" / "last.pt") >= 9, timeout=240)
    proc.kill()
    proc.communicate()
    saved = _iteration(run_dir / "checkpoints" / "last.pt")
    assert 9 <= saved < 40
    on_disk = {r["iteration"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert set(range(1, saved + 1)) <= on_disk  # flushed before the checkpoint was written

    assert metarun(f"resume={run_dir}", cwd=tmp_path).returncode == 0
    rows = read_metrics(run_dir)
    iterations = [r["iteration"] for r in rows if "train/loss" in r]
    assert iterations == list(range(1, 41))
    assert rows == read_metrics(tmp_path / "ref")


# --- 4. a sweep reports its failed jobs ---------------------------------------------------


def test_a_sweep_with_a_failed_job_ends_with_a_summary_and_exit_status_1(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    done = metarun(
        "--multirun", *tiny, "algo=protonet", "train.ways=5,5000", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "1 job(s) of the sweep" in done.stderr
    assert "job 1 (" in done.stderr and "train.ways=5000" in done.stderr
    assert "only 4112 classes" in done.stderr
    failed = next(sweep.rglob("failure.json")).parent
    assert f"log: {failed / 'metarun.log'}" in done.stderr
    good = [p for p in sweep.iterdir() if p.is_dir() and p != failed]
    assert len(good) == 1 and (good[0] / "results.json").exists()  # the other job still ran


# --- 5. verify reads every image --------------------------------------------------------


@pytest.fixture(scope="module")
def damaged_omniglot(tmp_path_factory, data_dir) -> tuple[Path, str, str]:
    """A data folder whose background zip has one PNG replaced by garbage and one member
    whose stored bytes no longer match its CRC; the evaluation zip is linked as it is."""
    folder = tmp_path_factory.mktemp("damaged") / "omniglot"
    folder.mkdir()
    (folder / "images_evaluation.zip").symlink_to(data_dir / "omniglot/images_evaluation.zip")
    source = zipfile.ZipFile(data_dir / "omniglot/images_background.zip")
    names = [n for n in source.namelist() if n.endswith(".png")]
    garbage, bad_crc = names[10], names[500]
    target = folder / "images_background.zip"
    with zipfile.ZipFile(target, "w") as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == garbage:
                data = b"this is not a png" * 10
            compression = zipfile.ZIP_STORED if info.filename == bad_crc else zipfile.ZIP_DEFLATED
            out.writestr(info.filename, data, compress_type=compression)
    with zipfile.ZipFile(target) as z:
        info = z.getinfo(bad_crc)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw = bytearray(target.read_bytes())
    raw[start + 40] ^= 0xFF  # inside the stored PNG: the CRC no longer matches
    target.write_bytes(bytes(raw))
    return folder.parent, garbage, bad_crc


def test_verify_reads_every_image_and_names_the_bad_ones(damaged_omniglot, tmp_path):
    data, garbage, bad_crc = damaged_omniglot
    verify = Path(METARUN).with_name("metarun-data")
    done = subprocess.run(
        [str(verify), "--data-dir", str(data), "verify", "omniglot"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "2 of 19280 images cannot be read or decoded" in out
    assert f"{garbage}: not an image Pillow can read" in out
    assert f"{bad_crc}: Bad CRC-32" in out
    assert "images_evaluation: all 13180 images read and decoded" in out


def test_a_damaged_image_is_named_when_metarun_loads_the_archive(damaged_omniglot, tmp_path):
    from metarun.data.omniglot import Omniglot
    from metarun.errors import DataError

    data, garbage, bad_crc = damaged_omniglot
    with pytest.raises(DataError) as err:
        Omniglot(str(data), str(tmp_path / "cache"), download=False)
    assert garbage in str(err.value) or bad_crc in str(err.value)
    assert "BytesIO" not in str(err.value)


# --- 6. errors that name their cause, signals, stale files ------------------------------


def test_a_truncated_checkpoint_gives_one_message_naming_the_file(tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny, "algo=protonet", "train.iterations=40", "checkpoint_every=2"]
    proc = _start(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _wait_for(lambda: _iteration(run_dir / "checkpoints" / "last.pt") >= 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr  # SIGTERM: 128 + 15
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    stale = run_dir / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"left by a killed write")
    done = metarun(f"resume={run_dir}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"checkpoint {last} is unreadable (1000 bytes)" in done.stderr
    assert "Traceback" not in done.stderr and "enforce fail" not in done.stderr
    assert not stale.exists()  # cleaned up once the folder was ours


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(make_cfg, tmp_path, monkeypatch):
    from metarun import checkpoint, run
    from metarun.errors import CheckpointError

    writes = {"n": 0}
    real = checkpoint.atomic_torch_save

    def disk_fills_up(obj, path):
        writes["n"] += 1
        if writes["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", disk_fills_up)
    cfg = make_cfg("algo=protonet", "train.iterations=8", "checkpoint_every=2", "eval.val_every=0")
    with pytest.raises(CheckpointError) as err:
        run(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    assert f"could not write the checkpoint {last}: the disk is full" in str(err.value)
    assert "the previous last.pt is kept" in str(err.value)
    assert torch.load(last, weights_only=True)["iteration"] == 4


def test_ctrl_c_during_the_final_test_stops_cleanly_and_resume_tests(tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny, "algo=protonet", "train.iterations=2", "eval.test_episodes=100000"]
    proc = _start(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _wait_for(lambda: _iteration(run_dir / "checkpoints" / "last.pt") == 2)
    time.sleep(1.0)  # inside the test's episodes
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted during the test at iteration 2" in stderr and "Traceback" not in stderr
    assert not (run_dir / "results.json").exists()
    assert not any("test/acc" in r for r in read_metrics(run_dir))
    done = metarun(f"resume={run_dir}", "eval.test_episodes=7", cwd=tmp_path)
    assert done.returncode == 2 and "eval.test_episodes cannot change" in done.stderr


def test_resume_of_a_missing_folder_creates_nothing(tmp_path):
    missing = tmp_path / "no" / "such" / "run"
    done = metarun(f"resume={missing}", cwd=tmp_path)
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not (tmp_path / "no").exists() and not (tmp_path / "outputs").exists()


# --- 7. NaN: say what exists, allow a lower rate on resume, catch non-finite state -------


def test_a_nan_at_the_first_iteration_says_no_checkpoint_exists(make_cfg, tmp_path, monkeypatch):
    from metarun import run
    from metarun.algorithms import ProtoNet
    from metarun.errors import NonFiniteError

    diverge_after(monkeypatch, ProtoNet, 0)
    with pytest.raises(NonFiniteError) as err:
        run(make_cfg("algo=protonet"), tmp_path)
    assert "nan at iteration 1" in str(err.value)
    assert "No checkpoint has been written yet" in str(err.value)
    assert "last.pt" not in str(err.value)


def test_a_resumed_run_can_lower_the_learning_rate_and_records_it(make_cfg, tmp_path, monkeypatch):
    from metarun import run
    from metarun.algorithms import ProtoNet
    from metarun.errors import NonFiniteError

    original = ProtoNet.meta_loss
    diverge_after(monkeypatch, ProtoNet, 6)  # from iteration 4 (meta-batches of 2)
    cfg = make_cfg("algo=protonet", "train.iterations=6", "checkpoint_every=1")
    with pytest.raises(
        NonFiniteError, match=r"The last good checkpoint is .*last.pt \(iteration 3\)"
    ):
        run(cfg, tmp_path)
    monkeypatch.setattr(ProtoNet, "meta_loss", original)

    resume = make_cfg("algo=protonet", f"resume={tmp_path}", "train.meta_lr=0.0001")
    run(resume, resume_keys=["train.meta_lr"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["resumes"] == [{"iteration": 3, "overrides": {"train.meta_lr": 0.0001}}]
    assert results["config"]["train"]["meta_lr"] == 0.0001
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0001)
    from metarun.errors import ConfigError

    with pytest.raises(ConfigError, match="model.hidden cannot change"):
        run(make_cfg(f"resume={tmp_path}", "model.hidden=16"), resume_keys=["model.hidden"])


def test_a_huge_meta_lr_stops_on_non_finite_statistics_instead_of_finishing(tiny, tmp_path):
    run_dir = tmp_path / "run"
    done = metarun(*tiny, "train.meta_lr=1e10", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "NaN or infinite values after iteration" in done.stderr
    assert not (run_dir / "results.json").exists()
    for name in ("best.pt", "last.pt"):
        path = run_dir / "checkpoints" / name
        if path.exists():  # only states that were finite were saved
            state = torch.load(path, weights_only=True)["algo"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# --- 8. ranges and unsupported combinations, before any data is loaded -------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.ways=-1", "train.ways=-1 is out of range: it must be >= 1"),
        ("model.hidden=0", "model.hidden=0 is out of range: it must be >= 1"),
        ("train.meta_batch_size=0", "train.meta_batch_size=0 is out of range"),
        ("train.iterations=0", "train.iterations=0 is out of range"),
        ("algo=ensemble train.iterations=5", "Ensemble has nothing to train"),
        ("dataset=mnist eval.episodes=within_alphabet", "eval.episodes=within_alphabet is not"),
        ("dataset=mnist train.augment=affine", "train.augment=affine is not offered by MNIST"),
        ("dataset=mnist eval.test_views=4", "eval.test_views=4 is not offered by MNIST"),
        ("eval.test_views=-1", "eval.test_views=-1 is out of range: it must be >= 0"),
        ("train.meta_lr=-1", "train.meta_lr=-1.0 is out of range: it must be > 0"),
        ("+train.iteratons=5", "unknown option train.iteratons: TrainConfig has no such key. "
         "Did you mean train.iterations?"),
        ("eval.report_steps=[1,-2]", "eval.report_steps=[1, -2]: -2 is out of range"),
        ("algo.engine=vmap algo.bn_mode=running", "algo.engine=vmap needs algo.bn_mode"),
        ("algo=protonet eval.report_steps=[1]", "ProtoNet does not adapt by gradient steps"),
        ("eval.ways=20", "train.ways (5) and eval.ways (20) must both be 5"),
        ("algo=snail eval.shots=5", "train.shots (1) and eval.shots (5) must both be 1"),
        ("dataset=sinusoid model=mlp_sinusoid algo=protonet", "ProtoNet does not do regression"),
        ("model.flatten=false", "model.flatten=false keeps feature maps"),
        ("hardware.compile=true", "cannot run second-order MAML"),
        ("algo=mann algo.encoder_checkpoint=/no/such.pt", "algo.encoder_checkpoint=/no/such.pt"),
        ("scenario=split_mnist algo=oml model=mlp", "OML meta-trains on classes"),
        ("scenario=split_mnist algo=er model=mlp hardware.amp=fp16", "amp=fp16 is not supported"),
    ],
)  # fmt: skip
def test_unsupported_options_are_refused_before_any_data_is_loaded(
    make_cfg, tmp_path, override, message
):
    from metarun import run
    from metarun.errors import ConfigError

    empty = tmp_path / "empty"  # no data at all: a DataError would mean it got that far
    empty.mkdir()
    cfg = make_cfg(*override.split(), f"data_dir={empty}")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "run")
    assert message in str(err.value)
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_data_dir_that_is_a_file_and_fp16_on_a_cpu(make_cfg, tmp_path, caplog):
    from metarun.checks import check_meta_learning
    from metarun.errors import ConfigError

    a_file = tmp_path / "data.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"data_dir={a_file} is a file"):
        check_meta_learning(make_cfg(f"data_dir={a_file}"))
    with caplog.at_level("WARNING", logger="metarun"):
        check_meta_learning(make_cfg("hardware.amp=fp16"))
    assert "hardware.amp=fp16 on a CPU" in caplog.text


def test_a_missing_data_dir_leaves_no_folder_behind(tmp_path, cache_dir):
    missing = tmp_path / "not" / "here"
    done = metarun(
        f"data_dir={missing}", f"cache_dir={cache_dir}", "dataset.mirror=http://127.0.0.1:9",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "could not download" in done.stderr
    assert not (tmp_path / "not").exists()


# --- 9. dependency floors -------------------------------------------------------------------


def test_dependency_floors_match_what_the_code_uses():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = {d.split(">=")[0]: d.split(">=")[1].split(",")[0] for d in project["dependencies"]}
    version = tuple(int(x) for x in floors["pillow"].split("."))
    assert version >= (9, 1)  # PIL.Image.Resampling
    assert tuple(int(x) for x in floors["torch"].split(".")) >= (2, 3)  # torch.amp.GradScaler
    extras = project["optional-dependencies"]
    assert not any("optuna" in d or "sqlalchemy" in d for d in extras["slurm"])
    assert any("optuna" in d for d in extras["optuna"])


# --- both recipes on the same scaffold ----------------------------------------------------


def test_a_stream_checkpoint_goes_through_the_shared_format(make_cfg, tmp_path):
    from metarun import run

    cfg = make_cfg(
        "scenario=split_mnist", "algo=naive", "model=mlp", "scenario.train_per_task=20",
        "scenario.batch_size=10", "checkpoint_every=1000",
    )  # fmt: skip
    run(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["recipe"] == "continual" and ckpt["format"] == 2
    assert {"torch", "cuda"} <= set(ckpt["rng"]) and ckpt["input_shape"] == [1, 28, 28]
    assert ckpt["task"] == "classification"


def test_a_stream_with_bf16_autocast_computes_in_bf16(make_cfg, tmp_path):
    from metarun import run

    seen: set[torch.dtype] = set()

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for amp in ("off", "bf16"):
            seen.clear()
            cfg = make_cfg(
                "scenario=split_mnist", "algo=er", "model=mlp", "scenario.train_per_task=20",
                "scenario.batch_size=10", f"hardware.amp={amp}",
            )  # fmt: skip
            run(cfg, tmp_path / amp)
            assert seen == ({torch.float32} if amp == "off" else {torch.bfloat16})
    finally:
        handle.remove()
    results = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert results["training"]["hardware"]["amp"] == "bf16"
