"""MAML++ per-step batch norm (BNRS + BNWB) and the cosine meta-learning-rate schedule: the
switch changes what it should and nothing else, checked on a tiny batch-norm model and
through the real runner."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metarun.algorithms import MAML, MAMLPlusPlus
from tests.test_algorithms import TinyBackbone, tiny_episode

STEPS = 3
LR = 0.3


class BatchNormBackbone(nn.Module):
    """Linear -> BatchNorm1d -> tanh: small enough to check statistics by hand."""

    def __init__(self, d_in: int = 4, d_out: int = 3):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.norm = nn.BatchNorm1d(d_out)
        self.out_features = d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.linear(x)))


def make(cls: type = MAMLPlusPlus, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    backbone = BatchNormBackbone()
    with torch.no_grad():  # non-trivial affine parameters, so swapping them is visible
        backbone.norm.weight.uniform_(0.5, 1.5)
        backbone.norm.bias.uniform_(-0.5, 0.5)
    return cls(backbone, 3, LR, STEPS, STEPS, **kwargs).double()


def per_step(algo: MAMLPlusPlus, name: str) -> torch.Tensor:
    return algo.step_bn.weights[name.replace(".", "-")]


def step_buffer(algo: MAMLPlusPlus, name: str) -> torch.Tensor:
    return algo.step_bn.get_buffer(name.replace(".", "-"))


def test_switch_off_is_maml_on_a_batch_norm_model():
    ep = tiny_episode()
    maml, pp = make(MAML), make(per_step_bn=False)
    assert pp.step_bn is None
    assert set(pp.state_dict()) == set(maml.state_dict()) | {"tasks_seen"}
    for algo in (maml, pp):
        algo.zero_grad()
        algo.meta_loss(ep)[0].backward()
    torch.testing.assert_close(pp.meta_loss(ep)[0], maml.meta_loss(ep)[0])
    for (name, p), q in zip(pp.model.named_parameters(), maml.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(pp.model.named_buffers(), maml.model.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)  # the same running statistics


def test_each_inner_step_keeps_its_own_running_statistics():
    ep = tiny_episode()
    algo = make(per_step_bn=True)
    own = {n: b.clone() for n, b in algo.model.named_buffers()}
    algo.meta_loss(ep)
    mean, var = step_buffer(algo, "0.norm.running_mean"), step_buffer(algo, "0.norm.running_var")
    assert mean.shape == var.shape == (STEPS, 3)
    # Step 0 saw the support set once, through the initial linear layer (momentum 0.1).
    with torch.no_grad():
        z = algo.model[0].linear(ep.support_x)
    torch.testing.assert_close(mean[0], 0.1 * z.mean(0))
    torch.testing.assert_close(var[0], 0.9 + 0.1 * z.var(0))
    # Every step normalised different activations (the linear layer moved between them),
    # and the last set also saw the final query pass.
    for i in range(STEPS):
        for j in range(i + 1, STEPS):
            assert not torch.allclose(mean[i], mean[j]), (i, j)
    assert step_buffer(algo, "0.norm.num_batches_tracked").tolist() == [1, 1, 2]
    for name, b in algo.model.named_buffers():  # the model's own statistics are not used
        assert torch.equal(b, own[name]), name


def test_each_inner_step_uses_its_own_weights_and_biases():
    ep = tiny_episode()
    algo = make(per_step_bn=True, learn_step_lrs=True)
    names = ["0.norm.weight", "0.norm.bias"]
    assert set(algo.inner_params()) == {"0.linear.weight", "0.linear.bias", "1.weight", "1.bias"}
    assert len(algo.step_lrs) == 4  # rates only for what the inner loop adapts
    for name in names:  # every set starts at the model's values
        model_value = algo.model.get_parameter(name).detach()
        torch.testing.assert_close(per_step(algo, name), model_value.expand(STEPS, -1))
    before = algo.adapted_params(ep.support_x, ep.support_y, STEPS, False, {})
    with torch.no_grad():
        per_step(algo, "0.norm.bias")[STEPS - 1] += 1.0
    after = algo.adapted_params(ep.support_x, ep.support_y, STEPS, False, {})
    two_before = make(per_step_bn=True, learn_step_lrs=True).adapted_params(
        ep.support_x, ep.support_y, STEPS - 1, False, {}
    )
    two_after = algo.adapted_params(ep.support_x, ep.support_y, STEPS - 1, False, {})
    for name in two_before:  # steps 0 and 1 do not read step 2's bias...
        torch.testing.assert_close(two_after[name], two_before[name])
    assert not torch.allclose(after["1.weight"], before["1.weight"])  # ...step 2 does
    # Outer loop: every step's weight and bias gets a gradient; the model's own are frozen.
    algo.zero_grad()
    algo.meta_loss(ep)[0].backward()
    for name in names:
        assert not algo.model.get_parameter(name).requires_grad
        assert algo.model.get_parameter(name).grad is None
        grad = per_step(algo, name).grad
        assert grad is not None and (grad.abs().sum(1) > 0).all(), name
    meta_params = {id(p) for p in algo.parameters() if p.requires_grad}
    assert all(id(per_step(algo, n)) in meta_params for n in names)


def test_evaluation_with_running_statistics_reads_the_last_steps_set_and_changes_nothing():
    ep = tiny_episode()
    algo = make(per_step_bn=True, bn_mode="running")
    algo.meta_loss(ep)  # fill the per-step statistics
    algo.eval()
    state = {k: v.clone() for k, v in algo.state_dict().items()}
    one_step = algo.adapt(ep.support_x, ep.support_y, steps=1)(ep.query_x)
    # By hand: one inner step with set 0, then the queries through set 0 in eval mode.
    buffers = dict(algo.model.named_buffers())
    params = algo.inner_params()

    def forward(params: dict, k: int, x: torch.Tensor) -> torch.Tensor:
        bn = {n: per_step(algo, n)[k] for n in ("0.norm.weight", "0.norm.bias")}
        stats = {
            n: step_buffer(algo, n)[k]
            for n in ("0.norm.running_mean", "0.norm.running_var", "0.norm.num_batches_tracked")
        }
        return functional_call(algo.model, (params | bn, buffers | stats), (x,))

    loss = algo.task.loss(forward(params, 0, ep.support_x), ep.support_y)
    grads = torch.autograd.grad(loss, tuple(params.values()))
    params = {n: p - LR * g for (n, p), g in zip(params.items(), grads, strict=True)}
    with torch.no_grad():
        torch.testing.assert_close(one_step, forward(params, 0, ep.query_x))
        assert not torch.allclose(one_step, forward(params, 1, ep.query_x))
    for k, v in algo.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_per_step_bn_without_batch_norm_names_the_fix():
    with pytest.raises(ValueError, match="algo.per_step_bn=false"):
        MAMLPlusPlus(TinyBackbone(), 3, LR, STEPS, STEPS, per_step_bn=True)


def test_mamlpp_experiment_anneals_the_meta_learning_rate_along_a_cosine(
    make_cfg, tmp_path, one_thread
):
    from metarun import run

    iterations, high, low = 6, 0.002, 0.0005
    cfg = make_cfg(
        "experiment=mamlpp_omniglot_5w1s",
        one_thread,
        f"train.iterations={iterations}",
        f"train.meta_lr={high}",
        f"train.min_lr={low}",
        "algo.adaptation_steps=2",
        "algo.test_adaptation_steps=2",
        "eval.val_every=0",
        "eval.test_episodes=2",
    )
    assert cfg.train.lr_schedule.value == "cosine" and cfg.algo.per_step_bn
    run(cfg, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    expected = [
        low + (high - low) * (1 + math.cos(math.pi * i / iterations)) / 2 for i in range(iterations)
    ]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
