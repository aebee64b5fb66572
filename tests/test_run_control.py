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

from metarun import run
from metarun.recipes.meta_learning import lr_scheduler, meta_optimizer
from metarun.run_control import StopFlag


def _lrs(**train) -> list[float]:
    t = OmegaConf.create(
        {"lr_schedule": "step", "lr_decay_every": 0, "lr_decay_gamma": 0.5, "min_lr": 0.0}
        | {"meta_lr": 1e-3}
        | train
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


def test_linear_schedule_goes_in_a_straight_line_from_meta_lr_to_min_lr():
    """Reptile's outer step size: linearly annealed to its final value over the run."""
    lrs = _lrs(lr_schedule="linear", iterations=10, min_lr=0.0)
    assert lrs == pytest.approx([1e-3 * (1 - k / 10) for k in range(10)], rel=1e-6)


def test_sgd_meta_optimizer_steps_by_exactly_meta_lr_times_the_gradient():
    t = OmegaConf.create({"optimizer": "sgd", "meta_lr": 0.5})
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = meta_optimizer(torch.nn.ParameterList([w]), t)
    w.grad = torch.tensor([0.2, 0.4])
    optimizer.step()
    assert torch.equal(w.detach(), torch.tensor([0.9, -2.2]))
    assert isinstance(
        meta_optimizer(
            torch.nn.Linear(1, 1), OmegaConf.create({"optimizer": "adam", "meta_lr": 1e-3})
        ),
        torch.optim.Adam,
    )


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
        with StopFlag() as stop:
            os.kill(os.getpid(), sig)
            assert stop.requested and calls == []
        assert calls == ([sig] if name == "SIGUSR2" else [])
        assert signal.getsignal(sig) is not stop._handle  # the old handler is back
    finally:
        signal.signal(sig, previous)


def test_grad_clip_bounds_the_meta_gradient_norm_at_every_update(
    make_cfg, one_thread, tmp_path, monkeypatch
):
    """``train.grad_clip`` clips the whole meta-gradient's norm before the optimizer sees it
    and logs the norm before clipping."""
    seen = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        seen.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    cfg = make_cfg("algo=maml", "train.iterations=3", "train.grad_clip=0.01", one_thread)
    run(cfg, tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before = [row["train/grad_norm"] for row in logged if "train/grad_norm" in row]
    assert len(seen) == len(before) == 3
    assert all(norm > 0.01 for norm in before)  # an untrained MAML's gradient is larger
    assert seen == pytest.approx([0.01] * 3, rel=1e-4)


def test_only_rank_0_clock_spends_the_time_budget(make_cfg, one_thread, tmp_path, monkeypatch):
    """Under torchrun the other ranks wait in the all-reduce while rank 0 validates, so their
    clocks would count its validation; only rank 0's vote ends a run by time. Here a rank-1
    process alone (no process group) with a budget of one step's worth trains to the end."""
    steps = []
    adam_step = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "1")
    cfg = make_cfg("algo=protonet", "train.iterations=3", "train.max_minutes=0.00001", one_thread)
    assert run(cfg, tmp_path) == {}  # not rank 0: no test, no results
    assert len(steps) == 3
