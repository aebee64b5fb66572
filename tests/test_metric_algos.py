"""Matching, Relation and Siamese networks: shapes, forwards checked by hand on tiny inputs,
the balanced seeded pair sampler, and a short learning check on the real Omniglot."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from torch import nn

from metarun.algorithms import MatchingNetworks, RelationNetworks, SiameseNetworks
from metarun.algorithms.siamese import PairSampler
from metarun.data.episodes import Episode
from metarun.models import Conv4


class Identity(nn.Module):
    """Features = the input vectors themselves, so forwards can be computed by hand."""

    def __init__(self, d: int):
        super().__init__()
        self.out_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def image_episode(ways: int = 3, shots: int = 2, query: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        support_x=torch.rand(ways * shots, 1, 28, 28, generator=g),
        support_y=torch.arange(ways).repeat_interleave(shots),
        query_x=torch.rand(ways * query, 1, 28, 28, generator=g),
        query_y=torch.arange(ways).repeat_interleave(query),
        classes=torch.arange(ways),
    )


ALGOS = {
    "matching": lambda: MatchingNetworks(Conv4((1, 28, 28), hidden=4)),
    "matching_fce": lambda: MatchingNetworks(Conv4((1, 28, 28), hidden=4), fce=True),
    "relation_maps": lambda: RelationNetworks(
        Conv4((1, 28, 28), hidden=4, pool_blocks=2, flatten=False), relation_channels=6
    ),
    "relation_vectors": lambda: RelationNetworks(Conv4((1, 28, 28), hidden=4)),
    "siamese": lambda: SiameseNetworks(Conv4((1, 28, 28), hidden=4), embedding_size=32),
}


@pytest.mark.parametrize("name", sorted(ALGOS))
def test_shapes_gradients_and_adapt_leaves_the_state_untouched(name):
    torch.manual_seed(0)
    algo, ep = ALGOS[name](), image_episode()
    loss, acc = algo.meta_loss(ep)
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 <= acc <= 1
    loss.backward()
    # Every parameter takes part in the loss (the distance weights, the LSTMs, ...).
    missing = [n for n, p in algo.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    algo.eval()
    for ways, shots in ((3, 2), (5, 1)):  # any number of ways and shots at test time
        other = image_episode(ways, shots, query=4, seed=1)
        logits = algo.adapt(other.support_x, other.support_y)(other.query_x)
        assert logits.shape == (ways * 4, ways) and not logits.requires_grad
    for k, v in algo.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_conv4_options_keep_the_default_and_give_feature_maps():
    x = torch.rand(2, 1, 28, 28)
    torch.manual_seed(0)
    default = Conv4((1, 28, 28), hidden=4)
    torch.manual_seed(0)
    maps = Conv4((1, 28, 28), hidden=4, pool_blocks=2, flatten=False)
    assert default(x).shape == (2, 4) and default.out_shape == (4,)
    assert maps(x).shape == (2, 4, 7, 7) and maps.out_shape == (4, 7, 7)
    assert maps.out_features == 4 * 7 * 7
    # Same parameters in the same order: the options only drop pools and the flatten.
    assert [n for n, _ in default.named_parameters()] == [n for n, _ in maps.named_parameters()]
    torch.manual_seed(0)
    unflattened = Conv4((1, 28, 28), hidden=4, flatten=False)
    torch.testing.assert_close(unflattened(x).flatten(1), default(x))


# ----------------------------------------------------------------------------- Matching


def test_matching_attention_is_a_softmax_over_cosine_similarities():
    support = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    support_y = torch.tensor([0, 1, 1, 2])  # class 1 has two shots
    query = torch.tensor([[2.0, 1.0]])
    # By hand: cos(q, s_i) = q.s_i / (|q| |s_i|), |q| = sqrt(5).
    cos = [
        2 / math.sqrt(5),
        1 / math.sqrt(5),
        9 / (math.sqrt(5) * math.sqrt(18)),
        -2 / math.sqrt(5),
    ]
    e = [math.exp(c) for c in cos]
    attention = [v / sum(e) for v in e]
    expected = torch.tensor([[attention[0], attention[1] + attention[2], attention[3]]])
    algo = MatchingNetworks(Identity(2))
    algo.eval()
    log_p = algo.adapt(support, support_y)(query)
    torch.testing.assert_close(log_p.exp(), expected)
    # Training: the negative log of the true class's attention mass.
    ep = Episode(support, support_y, query, torch.tensor([1]), torch.arange(3))
    loss, acc = algo.meta_loss(ep)
    torch.testing.assert_close(loss, -torch.log(expected[0, 1]))
    assert acc == 1.0  # class 1 holds the most attention (0.2567 + 0.3997 > 0.3436)


def test_matching_fce_support_lstm_is_bidirectional_and_queries_are_independent():
    torch.manual_seed(0)
    algo = MatchingNetworks(Identity(3), fce=True, fce_steps=2)
    fce = algo.fce
    g = torch.randn(4, 3)
    out = fce.support(g)
    changed = g.clone()
    changed[3] += 1.0  # change the last support example
    out2 = fce.support(changed)
    # Every context embedding sees the whole support set (through the backward LSTM)...
    assert not torch.allclose(out[:3], out2[:3])
    # ... and the forward LSTM's outputs at positions 0..2 do not see position 3.
    fwd = fce.support_lstm(g[None])[0][0, :, :3]
    fwd2 = fce.support_lstm(changed[None])[0][0, :, :3]
    torch.testing.assert_close(fwd[:3], fwd2[:3])
    # Each query is embedded on its own: together or one by one, the same.
    f = torch.randn(5, 3)
    together = fce.query(f, out)
    alone = torch.cat([fce.query(f[i : i + 1], out) for i in range(5)])
    torch.testing.assert_close(together, alone)


def test_matching_fce_attention_lstm_one_read_by_hand():
    torch.manual_seed(0)
    d = 3
    algo = MatchingNetworks(Identity(d), fce=True, fce_steps=1)
    cell = algo.fce.query_cell
    f, g = torch.randn(2, d), torch.randn(4, d)
    # K = 1 from h_0 = c_0 = 0: the read r_0 is the uniform average of g (softmax of zeros);
    # the LSTM gates (input, forget, cell, output) come from one linear map of [f, r_0, h_0].
    r0 = g.mean(0).expand(2, d)
    gates = torch.cat([f, r0], 1) @ cell.weight_ih.T + cell.bias_ih + cell.bias_hh
    i, _, c_hat, o = gates.chunk(4, dim=1)
    c1 = torch.sigmoid(i) * torch.tanh(c_hat)
    h1 = torch.sigmoid(o) * torch.tanh(c1) + f
    torch.testing.assert_close(algo.fce.query(f, g), h1)


# ----------------------------------------------------------------------------- Relation


def test_relation_loss_is_mse_against_one_hot_on_summed_class_features():
    torch.manual_seed(0)
    algo = RelationNetworks(Identity(2), relation_hidden=5)
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 3.0]])
    support_y = torch.tensor([0, 0, 1, 1])  # two shots per class: summed
    query = torch.tensor([[0.5, 0.5], [2.0, -1.0], [1.0, 1.0]])
    query_y = torch.tensor([0, 1, 1])
    ep = Episode(support, support_y, query, query_y, torch.arange(2))
    loss, acc = algo.meta_loss(ep)
    classes = [support[0] + support[1], support[2] + support[3]]
    with torch.no_grad():
        scores = torch.tensor(
            [
                [torch.sigmoid(algo.relation.head(torch.cat([c, q]))).item() for c in classes]
                for q in query
            ]
        )
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(loss, ((scores - one_hot) ** 2).mean())
    assert acc == (scores.argmax(1) == query_y).float().mean()
    algo.eval()
    logits = algo.adapt(support, support_y)(query)
    torch.testing.assert_close(torch.sigmoid(logits), scores)


def test_relation_pairs_concatenate_class_then_query_feature_maps():
    torch.manual_seed(0)
    backbone = Conv4((1, 28, 28), hidden=3, pool_blocks=2, flatten=False)
    algo = RelationNetworks(backbone, relation_channels=4).eval()
    ep = image_episode(ways=2, shots=3, query=1)
    with torch.no_grad():
        zs, zq = backbone(ep.support_x), backbone(ep.query_x)
        summed = [zs[ep.support_y == c].sum(0) for c in range(2)]
        by_hand = torch.stack(
            [torch.cat([algo.relation(torch.cat([c, q])[None]) for c in summed]) for q in zq]
        )
        got = algo.relation_logits(zs, ep.support_y, zq, 2)
    torch.testing.assert_close(got, by_hand)


def test_relation_refuses_feature_maps_too_small_for_its_pools():
    with pytest.raises(ValueError, match="model.pool_blocks=2"):
        RelationNetworks(Conv4((1, 28, 28), hidden=4, flatten=False))


# ----------------------------------------------------------------------------- Siamese


def test_siamese_predicts_the_class_of_the_support_image_with_the_highest_sigmoid_score():
    torch.manual_seed(0)
    algo = SiameseNetworks(Identity(3), embedding_size=0)
    with torch.no_grad():
        algo.distance.weight.copy_(torch.tensor([[-1.0, -2.0, -0.5]]))
        algo.distance.bias.fill_(0.3)
    support = torch.randn(6, 3)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])  # 2 shots per class, interleaved
    query = torch.randn(8, 3)
    algo.eval()
    logits = algo.adapt(support, support_y)(query)
    for q, row in zip(query, logits, strict=True):
        # By hand: p = sigmoid(sum_j alpha_j |q_j - s_j| + b) for every support image.
        alpha = torch.tensor([-1.0, -2.0, -0.5])
        p = [torch.sigmoid((alpha * (q - s).abs()).sum() + 0.3) for s in support]
        best = max(range(6), key=lambda i: p[i])
        assert int(row.argmax()) == int(support_y[best])
        torch.testing.assert_close(torch.sigmoid(row.max()), p[best])


def test_siamese_loss_is_binary_cross_entropy_on_the_sampled_pairs():
    torch.manual_seed(0)
    algo = SiameseNetworks(Identity(4), embedding_size=0, pairs_per_episode=6, pair_seed=3)
    ep = Episode(
        torch.randn(6, 4),
        torch.arange(3).repeat(2),
        torch.randn(3, 4),
        torch.arange(3),
        torch.arange(3),
    )
    images = torch.cat([ep.support_x, ep.query_x])
    pairs = PairSampler(6, seed=3).sample(torch.cat([ep.support_y, ep.query_y]), index=0)
    loss, _ = algo.meta_loss(ep)
    w, b = algo.distance.weight[0], algo.distance.bias[0]
    terms = []
    for i, j, t in zip(pairs.left, pairs.right, pairs.same, strict=True):
        p = torch.sigmoid((w * (images[i] - images[j]).abs()).sum() + b)
        terms.append(-(t * torch.log(p) + (1 - t) * torch.log(1 - p)))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert int(algo.episodes_seen) == 1


def test_pair_sampler_is_balanced_valid_and_reproducible_with_a_seed():
    labels = torch.arange(5).repeat_interleave(4)[torch.randperm(20)]
    sampler = PairSampler(64, seed=7)
    pairs = sampler.sample(labels, index=0)
    assert pairs.same.sum() == 32 and pairs.same.numel() == 64
    same_label = labels[pairs.left] == labels[pairs.right]
    assert torch.equal(same_label, pairs.same.bool())
    assert (pairs.left != pairs.right).all()  # never an image with itself
    again = PairSampler(64, seed=7).sample(labels, index=0)
    assert torch.equal(pairs.left, again.left) and torch.equal(pairs.right, again.right)
    for other in (PairSampler(64, seed=8).sample(labels, 0), sampler.sample(labels, 1)):
        assert not torch.equal(
            torch.stack([pairs.left, pairs.right]), torch.stack([other.left, other.right])
        )
    # Classes and images are drawn roughly uniformly: over 200 calls, every image appears.
    seen = torch.cat(
        [torch.cat([p.left, p.right]) for p in (sampler.sample(labels, i) for i in range(200))]
    )
    counts = torch.bincount(seen, minlength=20).float()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()


def test_pair_sampler_rejects_impossible_requests():
    with pytest.raises(ValueError, match="must be even"):
        PairSampler(7, seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        PairSampler(4, seed=0).sample(torch.zeros(5, dtype=torch.long), 0)


def test_siamese_pairs_continue_after_a_state_dict_round_trip():
    torch.manual_seed(0)
    a = SiameseNetworks(Identity(4), embedding_size=0, pairs_per_episode=8, pair_seed=1)
    ep = Episode(
        torch.randn(8, 4),
        torch.arange(4).repeat(2),
        torch.randn(4, 4),
        torch.arange(4),
        torch.arange(4),
    )
    first = a.meta_loss(ep)[0]
    b = SiameseNetworks(Identity(4), embedding_size=0, pairs_per_episode=8, pair_seed=1)
    b.load_state_dict(a.state_dict())  # what a resumed run does
    second_a, second_b = a.meta_loss(ep)[0], b.meta_loss(ep)[0]
    torch.testing.assert_close(second_a, second_b)
    assert not torch.equal(first, second_a)  # the next episode draws other pairs


@pytest.mark.parametrize("algo", [MatchingNetworks, RelationNetworks, SiameseNetworks])
def test_regression_tasks_are_refused_with_a_clear_error(algo):
    from metarun.tasks import REGRESSION

    with pytest.raises(ValueError, match="algo=maml"):
        algo(Identity(2), task=REGRESSION)


# Omniglot 5-way 1-shot through the real runner, a narrow conv4 (16 channels), one thread,
# 60 iterations of 2 episodes: each algorithm must beat chance (20%) and its own untrained
# accuracy on 50 fixed test episodes (750 queries). Measured (2026-11-22, contended CPU):
# Matching 55.9% (after 1 iteration: 41.0%, random conv features already match well),
# Relation 68.8% (21.3%), Siamese 49.4% (24.2%); each floor lies between the two.
LEARNING_BUDGET = [
    "model.hidden=16",
    "train.meta_batch_size=2",
    "train.query_shots=5",
    "eval.val_every=0",
    "eval.test_episodes=50",
    "eval.query_shots=15",
    "checkpoint_every=1000",
    "log_every=50",
]


@pytest.mark.parametrize(
    ("algo", "name", "overrides", "floor"),
    [
        ("matching", "MatchingNetworks", ["train.iterations=60"], 0.50),
        (
            "relation",
            "RelationNetworks",
            ["train.iterations=60", "model.pool_blocks=2", "model.flatten=false"],
            0.55,
        ),
        (
            "siamese",
            "SiameseNetworks",
            ["train.iterations=60", "algo.embedding_size=256", "train.ways=10"],
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
    assert results["test"]["episodes"] == 50
    assert summary["test/acc"] >= floor, summary


def test_siamese_run_interrupted_and_resumed_ends_like_an_uninterrupted_run(
    make_cfg, tmp_path, monkeypatch
):
    """Through the runner: Ctrl-C during iteration 3 of 6, then ``resume=``; the pair
    sampler's position travels in the checkpoint, so the metrics match exactly."""
    from metarun import run
    from metarun.errors import RunInterrupted
    from tests.test_cli import read_metrics

    overrides = ["algo=siamese", "algo.embedding_size=32", "train.iterations=6", "eval.val_every=3"]
    run(make_cfg(*overrides), tmp_path / "reference")
    original, calls = SiameseNetworks.meta_loss, {"n": 0}

    def interrupted(self, episode):
        calls["n"] += 1
        if calls["n"] == 5:  # the first task of iteration 3 (meta-batch of 2)
            signal.raise_signal(signal.SIGINT)
        return original(self, episode)

    monkeypatch.setattr(SiameseNetworks, "meta_loss", interrupted)
    with pytest.raises(RunInterrupted):
        run(make_cfg(*overrides), tmp_path / "cut")
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt")["iteration"] == 3
    run(make_cfg(f"resume={tmp_path / 'cut'}"), tmp_path / "unused")
    assert read_metrics(tmp_path / "cut") == read_metrics(tmp_path / "reference")
    ours = json.loads((tmp_path / "cut" / "results.json").read_text())["test"]
    assert ours == json.loads((tmp_path / "reference" / "results.json").read_text())["test"]
