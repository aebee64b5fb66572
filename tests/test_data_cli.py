"""``metarun-data`` through its real entry point (a subprocess), on the shared data folder and
on small folders made here."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_miniimagenet import _make_raw

METARUN_DATA_CMD = (
    shutil.which("metarun-data", path=str(Path(sys.executable).parent)) or "metarun-data"
)


def metarun_data(*args: str, data: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "METARUN_DATA": str(data), "METARUN_CACHE": str(cache)}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [METARUN_DATA_CMD, *args], env=env, capture_output=True, text=True, timeout=300
    )


def run_main(capsys, *args: str, data: Path, cache: Path) -> tuple[int, str, str]:
    """``metarun.data_cli.main`` in this process (the entry point's function), for speed."""
    from metarun.data_cli import main

    code = main(["--data-dir", str(data), "--cache-dir", str(cache), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_names_the_commands_and_imports_no_torch(tmp_path):
    done = metarun_data("--help", data=tmp_path, cache=tmp_path)
    assert done.returncode == 0
    assert all(c in done.stdout for c in ("list", "verify", "prepare"))
    code = (
        "import sys\n"
        "from metarun.data_cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'learn2learn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["False", "False"], out.stderr  # --help stays fast


def test_list_shows_what_is_here_where_and_its_size(capsys, data_dir, tmp_path):
    code, out, _ = run_main(capsys, "list", data=data_dir, cache=tmp_path / "cache")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["omniglot"][1] == "present" and rows["omniglot"][-1] == str(data_dir / "omniglot")
    assert rows["omniglot"][3] == "MB"  # the size of the two zips
    assert rows["miniimagenet"][1] == "incomplete"  # the train images are not here
    assert rows["fc100"][1] == "absent"
    assert f"data folder:  {data_dir}" in out
    assert "learn2learn:" in out


def test_verify_omniglot_checks_structure_and_reports_the_md5(capsys, data_dir, tmp_path):
    code, out, _ = run_main(capsys, "verify", "omniglot", data=data_dir, cache=tmp_path)
    assert code == 0, out
    assert "images_background: 964 characters x 20 drawings" in out
    # The shared zips were repacked: structure fine, MD5 not the official one.
    assert "differs from the official 68d2efa1b9178cc56df9314c21c6e718" in out


def test_verify_omniglot_fails_on_a_truncated_zip(capsys, data_dir, tmp_path):
    folder = tmp_path / "data" / "omniglot"
    folder.mkdir(parents=True)
    shutil.copy(data_dir / "omniglot" / "images_background.zip", folder)
    broken = (data_dir / "omniglot" / "images_evaluation.zip").read_bytes()
    (folder / "images_evaluation.zip").write_bytes(broken[: len(broken) // 3])
    code, out, _ = run_main(capsys, "verify", "omniglot", data=tmp_path / "data", cache=tmp_path)
    assert code == 1
    assert "images_evaluation.zip is not a readable zip" in out


def test_verify_miniimagenet_on_the_shared_folder_lists_the_missing_train_images(
    data_dir, tmp_path
):
    done = metarun_data("verify", "miniimagenet", data=data_dir, cache=tmp_path)
    assert done.returncode == 1
    assert "train: 38400 of 38400 images missing" in done.stdout
    assert "val: all 9600 images present" in done.stdout
    assert "test: test.csv lists 12000 images of 20 classes" in done.stdout


def test_verify_and_prepare_a_small_raw_miniimagenet(capsys, tmp_path):
    _make_raw(tmp_path / "data")
    data, cache = tmp_path / "data", tmp_path / "cache"
    code, out, _ = run_main(capsys, "verify", "miniimagenet", data=data, cache=cache)
    assert code == 0, out
    assert "(Ravi: 64 x 600)" in out  # a warning: not the standard split
    code, out, err = run_main(
        capsys, "prepare", "miniimagenet", "dataset.image_size=16", data=data, cache=cache
    )
    assert code == 0, err
    assert re.search(r"train +3 classes +12 images", out)
    assert sorted(p.name for p in (cache / "miniimagenet").iterdir()) == [
        f"miniimagenet_{s}_16px.pt" for s in ("test", "train", "val")
    ]


def test_prepare_the_standard_split_here_fails_with_the_missing_files(capsys, data_dir, tmp_path):
    code, _, err = run_main(capsys, "prepare", "miniimagenet", data=data_dir, cache=tmp_path)
    assert code == 1
    assert "38400 of 38400 images listed in train.csv are missing" in err
    assert "dataset.split=val_test_reduced" in err


def test_prepare_offline_without_files_names_folder_and_files(capsys, tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    code, _, err = run_main(
        capsys, "prepare", "fc100", "dataset.download=false", data=data, cache=cache
    )
    assert code == 1
    assert f"{data / 'fc100'} with FC100_train.pickle" in err


def test_every_learn2learn_dataset_is_verifiable():
    from metarun.data.learn2learn import SPECS
    from metarun.data_cli import L2L_DATASETS, VERIFIERS, dataset_names

    assert L2L_DATASETS == tuple(SPECS)
    assert set(SPECS) <= set(VERIFIERS) and set(SPECS) <= set(dataset_names())


def test_list_verify_and_prepare_a_small_vgg_flowers(capsys, tmp_path):
    pytest.importorskip("learn2learn")
    from tests.test_learn2learn_adapter import make_vgg_flowers

    data, cache = tmp_path / "data", tmp_path / "cache"
    (data / "vgg_flowers").mkdir(parents=True)
    code, out, _ = run_main(capsys, "verify", "vgg_flowers", data=data, cache=cache)
    assert code == 1 and "missing vgg_flower102/jpg, vgg_flower102/imagelabels.mat" in out
    shutil.rmtree(data / "vgg_flowers")
    make_vgg_flowers(data)
    code, out, _ = run_main(capsys, "verify", "vgg_flowers", data=data, cache=cache)
    assert code == 0, out
    code, out, err = run_main(
        capsys,
        "prepare",
        "vgg_flowers",
        "dataset.download=false",
        "dataset.image_size=16",
        data=data,
        cache=cache,
    )
    assert code == 0, err
    assert re.search(r"train +2 classes +4 images", out) and "images (3, 16, 16)" in out
    code, out, _ = run_main(capsys, "list", data=data, cache=cache)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["vgg_flowers"][1] == "present" and rows["dtd"][1] == "absent"


def test_unknown_dataset_is_a_usage_error(tmp_path):
    done = metarun_data("verify", "imagenet21k", data=tmp_path, cache=tmp_path)
    assert done.returncode == 2
    assert "unknown dataset 'imagenet21k'" in done.stderr and "miniimagenet" in done.stderr


def test_verify_mnist_checks_idx_headers(capsys, data_dir, tmp_path):
    code, out, _ = run_main(capsys, "verify", "mnist", data=data_dir, cache=tmp_path)
    assert code == 0, out
    assert "mnist: train-images-idx3-ubyte.gz: 60000 items" in out
    folder = tmp_path / "data" / "mnist"
    shutil.copytree(data_dir / "mnist", folder)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, 9999))
    code, out, _ = run_main(capsys, "verify", "mnist", data=tmp_path / "data", cache=tmp_path)
    assert code == 1
    assert "t10k-labels-idx1-ubyte.gz has magic 2049 and 9999 items" in out
