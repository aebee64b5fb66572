"""The LSTM meta-learner (algo=lstm_meta) and the learned optimizer (algo=learned_opt):
their update rules against hand formulas on tiny models, truncated BPTT, the fixed
initialisation, a learning check on held-out sinusoid tasks with real thresholds, and runs
through the real runner on sinusoids and Omniglot with their checkpoints."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metarun.algorithms import LearnedOptimizer, LSTMMetaLearner
from metarun.algorithms.unrolled import UnrolledLearner, preprocess
from metarun.data.sinusoid import Sinusoid
from metarun.models import MLP
from metarun.tasks import CLASSIFICATION, REGRESSION
from tests.test_algorithms import TinyBackbone, tiny_episode


def test_preprocess_is_the_log_sign_encoding():
    x = torch.tensor([2.0, -0.5, 1e-6, -1e-6, 0.0], dtype=torch.float64)
    expected = torch.tensor(
        [
            [math.log(2.0) / 10, 1.0],
            [math.log(0.5) / 10, -1.0],
            [-1.0, math.exp(10) * 1e-6],
            [-1.0, -math.exp(10) * 1e-6],
            [-1.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(preprocess(x), expected)


def tiny_lstm_meta(first_order: bool = True, steps: int = 2) -> LSTMMetaLearner:
    torch.manual_seed(0)
    return LSTMMetaLearner(
        TinyBackbone(),
        ways=3,
        adaptation_steps=steps,
        test_adaptation_steps=steps,
        hidden_size=5,
        first_order=first_order,
    ).double()


def flat_model(algo: UnrolledLearner) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in algo.model.parameters()])


def test_lstm_meta_learner_step_is_the_gated_gradient_descent_of_the_paper():
    algo, ep = tiny_lstm_meta(), tiny_episode()
    theta = flat_model(algo).requires_grad_()
    params = algo.flat.unflatten(theta)
    loss = F.cross_entropy(functional_call(algo.model, params, (ep.support_x,)), ep.support_y)
    (grad,) = torch.autograd.grad(loss, theta)
    n = theta.numel()
    # By hand: the first layer reads [preprocess(grad), preprocess(loss)] per coordinate...
    inputs = torch.cat([preprocess(grad), preprocess(loss.detach()).expand(n, 2)], 1)
    h, _ = algo.input_lstm(inputs)
    zeros = torch.zeros(n, 1, dtype=torch.float64)
    theta0 = theta.detach().unsqueeze(1)
    # ...the gates read [h, theta, previous gate (0 at the first step)].
    f = torch.sigmoid(torch.cat([h, theta0, zeros], 1) @ algo.forget_weight + algo.forget_bias)
    i = torch.sigmoid(torch.cat([h, theta0, zeros], 1) @ algo.input_weight + algo.input_bias)
    expected = f * theta.detach() - i * grad
    predict = algo.adapt(ep.support_x, ep.support_y, steps=1)
    with torch.no_grad():
        reference = functional_call(algo.model, algo.flat.unflatten(expected), (ep.query_x,))
        torch.testing.assert_close(predict(ep.query_x), reference)
        # At the start the forget gate keeps the weights and the input gate is small.
        assert (f > 0.98).all() and (i < 0.02).all()
    torch.testing.assert_close(
        algo.adapt(ep.support_x, ep.support_y, steps=0)(ep.query_x), algo.model(ep.query_x)
    )


def test_lstm_meta_learner_meta_gradient_reaches_the_lstm_and_the_initial_weights():
    ep = tiny_episode()
    grads = {}
    for first_order in (True, False):
        algo = tiny_lstm_meta(first_order)
        algo.meta_loss(ep)[0].backward()
        for name, p in algo.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        grads[first_order] = torch.cat([p.grad.reshape(-1) for p in algo.parameters()])
    # Second order keeps the dependence of the gradient inputs on the weights.
    assert not torch.allclose(grads[True], grads[False])


def tiny_learned_opt(**kwargs) -> LearnedOptimizer:
    torch.manual_seed(0)
    kwargs = {"network": "mlp", "hidden_size": 6} | kwargs
    return LearnedOptimizer(TinyBackbone(), 3, 2, 2, **kwargs).double()


def query_grad_after(algo: LearnedOptimizer, ep, steps: int) -> torch.Tensor:
    """The query-loss gradient at the weights after ``steps`` learned updates."""
    with torch.no_grad():
        theta = algo.initial_theta().detach().requires_grad_()
        state = algo.init_state(theta)
    for step in range(steps):
        theta, state = algo.step(theta, state, ep.support_x, ep.support_y, {}, step, False)
    theta = theta.detach().requires_grad_()
    loss = F.cross_entropy(algo.run_model(theta, {}, ep.query_x), ep.query_y)
    return torch.autograd.grad(loss, theta)[0]


@pytest.mark.parametrize("truncation", [0, 1])
def test_learned_optimizer_meta_gradient_of_the_initialisation_and_truncation(truncation):
    """First order, two steps: theta_t = theta_0 + sum of updates whose gradient inputs are
    constants, so d theta_t / d theta_0 = I and the initialisation's meta-gradient is the
    mean of the query gradients after each step that the unroll still connects to it."""
    ep = tiny_episode()
    algo = tiny_learned_opt(truncation=truncation, momentum_features=True)
    algo.meta_loss(ep)[0].backward()
    got = torch.cat([p.grad.reshape(-1) for p in algo.model.parameters()])
    g1, g2 = query_grad_after(algo, ep, 1), query_grad_after(algo, ep, 2)
    expected = (g1 + g2) / 2 if truncation == 0 else g1 / 2
    torch.testing.assert_close(got, expected)
    assert all(p.grad.abs().sum() > 0 for p in algo.body.parameters())


def test_learned_optimizer_with_a_fixed_initialisation_trains_the_optimizer_only():
    ep = tiny_episode()
    algo = tiny_learned_opt(meta_init=False, network="lstm")
    init = flat_model(algo)
    opt = torch.optim.Adam(algo.parameters(), lr=0.01)
    before = [p.detach().clone() for p in algo.out.parameters()]
    algo.meta_loss(ep)[0].backward()
    opt.step()
    assert torch.equal(flat_model(algo), init)
    assert all(p.grad is None for p in algo.model.parameters())
    assert not any(torch.equal(p, b) for p, b in zip(algo.out.parameters(), before, strict=True))


def test_unknown_network_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        LearnedOptimizer(TinyBackbone(), 3, 2, 2, network="transformer")


# --- learning on held-out sinusoid tasks -------------------------------------------------

SGD_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)


def sinusoid_learner(cls: type, hidden: tuple[int, ...], **kwargs) -> UnrolledLearner:
    torch.manual_seed(0)
    return cls(MLP((1,), hidden, batch_norm=False), 1, task=REGRESSION, **kwargs)


def meta_train(algo: UnrolledLearner, iterations: int, meta_batch: int, lr: float) -> None:
    """Adam on the mean meta-loss of ``meta_batch`` K=5 sinusoid tasks per iteration."""
    sampler = Sinusoid().pool("train").sampler(1, 5, 10, seed=0)
    opt = torch.optim.Adam(algo.parameters(), lr=lr)
    algo.train()
    for _ in range(iterations):
        opt.zero_grad()
        loss = sum(algo.meta_loss(sampler.sample())[0] for _ in range(meta_batch)) / meta_batch
        loss.backward()
        opt.step()


def held_out_mse(predictor_after, tasks: int = 100) -> float:
    """Mean query MSE over fixed held-out test tasks (K=5 support, 50 query points);
    ``predictor_after(support_x, support_y)`` returns the adapted predictor."""
    sampler = Sinusoid().pool("test").sampler(1, 5, 50, seed=123)
    total = 0.0
    for _ in range(tasks):
        ep = sampler.sample()
        predict = predictor_after(ep.support_x, ep.support_y)
        with torch.no_grad():
            total += F.mse_loss(predict(ep.query_x), ep.query_y).item()
    return total / tasks


def sgd_from_init(algo: UnrolledLearner, lr: float, steps: int):
    """Plain SGD with learning rate ``lr`` from the algorithm's initial weights."""

    def adapt(x: torch.Tensor, y: torch.Tensor):
        params = {n: p.detach().requires_grad_() for n, p in algo.model.named_parameters()}
        for _ in range(steps):
            loss = F.mse_loss(functional_call(algo.model, params, (x,)), y)
            grads = torch.autograd.grad(loss, tuple(params.values()))
            params = {
                n: (p - lr * g).detach().requires_grad_()
                for (n, p), g in zip(params.items(), grads, strict=True)
            }
        return lambda q: functional_call(algo.model, params, (q,))

    return adapt


