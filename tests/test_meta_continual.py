"""Meta-continual learning (issue 18): the learners that cannot forget (SB-MCL, prototypes),
ANML's gate, MER's and La-MAML's updates against hand computations, EWC's running sums,
the meta-continual benchmark's protocol, and the MNIST Rotations protocol."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from metarun.continual.methods import ANML, EWC, MER, SBMCL, LaMAML, Prototypes
from metarun.models import ConvNet


class Flat(nn.Module):
    """A backbone that flattens and scales by one learnable number (so a method that trains
    the backbone trains it too); with ``learnable=False`` the head is the whole model."""

    def __init__(self, d: int, learnable: bool = True):
        super().__init__()
        self.out_features = d
        self.scale = nn.Parameter(torch.ones(()), requires_grad=learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.scale


# --- SB-MCL and prototypes: exact, order-invariant -----------------------------------------


def _stream(seed: int = 0, classes: int = 4, per_class: int = 6, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 3
    z = centres.repeat_interleave(per_class, 0) + torch.randn(classes * per_class, d, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    return z, y


def _observe_all(method, z, y, order, score=True):
    """Streams ``z, y`` in ``order``; ``score=False`` as the benchmark (no prequential
    score, which must not change what is learned)."""
    method.begin_stream(None)
    classes = torch.arange(int(y.max()) + 1)
    for k in order.tolist():
        _, metric = method.observe_embedded(z[k : k + 1], y[k : k + 1], classes, score=score)
        assert math.isnan(metric) != score
    return method.predict_embedded(z)


def test_sbmcl_stream_posterior_is_the_batch_posterior_in_any_order():
    z, y = _stream()
    method = SBMCL(Flat(5), 4, (5,), seed=0, alpha=3.0, beta=2.0)
    streamed = _observe_all(method, z, y, torch.arange(len(y)))
    stats = (method.count.clone(), method.total.clone(), method.squares.clone())
    shuffled = _observe_all(
        method, z, y, torch.randperm(len(y), generator=torch.Generator().manual_seed(1)), False
    )
    assert torch.equal(method.count, stats[0])
    torch.testing.assert_close(method.total, stats[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(method.squares, stats[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(shuffled, streamed, rtol=0, atol=1e-9)
    assert torch.equal(shuffled.argmax(1), streamed.argmax(1))
    # The posterior predictive from all of each class's examples at once, computed here with
    # torch.distributions: Normal-Gamma, flat mean prior, Gamma(alpha, beta) precision.
    alpha, beta = 3.0, 2.0
    expected = torch.empty(len(y), 4, dtype=torch.float64)
    for c in range(4):
        zc = z[y == c].double()
        n = zc.shape[0]
        a = alpha + n / 2
        b = beta + ((zc - zc.mean(0)) ** 2).sum(0) / 2
        t = torch.distributions.StudentT(2 * a, zc.mean(0), (b / a * (1 + 1 / n)).sqrt())
        expected[:, c] = t.log_prob(z.double()[:, None, :]).sum(-1)[:, 0]
    torch.testing.assert_close(streamed, expected, rtol=1e-10, atol=1e-10)


def _shared_predictive(z, y, classes, kappa, scale):
    """SB-MCL's shared-covariance predictive from all examples at once: inverse-Wishart
    posterior, then the multivariate t density written out with an explicit inverse."""
    z = z.double()
    d, n = z.shape[1], len(y)
    means = torch.stack([z[y == c].mean(0) for c in range(classes)])
    within = sum((z[y == c] - means[c]).T @ (z[y == c] - means[c]) for c in range(classes))
    psi = kappa * scale * torch.eye(d, dtype=torch.float64) + within
    nu = kappa + n - classes + 2
    out = torch.empty(n, classes, dtype=torch.float64)
    for c in range(classes):
        n_c = int((y == c).sum())
        shape = psi * (1 + 1 / n_c) / nu  # the t's scale matrix
        diff = z - means[c]
        q = (diff @ torch.linalg.inv(shape) * diff).sum(1)
        out[:, c] = (
            math.lgamma((nu + d) / 2) - math.lgamma(nu / 2) - d / 2 * math.log(nu * math.pi)
            - 0.5 * torch.logdet(shape) - (nu + d) / 2 * torch.log1p(q / nu)
        )  # fmt: skip
    return out


def test_sbmcl_shared_covariance_is_exact_and_order_invariant():
    z, y = _stream(classes=4, per_class=6, d=5)
    y[:3] = 3  # classes of different sizes: 9, 3, 6, 6 examples
    method = SBMCL(Flat(5), 6, (5,), seed=0, covariance="shared", kappa=4.0, scale=0.5)
    streamed = _observe_all(method, z, y, torch.arange(len(y)))
    shuffled = _observe_all(
        method, z, y, torch.randperm(len(y), generator=torch.Generator().manual_seed(1)), False
    )
    torch.testing.assert_close(shuffled, streamed, rtol=0, atol=1e-9)
    expected = _shared_predictive(z, y, 4, 4.0, 0.5)
    torch.testing.assert_close(streamed[:, :4], expected, rtol=1e-9, atol=1e-9)
    assert torch.isinf(streamed[:, 4:]).all()
    # One feature: the multivariate t is Student's t (torch.distributions), scale psi(1+1/n)/nu
    z1 = z[:, :1]
    method = SBMCL(Flat(1), 4, (1,), seed=0, covariance="shared", kappa=4.0, scale=0.5)
    scores = _observe_all(method, z1, y, torch.arange(len(y)))
    within = sum(((z1[y == c] - z1[y == c].mean()) ** 2).sum().double() for c in range(4))
    psi, nu = 4.0 * 0.5 + within, 4.0 + len(y) - 4 + 2  # pooled over the classes
    for c in range(4):
        zc = z1[y == c].double()
        t = torch.distributions.StudentT(nu, zc.mean(), (psi * (1 + 1 / len(zc)) / nu).sqrt())
        torch.testing.assert_close(scores[:, c], t.log_prob(z1.double()[:, 0]))


def test_sbmcl_shared_covariance_learns_the_features_correlations():
    # Two classes whose features are strongly correlated within each class, with means apart
    # along the direction of little variance: the Euclidean (prototype) and per-feature
    # (diagonal) models confuse them, the shared covariance separates them.
    g = torch.Generator().manual_seed(0)
    noise = (
        torch.randn(400, 1, generator=g) * torch.tensor([[3.0, 3.0]])
        + torch.randn(400, 2, generator=g) * 0.1
    )
    means = torch.tensor([[0.0, 0.6], [0.6, 0.0]])
    y = torch.arange(2).repeat_interleave(200)
    z = means[y] + noise
    train, test = torch.arange(400) % 2 == 0, torch.arange(400) % 2 == 1
    accuracy = {}
    for name, method in {
        "prototypes": Prototypes(Flat(2), 2, (2,), seed=0),
        "diagonal": SBMCL(Flat(2), 2, (2,), seed=0),
        "shared": SBMCL(Flat(2), 2, (2,), seed=0, covariance="shared", kappa=1.0, scale=1.0),
    }.items():
        method.begin_stream(None)
        for k in torch.nonzero(train).flatten().tolist():
            method.observe_embedded(z[k : k + 1], y[k : k + 1], torch.arange(2))
        predicted = method.predict_embedded(z[test]).argmax(1)
        accuracy[name] = (predicted == y[test]).double().mean().item()
    assert accuracy["shared"] > 0.95 and max(accuracy["prototypes"], accuracy["diagonal"]) < 0.8


def test_prototypes_are_running_means_and_unseen_classes_cannot_win():
    z, y = _stream(classes=3)
    method = Prototypes(Flat(5), 5, (5,), seed=0)
    scores = _observe_all(method, z, y, torch.randperm(len(y)))
    means = torch.stack([z[y == c].double().mean(0) for c in range(3)])
    torch.testing.assert_close(scores[:, :3], -(torch.cdist(z.double(), means) ** 2))
    assert torch.isinf(scores[:, 3:]).all() and (scores[:, 3:] < 0).all()


@pytest.mark.parametrize("covariance", ["diagonal", "shared"])
def test_the_meta_training_gradient_reaches_the_sbmcl_prior(covariance):
    from metarun.data.episodes import ClassPool

    images = torch.randint(0, 256, (6, 8, 1, 4, 4), dtype=torch.uint8)
    pool = ClassPool.from_grouped(images, [str(i) for i in range(6)])
    method = SBMCL(ConvNet((1, 4, 4), [3], pools=[False]), 6, (1, 4, 4), seed=0, ways=3,
                   shots=3, query_shots=2, meta_iterations=2, covariance=covariance)  # fmt: skip
    prior = [p for n, p in method.named_parameters() if n.startswith("log_")]
    before = [p.item() for p in prior]
    assert len(prior) == 2 and method.pretrain(pool, 0, lambda it, loss, acc: False) == 2
    assert all(p.item() != b for p, b in zip(prior, before, strict=True))


class Recording(Flat):
    """:class:`Flat` that keeps every batch it is given."""

    def __init__(self, d: int):
        super().__init__(d)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return super().forward(x)


@pytest.mark.parametrize("augment", ["none", "affine"])
def test_affine_augment_distorts_meta_training_images_but_not_the_streams(augment):
    from metarun.data.episodes import ClassPool

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 8, 1, 12, 12, generator=g) < 0.3).to(torch.uint8) * 255
    pool = ClassPool.from_grouped(images, [str(i) for i in range(6)])
    backbone = Recording(144)
    method = Prototypes(backbone, 6, (1, 12, 12), seed=0, ways=3, shots=2, query_shots=2,
                        meta_iterations=3, augment=augment)  # fmt: skip
    assert method.pretrain(pool, 0, lambda it, loss, acc: False) == 3
    originals = images.flatten(0, 1).float().div(255).flatten(1)
    for batch in backbone.seen:
        assert batch.shape == (12, 1, 12, 12) and batch.min() >= 0 and batch.max() <= 1
        # each image's distance to the nearest image of the pool: 0 for an undistorted one
        nearest = torch.cdist(batch.flatten(1), originals).min(1).values
        if augment == "none":
            assert (nearest == 0).all()
        else:  # each of 4 components drawn with probability 1/2: some images stay whole
            assert (nearest > 0).float().mean() > 0.7
    backbone.seen.clear()
    x = images[0, :2].float().div(255)
    method.begin_stream(None)
    method.observe(x, torch.tensor([0, 0]), torch.arange(6))
    assert torch.equal(backbone.seen[0], x)
    with pytest.raises(ValueError, match="none or affine"):
        Prototypes(Recording(144), 6, (1, 12, 12), seed=0, augment="elastic")


def test_grouped_episodes_take_whole_groups_until_the_episode_is_full():
    from metarun.continual.methods.base import draw_classes
    from metarun.data.episodes import ClassPool

    sizes = [3, 5, 2, 4, 6]  # classes per group
    groups = [f"g{i}" for i, n in enumerate(sizes) for _ in range(n)]
    images = torch.zeros(len(groups), 2, 1, 2, 2, dtype=torch.uint8)
    pool = ClassPool.from_grouped(images, [str(i) for i in range(len(groups))], groups)
    g = torch.Generator().manual_seed(0)
    spans = set()
    for _ in range(50):
        classes = draw_classes(pool, 7, True, g).tolist()
        assert len(set(classes)) == 7
        drawn = [groups[c] for c in classes]
        spans.add(tuple(dict.fromkeys(drawn)))
        # every group but the last one drawn is taken whole, in one run of the episode
        for name in list(dict.fromkeys(drawn))[:-1]:
            assert drawn.count(name) == groups.count(name)
        assert len(dict.fromkeys(drawn)) == len([k for k, _ in itertools.groupby(drawn)])
    assert len(spans) > 5  # the groups come in random order
    uniform = [groups[c] for c in draw_classes(pool, 7, False, g).tolist()]
    assert len(uniform) == 7
    plain = ClassPool.from_grouped(images, [str(i) for i in range(len(groups))])
    with pytest.raises(ValueError, match="episode_classes=random"):
        draw_classes(plain, 7, True, g)


def test_rotated_meta_training_classes_keep_their_alphabet_and_angle(bench, data_dir, cache_dir):
    from metarun.continual.scenarios import omniglot_meta_continual

    turned = omniglot_meta_continual(str(data_dir), str(cache_dir), sizes=(5,), draws=1,
                                     meta_train_rotations=True).meta_train  # fmt: skip
    assert turned.n_classes == 4 * bench.meta_train.n_classes
    for c in (0, 1, 2, 3, 4 * 400 + 2):
        character, angle = turned.class_names[c].rsplit("/", 1)
        assert turned.groups[c] == f"{character.split('/')[1]}/{angle}"
        assert angle == f"rot{90 * (c % 4):03d}"
    assert torch.equal(turned.drawers[4 * 7 + 3], bench.meta_train.drawers[7])


# --- ANML: the gate, and what learns in the stream ------------------------------------------


def _anml() -> ANML:
    torch.manual_seed(0)
    pln = ConvNet((1, 12, 12), [4, 4], pools=[True, False], norm="instance")
    return ANML(pln, 7, (1, 12, 12), seed=0, nm_channels=[2], nm_pools=[True])


def test_anml_gate_multiplies_the_prediction_networks_features():
    method = _anml().eval()
    x = torch.rand(3, 1, 12, 12)
    gate_layer = method.neuromodulation[1]
    with torch.no_grad():
        features = method.backbone(x)
        gates = method.neuromodulation(x)
        torch.testing.assert_close(method.embed(x), features * gates)
        assert gates.shape == features.shape and ((gates > 0) & (gates < 1)).all()
        gate_layer.bias.fill_(-50.0)  # the gate closes: the head sees nothing
        torch.testing.assert_close(method(x), method.head.bias.expand(3, -1), atol=1e-6, rtol=0)


def test_only_the_head_learns_in_anmls_stream():
    method = _anml()
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    method.begin_stream(0.01)
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 0, 1])
    for k in range(4):
        method.observe(x[k : k + 1], y[k : k + 1], torch.arange(2))
    changed = {n for n, p in method.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.weight", "head.bias"}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_head_narrowed_to_the_streams_classes_learns_as_the_whole_head(optimizer):
    """The benchmark tells an online head how many classes its stream has; training only
    those rows must give the same head and scores as training every row."""
    method = _anml()
    method.stream_optimizer, method.stream_outputs = optimizer, "seen"
    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, method.head.in_features, generator=g)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    heads = []
    for rows in (None, 3):
        torch.manual_seed(7)  # the head is drawn afresh from the global generator
        method.begin_stream(0.05, rows)
        for k in range(len(y)):
            method.observe_embedded(z[k : k + 1], y[k : k + 1], torch.arange(int(y[k]) + 1))
        heads.append((method.head.weight.detach().clone(), method.predict_embedded(z)[:, :3]))
        assert method.optimizer.param_groups[0]["params"][0].shape[0] == (rows or 7)
    torch.testing.assert_close(heads[1][0], heads[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(heads[1][1], heads[0][1], rtol=1e-6, atol=1e-6)
    torch.manual_seed(7)
    method.begin_stream(0.05, 3)
    assert not torch.equal(method.head.weight, heads[1][0])  # the stream moved the rows


def test_an_online_heads_stream_loss_spans_every_output_as_the_authors_evaluation():
    """OML's and ANML's evaluation code (and their meta-training inner loops) take the
    cross-entropy over every output of the head, so a class's first example already moves
    its row; over the seen classes only, the first class of a stream learns nothing."""
    z = torch.randn(1, _anml().head.in_features, generator=torch.Generator().manual_seed(0))
    rows = {}
    for outputs in ("all", "seen"):
        method = _anml()
        method.stream_outputs = outputs
        method.begin_stream(0.01, 3)
        before = method.head.weight.detach().clone()
        method.observe_embedded(z, torch.tensor([0]), torch.arange(1))
        rows[outputs] = method.head.weight.detach() - before
    assert rows["all"][0].abs().sum() > 0 and (rows["all"] @ z[0])[0] > 0  # class 0 up
    assert rows["all"][1:].abs().sum() > 0  # the other outputs pushed down
    assert torch.equal(rows["seen"], torch.zeros_like(rows["seen"]))


# --- MER, La-MAML and EWC against hand computations -----------------------------------------


def _linear_step(w, b, x, y, lr):
    loss = F.cross_entropy(x @ w.T + b, y)
    gw, gb = torch.autograd.grad(loss, (w, b))
    return (w - lr * gw).detach().requires_grad_(), (b - lr * gb).detach().requires_grad_()


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_mer_one_example_against_a_hand_computation(gamma):
    method = MER(Flat(3, learnable=False), 2, (3,), seed=0, lr=0.2, beta=0.3, gamma=gamma,
                 batches_per_example=2, replay_batch_size=1, buffer_size=5)  # fmt: skip
    memory_x, memory_y = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([1])
    method.buffer.add(memory_x, memory_y, method.generator)  # the only memory
    x, y = torch.tensor([[0.5, 1.0, -1.0]]), torch.tensor([0])
    w = method.head.weight.detach().clone().requires_grad_()
    b = method.head.bias.detach().clone().requires_grad_()
    w0, b0 = w.detach().clone(), b.detach().clone()
    for _ in range(2):  # s = 2 batches of [the example, the memory]
        wb, bb = w.detach().clone(), b.detach().clone()
        w, b = _linear_step(w, b, x, y, 0.2)
        w, b = _linear_step(w, b, memory_x, memory_y, 0.2)
        w = (wb + 0.3 * (w.detach() - wb)).requires_grad_()
        b = (bb + 0.3 * (b.detach() - bb)).requires_grad_()
    w_end, b_end = w0 + gamma * (w.detach() - w0), b0 + gamma * (b.detach() - b0)
    method.observe(x, y, torch.arange(2))
    torch.testing.assert_close(method.head.weight.detach(), w_end)
    torch.testing.assert_close(method.head.bias.detach(), b_end)
    assert len(method.buffer) == 2


def test_lamaml_meta_loss_is_the_mean_over_inner_steps():
    torch.manual_seed(0)
    method = LaMAML(Flat(2), 2, (2,), seed=3, fast_lr=0.1, meta_lr=0.5, glances=1,
                    inner_batch_size=1, buffer_size=4, replay_batch_size=2,
                    grad_clip_norm=None, first_order=True)  # fmt: skip
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    order = torch.randperm(2, generator=torch.Generator().manual_seed(3))
    xs, ys = x[order], y[order]
    params = [p.detach().clone().requires_grad_() for p in (
        method.backbone.scale, method.head.weight, method.head.bias)]  # fmt: skip
    alphas = [a.detach().clone().requires_grad_() for a in method.alphas]

    def model(p, inputs):
        return (inputs * p[0]) @ p[1].T + p[2]

    fast, losses = params, []
    for k in range(2):  # one example per step, first order; empty memory: meta-batch = batch
        inner = F.cross_entropy(model(fast, xs[k : k + 1]), ys[k : k + 1])
        grads = [g.detach() for g in torch.autograd.grad(inner, fast)]
        fast = [w - a.relu() * g for w, a, g in zip(fast, alphas, grads, strict=True)]
        losses.append(F.cross_entropy(model(fast, xs), ys))
    meta = torch.stack(losses).mean()
    g_w = torch.autograd.grad(meta, params, retain_graph=True)
    g_a = torch.autograd.grad(meta, alphas)
    new_alphas = [a - 0.5 * g for a, g in zip(alphas, g_a, strict=True)]
    expected = [w - a.relu() * g for w, a, g in zip(params, new_alphas, g_w, strict=True)]
    loss, _ = method.observe(x, y, torch.arange(2))
    assert loss == pytest.approx(meta.item())
    got = [method.backbone.scale, method.head.weight, method.head.bias]
    for p, e in zip(got, expected, strict=True):
        torch.testing.assert_close(p.detach(), e.detach())
    for a, e in zip(method.alphas, new_alphas, strict=True):
        torch.testing.assert_close(a.detach(), e.detach())


def test_ewc_running_sums_equal_the_sum_over_tasks():
    torch.manual_seed(0)
    method = EWC(Flat(3), 2, (3,), seed=0, ewc_lambda=2.0, fisher_samples=4)
    anchors = []
    for _ in range(3):
        with torch.no_grad():
            for p in method.parameters():
                p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(4, 3)
        method.end_task(lambda n, x=x: (x[:n], torch.zeros(n)), torch.arange(2))
        params = {n: p.detach().clone() for n, p in method.named_parameters()}
        anchors.append((method.fisher(x, torch.arange(2), params), params))
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.5)
    now = dict(method.named_parameters())
    explicit = sum((f[n] * (now[n] - theta[n]) ** 2).sum() for f, theta in anchors for n in f)
    assert method.penalty().item() == pytest.approx(explicit.item(), rel=1e-5)


# --- the meta-continual benchmark -------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(data_dir, tmp_path_factory):
    from metarun.continual.scenarios import omniglot_meta_continual

    cache = tmp_path_factory.mktemp("cache")
    return omniglot_meta_continual(str(data_dir), str(cache), sizes=(5, 20), draws=2,
                                   selection_draws=1, lr_grid=(0.01, 0.001))  # fmt: skip


def test_benchmark_streams_show_each_training_drawing_once_in_class_order(bench):
    from metarun.continual import meta_test

    method = Prototypes(Flat(28 * 28), bench.n_classes, bench.input_shape, seed=0)
    seen: list[int] = []
    original = method.observe_embedded

    def spy(z, y, classes, **kwargs):
        seen.append(int(y))
        return original(z, y, classes, **kwargs)

    method.observe_embedded = spy
    inputs = meta_test.prepare_inputs(method, bench.evaluation, _CPU)
    stream = meta_test.draw_stream(bench.evaluation, 20, bench.train_shots, seed=7)
    meta_test.learn_stream(method, None, inputs, stream, None, _CPU, 0)
    assert seen == [c for c in range(20) for _ in range(15)]  # class after class, once each
    assert set(stream.train.flatten().tolist()).isdisjoint(stream.test.flatten().tolist())
    assert stream.train.shape == (20, 15) and stream.test.shape == (20, 5)
    assert torch.equal(stream.classes, meta_test.draw_stream(bench.evaluation, 20, 15, 7).classes)


@pytest.mark.parametrize("learner", ["prototypes", "pretrained"])
def test_stream_count_is_the_number_of_streams_the_benchmark_learns(bench, learner):
    """The runner's progress total: with a rate to choose (pretrained: 2 sizes x 2 rates x
    1 selection draw, then 2 sizes x 2 draws) and without (prototypes: 4 streams)."""
    from metarun.continual import meta_test
    from metarun.continual.methods import Pretrained

    cls = {"prototypes": Prototypes, "pretrained": Pretrained}[learner]
    method = cls(Flat(28 * 28), bench.n_classes, bench.input_shape, seed=0)
    keys: list[str] = []
    meta_test.run_benchmark(method, bench, _CPU, {}, lambda key, result: keys.append(key))
    assert len(keys) == len(set(keys)) == meta_test.stream_count(method, bench)
    assert len(keys) == {"prototypes": 4, "pretrained": 8}[learner]


def test_selection_characters_are_held_out_of_meta_training_and_evaluation(bench):
    names = {
        part: set(getattr(bench, part).class_names)
        for part in ("meta_train", "selection", "evaluation")
    }
    assert names["selection"].isdisjoint(names["meta_train"])
    assert names["selection"].isdisjoint(names["evaluation"])
    assert names["meta_train"].isdisjoint(names["evaluation"])
    assert len(names["selection"]) == 172 and len(names["evaluation"]) == 659
    alphabets = {n.split("/")[1] for n in names["selection"]}
    assert alphabets == {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}


class _Hardware:
    device = torch.device("cpu")
    memory_format = torch.contiguous_format

    @staticmethod
    def autocast():
        import contextlib

        return contextlib.nullcontext()


_CPU = _Hardware()


# --- MNIST Rotations (the GEM/MER/La-MAML protocol) ------------------------------------------


def test_mnist_rotations_match_pil_and_keep_each_task_in_its_angle_band(data_dir):
    import numpy as np
    from PIL import Image

    from metarun.continual.scenarios import mnist_rotations, rotate

    scenario = mnist_rotations(str(data_dir), n_tasks=4, samples_per_task=30, seed=2)
    assert len(scenario.tasks) == 4 and scenario.incremental == "domain"
    for t, angle in enumerate(scenario.info["angles"]):
        assert 45 * t <= angle < 45 * (t + 1)
        assert scenario.tasks[t].size("train") == 30 and scenario.tasks[t].size("test") == 10000
    images = scenario.tasks[0].train_x[:5]
    pil = torch.stack(
        [
            torch.from_numpy(np.array(Image.fromarray(im[0].numpy()).rotate(33.3)))[None]
            for im in images
        ]
    )  # fmt: skip  (PIL's default resampling for rotate is NEAREST)
    assert torch.equal(rotate(images, 33.3), pil)
    again = mnist_rotations(str(data_dir), n_tasks=4, samples_per_task=30, seed=2)
    assert again.info["angles"] == scenario.info["angles"]


def test_protocol_files_record_gem_bwt(make_cfg, tmp_path):
    from metarun import run

    cfg = make_cfg("experiment=mnist_rotations_er", "scenario.n_tasks=2",
                   "scenario.samples_per_task=20", tiny=False)  # fmt: skip
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    c = results["continual"]
    assert c["bwt_gem"] == pytest.approx(c["bwt"] / 2) and len(results["matrix"]) == 2
    assert results["stream"]["angles"][0] < 90 <= results["stream"]["angles"][1] < 180
    assert math.isfinite(c["acc"])


# --- the benchmark end to end: learning, resume, mixed precision ----------------------------


def tiny_benchmark(algo: str, *extra: str) -> list[str]:
    """The benchmark shrunk to seconds: held-out background streams of 10 classes (two
    draws), a narrow conv4, a few meta-training steps. ``algo`` is an ``algo=`` choice,
    or one and a variant (``sbmcl-shared``: the variant's options are in ``extra``)."""
    return [
        "experiment=omniglot_meta_continual",
        f"algo={algo.split('-')[0]}",
        "hardware.amp=off",
        "hardware.channels_last=false",
        "model.hidden=16",
        "scenario.validation=true",
        "scenario.sizes=[10]",
        "scenario.draws=2",
        "scenario.selection_draws=1",
        "scenario.lr_grid=[0.01,0.001]",
        "log_every=10",
        "checkpoint_every=10",
        *extra,
    ]


META = {  # the order-invariant learners with a few meta-training steps of their own kind
    "sbmcl": ["algo.meta_iterations=40", "algo.ways=20", "algo.shots=5"],
    "sbmcl-shared": [
        "algo.meta_iterations=40",
        "algo.ways=20",
        "algo.shots=5",
        "algo.covariance=shared",
    ],  # fmt: skip
    "prototypes": ["algo.meta_iterations=40", "algo.ways=20", "algo.shots=5"],
}


def _benchmark_accuracy(make_cfg, tmp_path, algo: str, *extra: str) -> float:
    from metarun import run

    cfg = make_cfg(*tiny_benchmark(algo, *extra), tiny=False)
    cfg.hardware.num_threads = 1
    run(cfg, tmp_path / algo)
    results = json.loads((tmp_path / algo / "results.json").read_text())
    return results["meta_test"]["10"]["test"]["mean"]


@pytest.fixture(scope="module")
def naive_accuracy(data_dir, cache_dir, tmp_path_factory) -> float:
    from hydra import compose, initialize_config_dir

    from metarun.config import register_configs
    from tests.conftest import CONFIGS

    def make(*overrides: str, tiny: bool = False):
        register_configs()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            folders = [f"data_dir={data_dir}", f"cache_dir={cache_dir}"]
            return compose(config_name="config", overrides=[*folders, *overrides])

    return _benchmark_accuracy(make, tmp_path_factory.mktemp("naive"), "naive")


@pytest.mark.parametrize("algo", sorted(META))
def test_order_invariant_learners_beat_naive_fine_tuning_on_held_out_streams(
    algo, make_cfg, tmp_path, naive_accuracy
):
    """Measured on 10-class held-out background streams (2 draws, 40 meta-training steps of
    a 16-channel conv4): naive fine-tuning 0.18 (it mostly predicts the last classes),
    SB-MCL 0.57 (shared covariance: 0.80), prototypes 0.84. OML, ANML and the pretrained
    head need thousands of meta-training steps to learn anything (at 60 steps they were at
    0.09-0.15), so their meta-training is tested by its gradients below instead."""
    acc = _benchmark_accuracy(make_cfg, tmp_path, algo, *META[algo])
    assert acc > naive_accuracy + 0.2


# --- OML: the meta-gradient goes through the inner loop -------------------------------------


@pytest.mark.parametrize("first_order", [False, True])
def test_omls_meta_gradient_is_the_derivative_of_the_loss_after_the_inner_loop(first_order):
    """The representation's meta-gradient against a central difference of the meta-loss
    (after the head's online steps, with the same draws): exact when second order; the
    first-order approximation drops the inner steps' dependence and misses it."""
    from metarun.continual.methods import OML
    from metarun.data.episodes import ClassPool

    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 12, 1, 2, 2), dtype=torch.uint8)
    pool = ClassPool.from_grouped(images, [str(i) for i in range(8)])
    method = OML(Flat(4), 8, (1, 2, 2), seed=0, fast_lr=0.5, trajectory_classes=2,
                 trajectory_shots=3, query_shots=2, remember_size=4,
                 first_order=first_order)  # fmt: skip
    start, draws = copy.deepcopy(method.state_dict()), method.generator.get_state()

    def meta_loss(scale: float) -> torch.Tensor:
        method.load_state_dict(start)
        method.backbone.scale.data.fill_(scale)
        method.generator.set_state(draws)
        torch.manual_seed(1)  # the head rows drawn afresh
        return method._classification_step(pool)[0]

    (grad,) = torch.autograd.grad(meta_loss(1.0), method.backbone.scale)
    eps = 1e-2
    numeric = (meta_loss(1.0 + eps).item() - meta_loss(1.0 - eps).item()) / (2 * eps)
    close = math.isclose(grad.item(), numeric, rel_tol=0.02)
    assert close != first_order, (grad.item(), numeric)


