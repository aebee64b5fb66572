"""Reptile, Meta-SGD and ANIL: numerical identities on tiny models (against hand
formulas and torch's own optimisers), and a short learning check on the real Omniglot."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD, Reptile
from tests.gradcheck import assert_meta_gradient_matches_finite_differences
from tests.test_algorithms import TinyBackbone, tiny_episode


def tiny_reptile(optimizer: str, steps: int = 3, inner_batch_size: int | None = None) -> Reptile:
    torch.manual_seed(0)
    return Reptile(
        TinyBackbone(),
        ways=3,
        fast_lr=0.1,
        adaptation_steps=steps,
        test_adaptation_steps=steps,
        inner_optimizer=optimizer,
        inner_batch_size=inner_batch_size,
    ).double()


def train_copy(model: torch.nn.Module, opt_factory, x, y, steps: int) -> torch.nn.Module:
    """``steps`` full-batch steps of a torch optimiser on a copy of ``model``."""
    model = copy.deepcopy(model)
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_reptile_outer_update_is_the_interpolation_toward_the_adapted_weights():
    algo, eps, tasks = tiny_reptile("sgd"), 0.5, [tiny_episode(seed=s) for s in range(3)]
    theta = [p.detach().clone() for p in algo.parameters()]
    adapted = [
        train_copy(algo.model, lambda ps: torch.optim.SGD(ps, lr=0.1), t.support_x, t.support_y, 3)
        for t in tasks
    ]
    expected = [
        th
        + eps * torch.stack([dict(w.named_parameters())[n].detach() - th for w in adapted]).mean(0)
        for (n, _), th in zip(algo.model.named_parameters(), theta, strict=True)
    ]
    # What the runner does: average the per-task losses' gradients, then its optimiser steps.
    outer = torch.optim.SGD(algo.parameters(), lr=eps)
    outer.zero_grad()
    for t, w in zip(tasks, adapted, strict=True):
        loss, acc = algo.meta_loss(t)
        (loss / len(tasks)).backward()
        # The value logged is the query loss of the adapted weights.
        torch.testing.assert_close(loss.detach(), F.cross_entropy(w(t.query_x), t.query_y))
    outer.step()
    for p, e in zip(algo.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e)


def test_reptile_inner_adam_matches_torch_adam_with_beta1_zero():
    algo, ep = tiny_reptile("adam", steps=4), tiny_episode()
    got = algo.adapted_params(ep.support_x, ep.support_y, 4, False, {})
    reference = train_copy(
        algo.model,
        lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.0, 0.999), eps=1e-8),
        ep.support_x,
        ep.support_y,
        4,
    )
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p.detach())
    assert not any(t.requires_grad for t in got.values())


def test_reptile_inner_minibatches_cycle_through_the_support_set():
    algo = tiny_reptile("sgd", inner_batch_size=4)
    batches = algo._minibatches(10, steps=5, device=torch.device("cpu"))
    assert [b.numel() for b in batches] == [4] * 5
    assert sorted(torch.cat(batches[:2]).tolist() + batches[2][:2].tolist()) == list(range(10))


def test_metasgd_inner_step_uses_the_learned_rates_which_get_gradients_and_change():
    torch.manual_seed(0)
    algo = MetaSGD(
        TinyBackbone(),
        ways=3,
        fast_lr=0.1,
        adaptation_steps=1,
        test_adaptation_steps=1,
        fast_lr_range=(0.005, 0.1),
    ).double()
    ep = tiny_episode()
    rates = [r.detach().clone() for r in algo.lrs]
    assert all(0.005 <= r.min() and r.max() <= 0.1 for r in rates)
    assert len({round(float(r.std()), 6) for r in rates if r.numel() > 1}) > 1  # not constant
    # One inner step is p - a * g, elementwise.
    params = dict(algo.model.named_parameters())
    loss = F.cross_entropy(algo.model(ep.support_x), ep.support_y)
    grads = torch.autograd.grad(loss, list(params.values()))
    adapted = algo.adapted_params(ep.support_x, ep.support_y, 1, False, {})
    for (name, p), g, a in zip(params.items(), grads, rates, strict=True):
        torch.testing.assert_close(adapted[name], p - a * g)
    # The rates are meta-parameters: they get gradients and the outer step moves them.
    opt = torch.optim.Adam(algo.parameters(), lr=1e-3)
    algo.meta_loss(ep)[0].backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in algo.lrs)
    opt.step()
    assert all(not torch.equal(r.detach(), r0) for r, r0 in zip(algo.lrs, rates, strict=True))


def tiny_anil() -> ANIL:
    torch.manual_seed(0)
    return ANIL(
        TinyBackbone(), ways=3, fast_lr=0.3, adaptation_steps=2, test_adaptation_steps=2
    ).double()


def test_anil_inner_loop_adapts_the_head_only_and_the_outer_loop_trains_the_body():
    algo, ep = tiny_anil(), tiny_episode()
    body_before = {n: p.detach().clone() for n, p in algo.body.named_parameters()}
    # Hand formula: two SGD steps of the head on fixed features of the initial body.
    with torch.no_grad():
        features = algo.body(ep.support_x)
    w, b = (p.detach().clone().requires_grad_() for p in (algo.head.weight, algo.head.bias))
    for _ in range(2):
        loss = F.cross_entropy(features @ w.T + b, ep.support_y)
        gw, gb = torch.autograd.grad(loss, (w, b))
        w, b = (w - 0.3 * gw).detach().requires_grad_(), (b - 0.3 * gb).detach().requires_grad_()
    predict = algo.adapt(ep.support_x, ep.support_y)
    with torch.no_grad():
        expected = algo.body(ep.query_x) @ w.T + b
    torch.testing.assert_close(predict(ep.query_x), expected)
    head = algo.adapted_head(features, ep.support_y, 2, False)
    assert set(head) == {"weight", "bias"}
    for n, p in algo.body.named_parameters():
        assert torch.equal(p, body_before[n]), n
    # The meta-gradient reaches both the body and the head's initialisation.
    algo.meta_loss(ep)[0].backward()
    assert all(p.grad.abs().sum() > 0 for p in algo.parameters())


def test_anil_meta_gradient_matches_finite_differences():
    algo, ep = tiny_anil(), tiny_episode()
    assert_meta_gradient_matches_finite_differences(algo, ep)


# Omniglot 5-way 1-shot, a narrow Conv4, 40 meta-iterations of 4 tasks: each algorithm must
# beat chance (20%) by a wide margin on 50 fixed test episodes (500 queries; at chance the
# accuracy's standard deviation would be ~1.8 points).
LEARNING_BUDGET = [
    "model.hidden=16",
    "train.iterations=40",
    "train.meta_batch_size=4",
    "eval.val_every=0",
    "eval.test_episodes=50",
    "checkpoint_every=1000",
    "log_every=20",
]


@pytest.mark.parametrize(
    ("algo", "name", "overrides", "floor"),
    [
        ("metasgd", "MetaSGD", ["algo.test_adaptation_steps=3"], 0.40),
        ("anil", "ANIL", [], 0.40),
        ("reptile", "Reptile", ["algo.test_adaptation_steps=10", "train.shots=5"], 0.35),
        (
            "mamlpp",
            "MAMLPlusPlus",
            [
                "algo.adaptation_steps=2",
                "algo.msl_anneal_tasks=80",
                "algo.first_order_until_tasks=40",
            ],
            0.40,
        ),
    ],
)
def test_learns_omniglot_on_a_tiny_budget(
    make_cfg, tmp_path, one_thread, algo, name, overrides, floor
):
    from metarun import run

    cfg = make_cfg(f"algo={algo}", one_thread, *LEARNING_BUDGET, *overrides)
    summary = run(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["protocol"]["algorithm"] == name
    assert summary["test/acc"] >= floor, summary


def tiny_mamlpp(**switches) -> MAMLPlusPlus:
    torch.manual_seed(0)
    return MAMLPlusPlus(
        TinyBackbone(),
        ways=3,
        fast_lr=0.3,
        adaptation_steps=3,
        test_adaptation_steps=3,
        **switches,
    ).double()


def tiny_maml_steps(steps: int, first_order: bool = False) -> MAML:
    torch.manual_seed(0)
    return MAML(
        TinyBackbone(),
        ways=3,
        fast_lr=0.3,
        adaptation_steps=steps,
        test_adaptation_steps=steps,
        first_order=first_order,
    ).double()


def grads_of(algo: torch.nn.Module, ep) -> torch.Tensor:
    algo.zero_grad()
    algo.meta_loss(ep)[0].backward()
    return torch.cat([p.grad.flatten() for p in algo.model.parameters()])


def test_mamlpp_with_every_switch_off_is_maml():
    ep = tiny_episode()
    plain, pp = tiny_maml_steps(3), tiny_mamlpp()
    torch.testing.assert_close(pp.meta_loss(ep)[0], plain.meta_loss(ep)[0])
    torch.testing.assert_close(grads_of(pp, ep), grads_of(plain, ep))


def test_multi_step_loss_weights_the_query_loss_after_every_step_and_anneals():
    ep = tiny_episode()
    algo = tiny_mamlpp(multi_step_loss=True, msl_anneal_tasks=10)
    # At the start: the plain mean of the query losses after 1, 2 and 3 steps.
    per_step = torch.stack([tiny_maml_steps(k).meta_loss(ep)[0] for k in (1, 2, 3)])
    torch.testing.assert_close(algo.msl_weights(), torch.full((3,), 1 / 3, dtype=torch.float32))
    torch.testing.assert_close(algo.meta_loss(ep)[0], per_step.mean())
    # Each training task advances the annealing; after msl_anneal_tasks it stays at the floor.
    assert int(algo.tasks_seen) == 1
    algo.tasks_seen.fill_(10)
    w = algo.msl_weights()
    torch.testing.assert_close(w[:2], torch.full((2,), 0.01))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    expected = (w.double() * per_step).sum()
    torch.testing.assert_close(algo.meta_loss(ep)[0], expected)
    # The metric is the final step's, as in plain MAML.
    torch.testing.assert_close(algo.meta_loss(ep)[1], tiny_maml_steps(3).meta_loss(ep)[1])


def test_learned_step_lrs_are_per_layer_per_step_and_get_gradients():
    ep = tiny_episode()
    algo = tiny_mamlpp(learn_step_lrs=True)
    assert [tuple(p.shape) for p in algo.step_lrs] == [(3,)] * 4  # weight, bias, head w, b
    # Starting at fast_lr they reproduce MAML exactly...
    torch.testing.assert_close(algo.meta_loss(ep)[0], tiny_maml_steps(3).meta_loss(ep)[0])
    algo.zero_grad()
    algo.meta_loss(ep)[0].backward()
    assert all(p.grad is not None and (p.grad != 0).all() for p in algo.step_lrs)
    # ...and a rate only acts on its own layer and step: zero every rate but step 0 of the
    # head's bias, and one step changes that bias only.
    with torch.no_grad():
        for p in algo.step_lrs:
            p.zero_()
        algo.step_lrs[3][0] = 0.3
    adapted = algo.adapted_params(ep.support_x, ep.support_y, 3, False, {})
    for name, p in algo.model.named_parameters():
        assert torch.equal(adapted[name], p) == (name != "1.bias"), name


def test_derivative_order_annealing_is_first_order_then_second_order():
    ep = tiny_episode()
    algo = tiny_mamlpp(first_order_until_tasks=2)
    fo, so = grads_of(tiny_maml_steps(3, first_order=True), ep), grads_of(tiny_maml_steps(3), ep)
    assert not torch.allclose(fo, so)
    torch.testing.assert_close(grads_of(algo, ep), fo)  # task 1
    torch.testing.assert_close(grads_of(algo, ep), fo)  # task 2
    torch.testing.assert_close(grads_of(algo, ep), so)  # task 3 onwards: second order
    # Evaluation does not count as training tasks.
    algo.eval()
    algo.adapt(ep.support_x, ep.support_y)
    assert int(algo.tasks_seen) == 3


def test_mamlpp_rejects_other_engines():
    with pytest.raises(ValueError, match="use algo.engine=loop"):
        MAMLPlusPlus(TinyBackbone(), 3, 0.3, 1, 1, engine="vmap")