def learning_check(
    cls: type, iterations: int, meta_batch: int, lr: float, hidden: tuple[int, ...], **kwargs
) -> dict:
    """Meta-trains on sinusoids and returns the held-out MSE before adaptation, after the
    algorithm's own steps, and after the best plain SGD from the same initialisation."""
    algo = sinusoid_learner(cls, hidden, **kwargs)
    meta_train(algo, iterations, meta_batch, lr)
    algo.eval()
    steps = algo.test_adaptation_steps
    return {
        "before": held_out_mse(lambda x, y: algo.adapt(x, y, steps=0)),
        "after": held_out_mse(lambda x, y: algo.adapt(x, y)),
        "sgd": min(held_out_mse(sgd_from_init(algo, lr, steps)) for lr in SGD_LRS),
    }


# Measured with seed 0 on one thread (the tests pin it: 400 Adam steps on an LSTM amplify
# the rounding differences between thread counts): LSTM meta-learner MSE 3.93 before ->
# 2.40 after 5 steps, best SGD from the same start 2.50; on two threads the LSTM run ends
# below half its starting MSE. Learned optimizer, during development: 3.70 -> 1.70, best
# SGD 1.78. Beating SGD is within a few percent either way, so it is not asserted.
SINUSOID_BUDGET = {"iterations": 400, "meta_batch": 4, "lr": 0.01, "hidden": (20, 20)}


