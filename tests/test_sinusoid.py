"""Sinusoid regression (dataset=sinusoid) and the runner's regression support: the task
family, its seeded splits, MAML's regression meta-gradient, an end-to-end run through the
real entry point, and a short learning check."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from metarun.algorithms import MAML
from metarun.data.episodes import EpisodeError
from metarun.data.sinusoid import Sinusoid
from metarun.models import MLP
from metarun.tasks import REGRESSION
from tests.conftest import tiny_overrides
from tests.gradcheck import assert_meta_gradient_matches_finite_differences
from tests.test_cli import metarun

SINUSOID = ["experiment=maml_sinusoid", "model=mlp_sinusoid"]


def test_tasks_follow_the_maml_paper_distribution():
    sampler = Sinusoid().pool("train").sampler(ways=1, shots=5, query_shots=10, seed=0)
    amplitudes, phases = [], []
    for _ in range(500):
        ep, amplitude, phase = sampler.sample_task()
        assert ep.support_x.shape == ep.support_y.shape == (5, 1)
        assert ep.query_x.shape == ep.query_y.shape == (10, 1)
        xs = torch.cat([ep.support_x, ep.query_x])
        ys = torch.cat([ep.support_y, ep.query_y])
        assert xs.min() >= -5 and xs.max() <= 5
        torch.testing.assert_close(ys, amplitude * torch.sin(xs - phase))
        amplitudes.append(amplitude)
        phases.append(phase)
    assert 0.1 <= min(amplitudes) and max(amplitudes) <= 5.0
    assert 0 <= min(phases) and max(phases) <= math.pi
    # Uniform: the means are near the middle of the ranges (std/sqrt(500) ~ 0.06 and 0.04).
    assert abs(sum(amplitudes) / 500 - 2.55) < 0.25
    assert abs(sum(phases) / 500 - math.pi / 2) < 0.2


def test_same_seed_same_tasks_and_splits_never_share_a_stream():
    family = Sinusoid()

    def first_support(split: str, seed: int) -> torch.Tensor:
        return family.pool(split).sampler(1, 5, 5, seed).sample().support_y

    assert torch.equal(first_support("test", 0), first_support("test", 0))
    supports = [first_support(s, seed) for s in ("train", "val", "test") for seed in (0, 1, 2)]
    for i, a in enumerate(supports):
        for b in supports[i + 1 :]:
            assert not torch.equal(a, b)


def test_impossible_sinusoid_episodes_name_the_fix():
    with pytest.raises(EpisodeError, match="train.ways=1 and eval.ways=1"):
        Sinusoid().pool("train").sampler(ways=5, shots=5, query_shots=5, seed=0)
    with pytest.raises(EpisodeError, match="shots and query_shots >= 1"):
        Sinusoid().pool("train").sampler(ways=1, shots=0, query_shots=5, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        Sinusoid().pool("validation")


def test_maml_regression_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    algo = MAML(
        MLP((1,), hidden_sizes=(4,), batch_norm=False),
        ways=1,
        fast_lr=0.05,
        adaptation_steps=2,
        test_adaptation_steps=2,
        task=REGRESSION,
    ).double()
    ep = Sinusoid().pool("train").sampler(1, 5, 5, seed=3).sample()
    ep = type(ep)(
        *(t.double() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)), ep.classes
    )
    loss, mse = algo.meta_loss(ep)
    assert torch.equal(loss.detach(), mse)  # the regression metric is the MSE itself
    assert_meta_gradient_matches_finite_differences(algo, ep)


def test_mlp_init_std_initialises_its_layers_and_the_head_put_on_it_as_maml_code_does():
    torch.manual_seed(0)
    backbone = MLP((1,), hidden_sizes=(40, 40), batch_norm=False, init_std=0.01)
    maml = MAML(backbone, 1, 0.01, 1, 1, task=REGRESSION)
    linears = [m for m in maml.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3  # two hidden layers and MAML's head
    for layer in linears:
        assert layer.weight.abs().max() <= 0.02  # truncated at two standard deviations
        assert layer.bias.abs().max() == 0
    weights = torch.cat([layer.weight.flatten() for layer in linears])
    assert 0.0075 < weights.std() < 0.0100  # std of N(0, 0.01) truncated at 2 sd: 0.0088
    # Without it, PyTorch's own initialisation (uniform, scale 1/sqrt(fan_in), biases too).
    default = MAML(
        MLP((1,), hidden_sizes=(40, 40), batch_norm=False), 1, 0.01, 1, 1, task=REGRESSION
    )
    assert all(m.bias.abs().max() > 0 for m in default.modules() if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="model.init_std=-1"):
        MLP((1,), hidden_sizes=(40,), init_std=-1)


def test_a_test_whose_adaptation_diverges_says_how_many_episodes_did():
    from metarun.evaluation import evaluate
    from metarun.hardware import Hardware

    hardware = Hardware(device="cpu")
    results = {}
    for fast_lr in (0.01, 3.0):  # the paper's inner step size, and one far too large
        torch.manual_seed(0)
        backbone = MLP((1,), hidden_sizes=(40, 40), batch_norm=False)
        maml = MAML(backbone, 1, fast_lr, 1, 10, task=REGRESSION)
        sampler = Sinusoid().pool("test").sampler(1, 5, 20, seed=0)
        results[fast_lr] = evaluate(maml, sampler, 8, hardware, REGRESSION.score, "mse")
    calm, wild = results[0.01], results[3.0]
    assert all(math.isfinite(x) for x in calm.scores) and "not finite" not in str(calm)
    diverged = sum(not math.isfinite(x) for x in wild.scores)
    assert diverged > 0 and str(wild).endswith(f"(8 episodes, {diverged} not finite)")


def test_protonet_refuses_regression_with_a_clear_error():
    from metarun.algorithms import ProtoNet

    with pytest.raises(ValueError, match="no form for mse tasks"):
        ProtoNet(nn.Linear(1, 1), task=REGRESSION)


def test_end_to_end_sinusoid_run_logs_mse_steps_and_curves(
    data_dir, cache_dir, tmp_path, one_thread
):
    tiny = [o for o in tiny_overrides(data_dir, cache_dir) if o != "model.hidden=8"]
    run_dir = tmp_path / "run"
    done = metarun(*tiny, *SINUSOID, one_thread, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["test"]["after_steps"]) == {"1", "5", "10"}
    assert results["test"]["mse"] == results["test"]["after_steps"]["10"]["mse"] > 0
    assert results["test"]["episodes"] == 6 and "best_mse" in results["val"]
    assert results["protocol"]["dataset"] == "Sinusoid"
    scores = json.loads((run_dir / "test_scores.json").read_text())
    assert scores["metric"] == "mse" and len(scores["episodes"]) == 6
    assert math.isclose(sum(scores["episodes"]) / 6, results["test"]["mse"], rel_tol=1e-6)
    for steps, summary in results["test"]["after_steps"].items():
        per_episode = scores["after_steps"][steps]
        assert math.isclose(sum(per_episode) / 6, summary["mse"], rel_tol=1e-6)
    assert scores["after_steps"]["10"] == scores["episodes"]  # test_adaptation_steps: 10
    assert scores["after_steps"]["1"] != scores["episodes"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    expected = {"train/loss", "train/mse", "val/mse", "test/mse", "test/mse_step1"}
    assert expected <= set(events.Tags()["scalars"])
    assert "train/acc" not in events.Tags()["scalars"]
    (image,) = events.Images("test/adapted_curves")  # metarun.figures.sinusoid_tasks, 2x2
    assert (image.width, image.height) == (1000, 680)


def test_maml_learns_sinusoids_on_a_small_budget(make_cfg, tmp_path, one_thread):
    """400 meta-iterations of 10 tasks (Adam 0.01): adapting with 10 steps from the learned
    initialisation must reach a test MSE well below that of the initialisation itself and
    below 1.2 (the zero function scores E[A^2]/2 ~ 4.3; measured: ~0.7)."""
    from metarun import run

    cfg = make_cfg(
        *SINUSOID,
        one_thread,
        "train.iterations=400",
        "train.meta_batch_size=10",
        "train.meta_lr=0.01",
        "train.query_shots=10",
        "eval.query_shots=50",
        "eval.val_every=0",
        "eval.test_episodes=100",
        "eval.report_steps=[0,10]",
        "checkpoint_every=1000",
        "log_every=100",
    )
    summary = run(cfg, tmp_path / "run")
    after = json.loads((tmp_path / "run" / "results.json").read_text())["test"]["after_steps"]
    assert summary["test/mse"] == after["10"]["mse"]
    assert after["10"]["mse"] < 1.2, after
    assert after["10"]["mse"] < 0.5 * after["0"]["mse"], after
