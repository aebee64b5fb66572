"""An installed (non-editable) wheel finds its configs and split lists; imports stay light."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_wheel_ships_configs_that_an_installed_metarun_composes(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(REPO),
            "-w",
            str(wheels),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(wheels.glob("metarun-*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import sys, metarun; assert metarun.__file__.startswith(sys.argv[1]), metarun.__file__;"
        "from metarun.data.omniglot import _packaged_split;"
        "assert len(_packaged_split('val')) == 172;"
        "sys.argv = ['metarun', 'algo=protonet', '--cfg', 'job'];"
        "from metarun.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "metarun.algorithms.ProtoNet" in done.stdout


def test_import_metarun_and_the_cli_do_not_import_torch_or_tensorboard():
    code = (
        "import sys, metarun, metarun.cli, metarun.config;"
        "heavy = [m for m in ('torch', 'tensorboard', 'learn2learn') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