def test_lstm_meta_learner_learns_to_adapt_to_held_out_sinusoids(one_thread):
    torch.set_num_threads(1)
    steps = {"adaptation_steps": 5, "test_adaptation_steps": 5}
    mse = learning_check(LSTMMetaLearner, **SINUSOID_BUDGET, **steps)
    assert mse["after"] < mse["before"] / 1.5, mse


def test_learned_optimizer_learns_to_adapt_to_held_out_sinusoids(one_thread):
    torch.set_num_threads(1)
    steps = {"adaptation_steps": 5, "test_adaptation_steps": 5}
    mse = learning_check(LearnedOptimizer, **SINUSOID_BUDGET | {"iterations": 500}, **steps)
    assert mse["after"] < mse["before"] / 1.6, mse


# --- through the runner ------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["lstm_meta", "learned_opt"])
@pytest.mark.parametrize("dataset", ["omniglot", "sinusoid"])
def test_runs_end_to_end_and_the_checkpoint_reproduces_the_test_score(
    make_cfg, tmp_path, one_thread, caplog, algo, dataset
):
    """A tiny run through the runner; the best checkpoint, loaded into a fresh instance,
    scores exactly the test result on the same fixed episodes (every meta-parameter is in
    the checkpoint). The progress lines name the task's metric."""
    from hydra.utils import instantiate

    from metarun import checkpoint, run
    from metarun.evaluation import evaluate, fixed_episodes

    overrides = ["algo.adaptation_steps=2", "algo.test_adaptation_steps=2"]
    if dataset == "sinusoid":
        overrides += [f"experiment={algo}_sinusoid", "model=mlp_sinusoid", "eval.report_steps=[1]"]
        overrides += ["train.iterations=4", "eval.val_every=2", "eval.query_shots=5"]
    else:
        overrides += [f"algo={algo}"]
    cfg = make_cfg(one_thread, *overrides)
    with caplog.at_level(logging.INFO, logger="metarun"):
        summary = run(cfg, tmp_path / "run")
    metric = "mse" if dataset == "sinusoid" else "acc"
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("it 4/4 ")]
    assert progress and f"  {metric} " in progress[0], progress
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    name = {"lstm_meta": "LSTMMetaLearner", "learned_opt": "LearnedOptimizer"}[algo]
    assert results["protocol"]["algorithm"] == name
    dataset_obj = instantiate(cfg.dataset)
    hardware = instantiate(cfg.hardware)
    fresh = instantiate(cfg.algo)(
        backbone=instantiate(cfg.model)(input_shape=dataset_obj.image_shape),
        task=getattr(dataset_obj, "task", CLASSIFICATION),
    )
    fresh.load_state_dict(checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")["algo"])
    e = cfg.eval
    pool = dataset_obj.pool("test")
    sampler = fixed_episodes(pool, e.ways, e.shots, e.query_shots, e.episode_seed)
    again = evaluate(fresh, sampler, e.test_episodes, hardware, fresh.task.score, metric)
    assert again.mean == pytest.approx(summary[f"test/{metric}"], rel=1e-6)
