"""Numerical identities of MAML and ProtoNet on tiny models (learn2learn's maml_test.py and
the ProtoNet paper's definitions as references)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms import MAML, ProtoNet
from metarun.algorithms.protonet import prototypes, squared_euclidean_logits
from metarun.data.episodes import Episode
from metarun.models import MLP, Conv4
from tests.gradcheck import assert_meta_gradient_matches_finite_differences


class TinyBackbone(nn.Module):
    """A linear-tanh feature map (no BatchNorm) so gradients can be checked exactly."""

    def __init__(self, d_in: int = 4, d_out: int = 3):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.out_features = d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x.flatten(1)))


def tiny_episode(
    ways: int = 3, shots: int = 2, query: int = 2, d: int = 4, seed: int = 0
) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        support_x=torch.randn(ways * shots, d, generator=g, dtype=torch.float64),
        support_y=torch.arange(ways).repeat_interleave(shots),
        query_x=torch.randn(ways * query, d, generator=g, dtype=torch.float64),
        query_y=torch.arange(ways).repeat_interleave(query),
        classes=torch.arange(ways),
    )


def tiny_maml(first_order: bool, steps: int = 2) -> MAML:
    torch.manual_seed(0)
    return MAML(
        TinyBackbone(),
        ways=3,
        fast_lr=0.3,
        adaptation_steps=steps,
        test_adaptation_steps=steps,
        first_order=first_order,
    ).double()


def flat_grad(algo: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in algo.parameters()])


def test_second_order_meta_gradient_matches_finite_differences():
    algo, ep = tiny_maml(first_order=False), tiny_episode()
    assert_meta_gradient_matches_finite_differences(algo, ep)


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_weights():
    algo, ep = tiny_maml(first_order=True), tiny_episode()
    algo.meta_loss(ep)[0].backward()
    # Manual formula: theta' = theta - lr * grad L_support (twice), then grad L_query(theta').
    params = {n: p.detach().clone() for n, p in algo.model.named_parameters()}
    for _ in range(2):
        fast = {n: p.clone().requires_grad_() for n, p in params.items()}
        loss = F.cross_entropy(
            torch.func.functional_call(algo.model, fast, (ep.support_x,)), ep.support_y
        )
        grads = torch.autograd.grad(loss, list(fast.values()))
        params = {n: p - 0.3 * g for (n, p), g in zip(params.items(), grads, strict=True)}
    fast = {n: p.clone().requires_grad_() for n, p in params.items()}
    loss = F.cross_entropy(torch.func.functional_call(algo.model, fast, (ep.query_x,)), ep.query_y)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(fast.values()))])
    torch.testing.assert_close(flat_grad(algo), expected)
    # ... and it differs from the second-order gradient.
    second = tiny_maml(first_order=False)
    second.meta_loss(ep)[0].backward()
    assert not torch.allclose(flat_grad(second), expected)


def test_adapt_leaves_the_model_and_its_batchnorm_statistics_untouched():
    torch.manual_seed(0)
    algo = MAML(
        Conv4((1, 28, 28), hidden=4),
        ways=5,
        fast_lr=0.4,
        adaptation_steps=1,
        test_adaptation_steps=3,
    )
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    x, y = torch.rand(5, 1, 28, 28), torch.arange(5)
    algo.eval()
    predict = algo.adapt(x, y)
    logits = predict(torch.rand(10, 1, 28, 28))
    assert logits.shape == (10, 5) and not logits.requires_grad
    for k, v in algo.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Adaptation does move the fast weights: predictions differ from the unadapted model.
    with torch.no_grad():
        algo.model.train()
        assert not torch.allclose(algo.model(x), predict(x))


def test_maml_rejects_episodes_whose_ways_differ_from_its_head():
    algo = tiny_maml(first_order=False)
    with pytest.raises(ValueError, match="train.ways and eval.ways must be equal"):
        algo.meta_loss(tiny_episode(ways=4))


@pytest.mark.parametrize("algo", ["maml", "metasgd", "reptile", "lstm_meta"])
def test_linear_head_algorithms_refuse_a_backbone_that_keeps_feature_maps(make_cfg, algo):
    """A linear head needs flat features: the error names model.flatten instead of a shape
    mismatch at the first forward pass."""
    from hydra.utils import instantiate

    cfg = make_cfg(f"algo={algo}", "model.flatten=false")
    backbone = instantiate(cfg.model)(input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="model.flatten=true"):
        instantiate(cfg.algo)(backbone=backbone)


def test_protonet_logits_match_a_hand_computation():
    # Identity embedding, 2 classes with 2 shots each, in 2-d.
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    protos = prototypes(support, labels, 2)
    torch.testing.assert_close(protos, torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    query = torch.tensor([[1.0, 1.0]])
    # distances^2: to (1,0): 0 + 1 = 1; to (0,3): 1 + 4 = 5
    torch.testing.assert_close(
        squared_euclidean_logits(query, protos), torch.tensor([[-1.0, -5.0]])
    )


def test_protonet_logits_match_the_direct_distances_on_wide_embeddings():
    """The matrix-product form of the distances agrees with ``-((q - c) ** 2).sum()`` on
    non-negative embeddings of the size a conv4 gives (ReLU outputs, 576 features), where
    the expansion subtracts large numbers."""
    torch.manual_seed(0)
    q, c = torch.rand(30, 576) * 2, torch.rand(20, 576) * 2
    direct = -((q[:, None, :] - c[None, :, :]) ** 2).sum(dim=-1)
    logits = squared_euclidean_logits(q, c)
    torch.testing.assert_close(logits, direct, rtol=1e-5, atol=1e-3)
    assert (logits.argmax(1) == direct.argmax(1)).all()


def test_protonet_meta_loss_is_cross_entropy_over_negative_distances():
    torch.manual_seed(0)
    backbone = MLP((4,), hidden_sizes=(3,), batch_norm=False).double()
    algo, ep = ProtoNet(backbone), tiny_episode()
    loss, acc = algo.meta_loss(ep)
    with torch.no_grad():
        zs, zq = backbone(ep.support_x), backbone(ep.query_x)
        c = torch.stack([zs[ep.support_y == k].mean(0) for k in range(3)])
        d = torch.stack([((q - c) ** 2).sum(1) for q in zq])
        expected = F.cross_entropy(-d, ep.query_y)
    torch.testing.assert_close(loss, expected)
    assert acc == ((-d).argmax(1) == ep.query_y).double().mean()


def test_protonet_distances_stay_fp32_under_bf16_autocast():
    """Under autocast the backbone's embeddings are bf16; the distances (and so the loss and
    the logits) are computed in fp32 from them, as a hand computation in fp32 does."""
    torch.manual_seed(0)
    backbone = Conv4((1, 28, 28), hidden=8)
    algo = ProtoNet(backbone)
    x, y = torch.rand(6, 1, 28, 28), torch.arange(3).repeat(2)
    ep = Episode(x[:3], y[:3], x[3:], y[3:], torch.arange(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = algo.meta_loss(ep)
        z = backbone(x)
        assert z.dtype == torch.bfloat16  # what the distances must not be computed in
        logits = algo.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    z = z.float()
    expected = F.cross_entropy(squared_euclidean_logits(z[3:], prototypes(z[:3], y[:3], 3)), y[3:])
    torch.testing.assert_close(loss, expected)


def test_protonet_running_mode_classifies_each_query_independently():
    torch.manual_seed(0)
    algo = ProtoNet(Conv4((1, 28, 28), hidden=4), bn_mode="running")
    algo.eval()
    x, y, q = torch.rand(5, 1, 28, 28), torch.arange(5), torch.rand(8, 1, 28, 28)
    predict = algo.adapt(x, y)
    together = predict(q)
    alone = torch.cat([predict(q[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
