"""Data-parallel meta-training under torchrun (two CPU processes, gloo) matches one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides

# Builds a MAML with a fixed seed and a meta-batch of 4 fixed tasks, computes this rank's
# share of the meta-gradient as the runner does, sums it across ranks with DataParallel
# and saves the result (rank 0), or the single-process gradient without torchrun.
WORKER = textwrap.dedent(
    """
    import sys, torch
    from metarun.algorithms import MAML
    from metarun.data.episodes import Episode
    from metarun.distributed import DataParallel
    from metarun.models import Conv4

    torch.manual_seed(0)
    algo = MAML(Conv4(input_shape=(1, 16, 16), hidden=4), 3, 0.4, 1, 1).double()
    g = torch.Generator().manual_seed(1)
    tasks = [
        Episode(torch.rand(3, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3),
                torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64),
                torch.arange(3).repeat(2), torch.arange(3))
        for _ in range(4)
    ]
    parallel = DataParallel(torch.device("cpu"))
    for episode in parallel.share(tasks):
        loss, _ = algo.meta_loss(episode)
        (loss / len(tasks)).backward()
    parallel.sum_gradients(algo)
    if parallel.is_main:
        torch.save({n: p.grad for n, p in algo.named_parameters()}, sys.argv[1])
    parallel.close()
    """
)


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += ["--standalone", *args]  # a free port of its own: parallel runs never clash
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_meta_gradient_equals_the_single_process_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert single.returncode == 0, single.stderr
    result = _torchrun(str(script), str(tmp_path / "two.pt"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "two.pt")
    for name, grad in one.items():
        torch.testing.assert_close(two[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    assert any(g.abs().max() > 1e-3 for g in one.values())


@pytest.mark.slow
def test_torchrun_run_matches_a_single_process_run(data_dir, cache_dir, tmp_path):
    """The real CLI under torchrun: one run folder written by rank 0, with the same training
    curve and test accuracy as the same config in one process."""
    overrides = [*tiny_overrides(data_dir, cache_dir), "train.meta_batch_size=4", "log_every=1"]
    metarun = [sys.executable, "-m", "metarun.cli"]
    single = subprocess.run(
        [*metarun, *overrides, f"hydra.run.dir={tmp_path / 'one'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    two = _torchrun(
        "-m", "metarun.cli", *overrides, f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path
    )
    assert two.returncode == 0, two.stderr[-3000:]

    def curve(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]

    assert len(curve("two")) == 4  # rank 0 alone wrote the metrics: no duplicates
    torch.testing.assert_close(curve("two"), curve("one"), rtol=1e-5, atol=1e-6)
    one = json.loads((tmp_path / "one" / "results.json").read_text())["test"]["acc"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["test"]["acc"]
    assert abs(one - two) < 1e-6
