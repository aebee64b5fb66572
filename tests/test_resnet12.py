"""ResNet-12: shapes, size of the standard network, and use by MAML and ProtoNet."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from metarun.algorithms import MAML, ProtoNet
from metarun.data.episodes import Episode
from metarun.models import ResNet12

TINY = (4, 4, 8, 8)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine, 2 threads spin against each other
    and make these small second-order graphs take minutes instead of a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _episode(ways: int = 5, shots: int = 1, queries: int = 3, size: int = 32) -> Episode:
    g = torch.Generator().manual_seed(0)
    return Episode(
        support_x=torch.rand(ways * shots, 3, size, size, generator=g),
        support_y=torch.arange(ways).repeat_interleave(shots),
        query_x=torch.rand(ways * queries, 3, size, size, generator=g),
        query_y=torch.arange(ways).repeat_interleave(queries),
        classes=torch.arange(ways),
    )


@pytest.mark.parametrize(
    ("shape", "avg_pool", "features"),
    [
        ((3, 84, 84), True, 640),
        ((3, 84, 84), False, 640 * 5 * 5),  # MetaOptNet's flattened 5x5 map
        ((3, 32, 32), True, 640),
        ((3, 32, 32), False, 640 * 2 * 2),
        ((1, 28, 28), True, 640),
    ],
)
def test_output_features(shape, avg_pool, features):
    model = ResNet12(shape, avg_pool=avg_pool)
    assert model.out_features == features
    assert model(torch.zeros(2, *shape)).shape == (2, features)


def test_too_small_images_are_a_clear_error():
    with pytest.raises(ValueError, match="at least 16x16"):
        ResNet12((3, 8, 8))
    with pytest.raises(ValueError, match="4 blocks"):
        ResNet12((3, 84, 84), channels=(64, 160, 320))


def test_standard_network_has_the_expected_parameter_count():
    # Per block: three 3x3 convs and a 1x1 shortcut conv without bias, four BatchNorms
    # (weight and bias each); 12.4M in total, the figure papers quote for ResNet-12.
    expected, cin = 0, 3
    for cout in (64, 160, 320, 640):
        expected += 9 * cin * cout + 2 * 9 * cout * cout + cin * cout + 4 * 2 * cout
        cin = cout
    model = ResNet12((3, 84, 84))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert round(expected / 1e6, 1) == 12.4


def test_the_shortcut_carries_the_input():
    model = ResNet12((3, 32, 32), channels=TINY).eval()
    block = model.features[0]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        full = block(x)
        for p in block.body.parameters():
            p.zero_()
        shortcut_only = block(x)
        expected = F.max_pool2d(F.leaky_relu(block.shortcut(x), 0.1), 2)
    torch.testing.assert_close(shortcut_only, expected)
    assert not torch.allclose(full, shortcut_only)


def test_maml_second_order_reaches_every_parameter_and_adapt_leaves_the_model_alone():
    torch.manual_seed(0)
    algo = MAML(
        ResNet12((3, 32, 32), channels=TINY),
        ways=5,
        fast_lr=0.1,
        adaptation_steps=2,
        test_adaptation_steps=5,
    )
    episode = _episode()
    loss, _ = algo.meta_loss(episode)
    loss.backward()
    no_grad = [n for n, p in algo.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert no_grad == []

    before = {k: v.clone() for k, v in algo.state_dict().items()}
    algo.eval()
    predict = algo.adapt(episode.support_x, episode.support_y)
    for key, value in algo.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=f"adapt changed {key}")
    with torch.no_grad():
        initial = F.cross_entropy(algo.model(episode.support_x), episode.support_y)
    adapted = F.cross_entropy(predict(episode.support_x), episode.support_y)
    assert adapted < initial  # the inner loop ran on the ResNet's own weights


def test_protonet_trains_and_evaluates_with_running_statistics():
    torch.manual_seed(0)
    algo = ProtoNet(ResNet12((3, 32, 32), channels=TINY))
    episode = _episode(shots=2)
    loss, acc = algo.meta_loss(episode)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= acc <= 1
    assert all(p.grad is not None for p in algo.parameters())
    algo.eval()
    logits = algo.adapt(episode.support_x, episode.support_y)(episode.query_x)
    assert logits.shape == (15, 5)


def test_config_builds_the_model_and_a_run_uses_it(make_cfg, tmp_path):
    from metarun import run

    cfg = make_cfg("model=resnet12", "model.channels=[4,4,8,8]", "algo=protonet")
    model = instantiate(cfg.model)(input_shape=(1, 28, 28))
    assert isinstance(model, ResNet12) and model.out_features == 8
    run(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["protocol"]["model"] == "ResNet12"
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert any(".shortcut." in key for key in saved["algo"])
