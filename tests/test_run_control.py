"""How a run is steered: the meta-learning-rate schedules (``train.lr_schedule``), the time
budget (``train.max_minutes``) and the stop signals."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf

from metarun.runner import _StopFlag, lr_scheduler, run


def _lrs(**train) -> list[float]:
    t = OmegaConf.create(
        {"lr_schedule": "step", "lr_decay_every": 0, "lr_decay_gamma": 0.5, "min_lr": 0.0} | train
    )
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = lr_scheduler(optimizer, t)
    lrs = []
    for _ in range(t.iterations):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return lrs


def test_cosine_schedule_follows_the_half_cosine_from_meta_lr_to_min_lr():
    lrs = _lrs(lr_schedule="cosine", iterations=40, min_lr=1e-5)
    for k, lr in enumerate(lrs):
        expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / 40)) / 2
        assert lr == pytest.approx(expected, rel=1e-6), k
    assert lrs[20] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-6)  # halfway: the midpoint


def test_step_schedule_multiplies_by_gamma_every_n_iterations_and_none_is_constant():
    assert _lrs(lr_decay_every=3, iterations=7) == pytest.approx([1e-3] * 3 + [5e-4] * 3 + [2.5e-4])
    assert _lrs(iterations=5) == [1e-3] * 5


def test_time_budget_ends_training_then_validates_and_tests(make_cfg, one_thread, tmp_path):
    """``train.max_minutes`` stops a long run after its budget (here one step's worth),
    as if it had reached its last iteration: a final validation, last.pt and the test."""
    cfg = make_cfg(
        "algo=protonet", "train.iterations=1000", "train.max_minutes=0.00001", one_thread
    )
    summary = run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["training"]["iterations"] == 1
    assert results["training"]["ended_by_time_budget"] is True
    assert results["val"]["best_iteration"] == 1  # validated at the budget's end
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    assert 0.0 <= summary["test/acc"] <= 1.0


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR2"])
def test_stop_signals_request_a_checkpoint_and_slurms_usr2_reaches_the_old_handler(name):
    """SIGTERM and Slurm's SIGUSR2 only set the stop flag while training runs (the loop then
    saves last.pt); a handler installed before (submitit's requeue, for SIGUSR2) runs once
    the flag's block has ended, i.e. after the checkpoint; SIGTERM's previous handler does
    not (the run ends cleanly instead)."""
    sig = getattr(signal, name)
    calls = []
    previous = signal.signal(sig, lambda signum, frame: calls.append(signum))
    try:
        with _StopFlag() as stop:
            os.kill(os.getpid(), sig)
            assert stop.requested and calls == []
        assert calls == ([sig] if name == "SIGUSR2" else [])
        assert signal.getsignal(sig) is not stop._handle  # the old handler is back
    finally:
        signal.signal(sig, previous)