SHORT = {  # every benchmark method with a few meta-training steps
    **META,
    "pretrained": ["algo.meta_iterations=10", "algo.batch_size=32"],
    "oml": ["algo.meta_iterations=10"],
    "anml": ["algo.meta_iterations=10", "algo.nm_channels=[8,8,8]", "algo.trajectory_shots=5"],
    "naive": [],  # no meta-training; the whole network learns in each stream
}


@pytest.mark.parametrize("algo", sorted(SHORT))
def test_a_benchmark_stopped_mid_stream_resumes_to_the_same_table(
    algo, make_cfg, tmp_path, monkeypatch
):
    """Ctrl-C in the first stream (a selection stream where the method has a learning rate
    to choose, else the first of two draws of 10 classes of 15 drawings): the run stops
    when that stream ends (the safe point), keeps it, and the resumed run does the rest
    and writes the same table."""
    from metarun import run
    from metarun.continual import methods
    from metarun.errors import RunInterrupted
    from tests.test_continual import interrupt_after

    overrides = tiny_benchmark(algo, *SHORT[algo])
    whole = run(make_cfg(*overrides, tiny=False), tmp_path / "whole")
    cls = methods.__dict__[make_cfg(*overrides).algo._target_.rsplit(".", 1)[-1]]
    with monkeypatch.context() as patch:
        frozen = cls.capabilities.frozen_embedding
        interrupt_after(patch, cls, 100, method="observe_embedded" if frozen else "observe")
        with pytest.raises(RunInterrupted):
            run(make_cfg(*overrides, tiny=False), tmp_path / "split")
    assert not (tmp_path / "split" / "results.json").exists()
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["stream"]["streams"]) == 1
    resumed = run(make_cfg(f"resume={tmp_path / 'split'}", tiny=False), tmp_path / "ignored")
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "split"))
    assert a["meta_test"] == b["meta_test"] and resumed == pytest.approx(whole, nan_ok=True)


