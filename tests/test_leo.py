"""LEO (metarun.algorithms.leo): a hand-checked forward and inner step, the latent inner
loop touching only the latent codes, the meta-gradient, the frozen encoder from another
run's checkpoint, and a short learning check on the real Omniglot."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms import LEO, ProtoNet
from metarun.data.episodes import EpisodeSampler
from metarun.models import Conv4
from tests.gradcheck import assert_meta_gradient_matches_finite_differences
from tests.test_algorithms import TinyBackbone, tiny_episode


class Features(nn.Module):
    """The identity on ``(n, d)`` features, as a backbone."""

    def __init__(self, d: int):
        super().__init__()
        self.out_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def tiny_leo(backbone: nn.Module | None = None, **kwargs) -> LEO:
    torch.manual_seed(0)
    settings = dict(latent_size=2, relation_layers=2, adaptation_steps=2, finetuning_steps=2)
    return LEO(backbone or TinyBackbone(), **(settings | kwargs)).double()


def test_encode_decode_and_one_latent_step_match_a_hand_computation():
    # One feature per image; encoder, relation network and decoder set by hand.
    leo = LEO(Features(1), latent_size=1, relation_layers=1, fast_lr=0.5, dropout=0.0).double()
    leo.eval()
    with torch.no_grad():
        leo.encoder.weight.fill_(1.0), leo.encoder.bias.zero_()
        leo.relation[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        leo.relation[0].bias.zero_()
        leo.decoder.weight.copy_(torch.tensor([[2.0], [0.0]]))
        leo.decoder.bias.zero_()
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # class 0, class 1
    y = torch.tensor([0, 1])
    latent = leo.encode(x, y, ways=2)
    # Relation outputs (c_i + c_j, 0); example 0: ((1+1) + (1+3)) / 2 = 3, example 1: 5.
    torch.testing.assert_close(latent.mean, torch.tensor([[3.0], [5.0]], dtype=torch.float64))
    torch.testing.assert_close(latent.std, torch.full((2, 1), math.log(2.0) + 1e-6).double())
    weights = leo.decode(latent.mean)  # the mean of the weights: 2 z
    torch.testing.assert_close(weights, torch.tensor([[6.0], [10.0]], dtype=torch.float64))
    torch.testing.assert_close(leo.logits(x, weights), x @ torch.tensor([[6.0, 10.0]]).double())
    # One latent step: logits x_i * 2 z_c, so dL/dz_c = mean_i 2 x_i (p_ic - [y_i = c]).
    z = latent.mean.detach().requires_grad_()
    p = torch.softmax(x * torch.tensor([[6.0, 10.0]], dtype=torch.float64), dim=1)
    grad = (2 * x * (p - F.one_hot(y, 2))).mean(dim=0)[:, None]
    stepped = leo.adapt_latents(x, y, z, steps=1, create_graph=False)
    torch.testing.assert_close(stepped, z - 0.5 * grad)


def test_shapes_and_any_number_of_ways():
    leo = LEO(Conv4((1, 28, 28), hidden=8), latent_size=4)
    for ways in (5, 20):
        x = torch.rand(ways * 2, 1, 28, 28)
        y = torch.arange(ways).repeat_interleave(2)
        latent = leo.encode(leo.features(x), y, ways)
        assert latent.mean.shape == latent.std.shape == (ways, 4)
        assert leo.decode(latent.mean).shape == (ways, leo.backbone.out_features)
        predict = leo.adapt(x, y)
        assert predict(torch.rand(7, 1, 28, 28)).shape == (7, ways)


def test_latent_inner_loop_differentiates_and_changes_the_latent_codes_only(monkeypatch):
    leo = tiny_leo()
    ep = tiny_episode()
    features = leo.features(ep.support_x)
    z = leo.encode(features, ep.support_y, ep.ways).sample(True)
    before = {k: v.clone() for k, v in leo.state_dict().items()}
    differentiated = []
    real_grad = torch.autograd.grad

    def recording_grad(outputs, inputs, **kwargs):
        differentiated.append(inputs)
        return real_grad(outputs, inputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    adapted = leo.adapt_latents(features, ep.support_y, z, steps=3, create_graph=True)
    monkeypatch.undo()
    # Three inner gradients, each with respect to the current latent codes and nothing else.
    assert len(differentiated) == 3
    assert all(isinstance(t, torch.Tensor) and t.shape == z.shape for t in differentiated)
    assert differentiated[0] is z
    params = {id(p) for p in leo.parameters()}
    assert not any(id(t) in params for t in differentiated)
    # The codes moved; every parameter and buffer is as it was, and none got a gradient.
    assert adapted.shape == z.shape and not torch.allclose(adapted, z)
    for name, value in leo.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in leo.parameters())


def test_meta_gradient_reaches_every_parameter_and_matches_finite_differences():
    leo = tiny_leo(kl_weight=0.1, encoder_penalty_weight=0.1, orthogonality_weight=0.1)
    ep = tiny_episode()
    leo.train()
    leo.meta_loss(ep)[0].backward()  # sampled codes and weights, dropout
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in leo.parameters())
    leo.eval()  # deterministic: means, no dropout; the same computation otherwise
    # The encoder penalty stops the gradient through the adapted codes, so its analytic
    # gradient is not the derivative of the loss: it is left out of this check.
    leo.encoder_penalty_weight = 0.0
    assert_meta_gradient_matches_finite_differences(leo, ep)


def test_adapt_leaves_the_model_untouched_and_is_deterministic():
    leo = LEO(Conv4((1, 28, 28), hidden=8), latent_size=4)
    leo.train()
    x, y = torch.rand(10, 1, 28, 28), torch.arange(5).repeat_interleave(2)
    before = {k: v.clone() for k, v in leo.state_dict().items()}
    first = leo.adapt(x, y)(x[:3])
    torch.testing.assert_close(leo.adapt(x, y)(x[:3]), first)
    assert leo.training
    for name, value in leo.state_dict().items():
        assert torch.equal(value, before[name]), name


def save_protonet_checkpoint(path, hidden: int) -> ProtoNet:
    torch.manual_seed(1)
    protonet = ProtoNet(Conv4((1, 28, 28), hidden=hidden))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"algo": protonet.state_dict()}, path)
    return protonet


def test_encoder_checkpoint_loads_and_freezes_another_runs_backbone(tmp_path):
    protonet = save_protonet_checkpoint(tmp_path / "best.pt", hidden=8)
    leo = LEO(Conv4((1, 28, 28), hidden=8), encoder_checkpoint=str(tmp_path / "best.pt"))
    for name, value in protonet.backbone.state_dict().items():
        assert torch.equal(leo.backbone.state_dict()[name], value), name
    sampler = EpisodeSampler(_random_pool(), 5, 1, 2, seed=0)
    leo.train()
    before = {k: v.clone() for k, v in leo.backbone.state_dict().items()}
    leo.meta_loss(sampler.sample().to("cpu"))[0].backward()
    assert all(p.grad is None for p in leo.backbone.parameters())
    assert leo.encoder.weight.grad is not None
    for name, value in leo.backbone.state_dict().items():  # BatchNorm statistics too
        assert torch.equal(value, before[name]), name


def test_encoder_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    save_protonet_checkpoint(tmp_path / "best.pt", hidden=16)
    with pytest.raises(ValueError, match="model.hidden"):
        LEO(Conv4((1, 28, 28), hidden=8), encoder_checkpoint=str(tmp_path / "best.pt"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        LEO(Conv4((1, 28, 28), hidden=8), encoder_checkpoint=str(tmp_path / "missing.pt"))


def _random_pool():
    from metarun.data.episodes import ClassPool

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 4, 1, 28, 28), dtype=torch.uint8, generator=g)
    return ClassPool.from_grouped(images, [f"c{i}" for i in range(6)])


def test_learns_omniglot_on_a_tiny_budget(make_cfg, tmp_path, one_thread):
    """Trained jointly (no encoder checkpoint) for 60 iterations of 4 tasks: 52.5% on 50
    test episodes when measured (5-way 1-shot; chance is 20%)."""
    from metarun import run

    budget = [
        "algo=leo",
        one_thread,
        "model.hidden=16",
        "train.iterations=60",
        "train.meta_batch_size=4",
        "train.meta_lr=0.005",
        "algo.dropout=0",
        "train.query_shots=5",
        "eval.val_every=0",
        "eval.test_episodes=50",
        "eval.query_shots=5",
        "checkpoint_every=1000",
        "log_every=20",
    ]
    summary = run(make_cfg(*budget), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["protocol"]["algorithm"] == "LEO"
    assert summary["test/acc"] >= 0.40, summary


def test_resumed_run_ends_like_an_uninterrupted_one(make_cfg, tmp_path, one_thread):
    """A run stopped after 2 of 4 iterations (its last.pt then says 4) and resumed ends
    with the metrics and test result of a run of 4 (tiny sizes; on CPU)."""
    from omegaconf import OmegaConf

    from metarun import run
    from metarun.checkpoint import load
    from metarun.data.files import atomic_torch_save

    overrides = ["algo=leo", one_thread, "algo.adaptation_steps=2", "algo.finetuning_steps=1"]
    run(make_cfg(*overrides), tmp_path / "ref")
    run(make_cfg(*overrides, "train.iterations=2"), tmp_path / "stopped")
    last = tmp_path / "stopped" / "checkpoints" / "last.pt"
    ckpt = load(last)
    ckpt["config"]["train"]["iterations"] = 4  # as if stopped half-way through the run of 4
    atomic_torch_save(ckpt, last)
    run(OmegaConf.create({"resume": str(tmp_path / "stopped")}), tmp_path / "unused")

    def metrics(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
        return [r for r in rows if len(r) > 1]

    # The stopped run also tested its iteration-2 model before being resumed; drop that row.
    stopped = [
        r for r in metrics(tmp_path / "stopped") if "test/acc" not in r or r["iteration"] == 4
    ]
    assert stopped == metrics(tmp_path / "ref")
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())["test"]
    assert json.loads((tmp_path / "stopped" / "results.json").read_text())["test"] == ref