def test_test_runs_a_benchmarks_streams_again_from_its_meta_trained_state(make_cfg, tmp_path):
    """``metarun test=RUN`` on a benchmark run: the same streams give the same table (the
    meta-trained state is restored, not the state after its last stream), a third draw
    is added by ``scenario.draws=3``, another size run first leaves the N = 10 streams as
    they were, ``algo.stream_outputs=seen`` changes the results, and
    the tested run's files are left as they were. Meta-training options, a run whose
    meta-training has not finished and a task stream's run are refused. A test= run
    stopped by Ctrl-C and resumed writes the same table and still names what it tested."""
    from metarun import run
    from metarun.errors import ConfigError
    from metarun.recipes import retest
    from tests.test_cli import metarun

    run(make_cfg(*tiny_benchmark("oml", *SHORT["oml"]), tiny=False), tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    own = json.loads((tmp_path / "run" / "results.json").read_text())["meta_test"]["10"]

    def again(name: str, *overrides: str) -> dict:
        out = tmp_path / name
        done = metarun(f"test={tmp_path / 'run'}", *overrides, f"hydra.run.dir={out}",
                       "hardware.num_threads=1", cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads((out / "results.json").read_text())

    more = again("more", "scenario.draws=3")
    assert more["tested"] == {
        "checkpoint": str(tmp_path / "run" / "checkpoints" / "last.pt"),
        "meta_iterations": 10,
    }
    entry = more["meta_test"]["10"]
    assert entry["selection"] == own["selection"] and entry["lr"] == own["lr"]
    assert entry["test"]["values"][:2] == own["test"]["values"]
    assert len(entry["test"]["values"]) == 3 and more["config"]["scenario"]["draws"] == 3
    # each stream's randomness (its fresh head) is its own: streams of another size run
    # first leave the N = 10 streams as they were
    other = again("other", "scenario.sizes=[5,10]")["meta_test"]
    assert other["10"] == own and set(other) == {"5", "10"}
    seen = again("seen", "algo.stream_outputs=seen")["meta_test"]["10"]
    assert seen["selection"] != own["selection"]
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before

    refused = metarun(f"test={tmp_path / 'run'}", "algo.meta_lr=0.1", cwd=tmp_path)
    assert refused.returncode == 2 and "algo.meta_lr cannot change" in refused.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    ckpt["stream"]["meta_iteration"] = 3
    torch.save(ckpt, tmp_path / "early.pt")
    cfg = make_cfg(f"test={tmp_path / 'early.pt'}", tiny=False)
    with pytest.raises(ConfigError, match="meta-training stopped at step 3 of 10"):
        retest(cfg, [f"test={tmp_path / 'early.pt'}"], tmp_path / "early")
    ckpt["config"]["scenario"]["_target_"] = "metarun.continual.scenarios.split_mnist"
    torch.save(ckpt, tmp_path / "stream.pt")
    cfg = make_cfg(f"test={tmp_path / 'stream.pt'}", tiny=False)
    with pytest.raises(ConfigError, match="is a task stream, not a meta-continual benchmark"):
        retest(cfg, [f"test={tmp_path / 'stream.pt'}"], tmp_path / "stream")

    # Ctrl-C in a test= run, then resume=: the same table, still naming what it tested.
    from metarun.continual.methods import OML
    from metarun.errors import RunInterrupted
    from tests.test_continual import interrupt_after

    overrides = [f"test={tmp_path / 'run'}", "++scenario.draws=3", "hardware.num_threads=1"]
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, OML, 100, method="observe_embedded")
        with pytest.raises(RunInterrupted):
            retest(make_cfg(*overrides, tiny=False), overrides, tmp_path / "cut")
    assert not (tmp_path / "cut" / "results.json").exists()
    run(make_cfg(f"resume={tmp_path / 'cut'}", tiny=False), tmp_path / "ignored")
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["meta_test"] == more["meta_test"] and cut["tested"] == more["tested"]


def test_prototypes_take_the_encoder_of_a_continual_run(make_cfg, tmp_path, data_dir):
    """``algo=prototypes algo.encoder_checkpoint=RUN/checkpoints/last.pt`` on a pretrained
    run: the class-mean learner starts from that run's encoder, weight for weight (a probe
    of the features apart from the online head)."""
    from metarun import run
    from metarun.continual.methods import Pretrained

    run(make_cfg(*tiny_benchmark("pretrained", *SHORT["pretrained"]), tiny=False), tmp_path / "p")
    last = tmp_path / "p" / "checkpoints" / "last.pt"
    method = torch.load(last, weights_only=True)["method"]
    cfg = make_cfg(*tiny_benchmark("prototypes"), f"algo.encoder_checkpoint={last}", tiny=False)
    backbone = instantiate(cfg.model)(input_shape=(1, 28, 28))
    protos = instantiate(cfg.algo)(backbone=backbone, n_classes=10,
                                         input_shape=(1, 28, 28), seed=1)  # fmt: skip
    assert isinstance(protos, Prototypes) and not isinstance(protos, Pretrained)
    for key, value in protos.backbone.state_dict().items():
        assert torch.equal(value, method[f"backbone.{key}"]), key
    # checked before any data loads: the file, and the model it was written with (conv4
    # with another pool_blocks has the same weights and computes other features)
    from metarun.checks import check_continual
    from metarun.errors import ConfigError

    check_continual(cfg)
    other = make_cfg(*tiny_benchmark("prototypes"), f"algo.encoder_checkpoint={last}",
                     "model.pool_blocks=3", tiny=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"with model.pool_blocks=4; this run has model.pool"):
        check_continual(other)
    missing = make_cfg(*tiny_benchmark("prototypes"),
                       f"algo.encoder_checkpoint={tmp_path / 'none.pt'}", tiny=False)  # fmt: skip
    with pytest.raises(ConfigError, match="no such file"):
        check_continual(missing)


def test_meta_training_in_bf16_is_mixed_precision_and_learns(make_cfg, tmp_path):
    """hardware.amp=bf16 reaches meta-training (its losses are not fp32's), entered once
    per step: under one autocast region for the whole of meta-training, torch keeps the
    bf16 copies of the weights cast at the first step, and the loss would not fall."""
    from metarun import run

    def losses(amp: str) -> list[float]:
        cfg = make_cfg(*tiny_benchmark("prototypes", *META["prototypes"]), f"hardware.amp={amp}",
                       tiny=False)  # fmt: skip
        cfg.hardware.num_threads = 1
        run(cfg, tmp_path / amp)
        rows = (json.loads(r) for r in (tmp_path / amp / "metrics.jsonl").read_text().splitlines())
        return [r["meta/loss"] for r in rows if "meta/loss" in r]

    fp32, bf16 = losses("off"), losses("bf16")
    assert len(bf16) == 40 and bf16 != pytest.approx(fp32, rel=1e-4)
    assert sum(bf16[-10:]) / 10 < sum(bf16[:5]) / 5 - 0.3
