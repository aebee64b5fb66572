"""The vmap engine computes the loop engine's meta-loss and meta-gradient, and refuses what
it cannot reproduce."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms import ANIL, MAML, MetaSGD
from metarun.data.episodes import Episode
from metarun.models import Conv4


def _episodes(tasks: int, ways: int = 3, queries: int = 2) -> list[Episode]:
    g = torch.Generator().manual_seed(1)

    def images(n: int) -> torch.Tensor:
        return torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64)

    return [
        Episode(
            images(ways),
            torch.randperm(ways, generator=g),
            images(ways * queries),
            torch.arange(ways).repeat(queries),
            torch.arange(ways),
        )
        for _ in range(tasks)
    ]


def _gradients(algo: torch.nn.Module, episodes: list[Episode]) -> dict[str, torch.Tensor]:
    algo.zero_grad()
    if algo.engine == "vmap":
        loss, _ = algo.meta_loss(Episode.stack(episodes))
        loss.backward()
    else:
        for episode in episodes:
            loss, _ = algo.meta_loss(episode)
            (loss / len(episodes)).backward()
    return {name: p.grad.clone() for name, p in algo.named_parameters()}


@pytest.mark.parametrize("cls", [MAML, MetaSGD])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_engine_gives_the_loop_engines_meta_gradient(cls, first_order):
    """Conv4 with batch norm, 2 inner steps, 4 tasks, float64: every parameter's
    meta-gradient agrees, including the conv biases that batch norm cancels."""

    def make(engine: str) -> torch.nn.Module:
        torch.manual_seed(0)
        backbone = Conv4(input_shape=(1, 16, 16), hidden=4)
        return cls(backbone, 3, 0.4, 2, 3, first_order=first_order, engine=engine).double()

    episodes = _episodes(4)
    loop, vmapped = _gradients(make("loop"), episodes), _gradients(make("vmap"), episodes)
    for name, grad in loop.items():
        torch.testing.assert_close(vmapped[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    assert any(g.abs().max() > 1e-3 for g in loop.values())  # not trivially zero


def test_vmap_engine_refuses_what_it_cannot_reproduce():
    backbone = Conv4(input_shape=(1, 16, 16), hidden=4)
    with pytest.raises(ValueError, match="needs algo.bn_mode=transductive"):
        MAML(backbone, 3, 0.4, 1, 1, bn_mode="running", engine="vmap")
    with pytest.raises(
        ValueError, match="ANIL computes its meta-loss its own way, which algo.engine=vmap"
    ):
        ANIL(backbone, 3, 0.4, 1, 1, engine="vmap")
    with pytest.raises(ValueError, match="unknown algo.engine"):
        MAML(backbone, 3, 0.4, 1, 1, engine="jit")


def test_vmap_engine_copy_is_not_part_of_the_state():
    algo = MAML(Conv4(input_shape=(1, 16, 16), hidden=4), 3, 0.4, 1, 1, engine="vmap")
    loop = MAML(Conv4(input_shape=(1, 16, 16), hidden=4), 3, 0.4, 1, 1)
    assert algo.state_dict().keys() == loop.state_dict().keys()
    assert len(list(algo.parameters())) == len(list(loop.parameters()))


def test_channels_last_gives_the_same_meta_gradient():
    """``hardware.channels_last`` changes the memory layout only: ProtoNet's loss and
    gradients on a 10-way episode agree with the default layout to float32 rounding."""
    from metarun.algorithms import ProtoNet
    from metarun.hardware import Hardware

    def gradients(channels_last: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        hardware = Hardware("cpu", channels_last=channels_last)
        algo = hardware.prepare(ProtoNet(Conv4(input_shape=(1, 28, 28), hidden=8)))
        g = torch.Generator().manual_seed(3)
        images = torch.randint(0, 256, (30, 1, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(10)
        episode = Episode(images[:10], labels, images[10:], labels.repeat(2), labels)
        episode = episode.to(hardware.device, hardware.memory_format)
        assert episode.query_x.is_contiguous(memory_format=hardware.memory_format)
        loss, _ = algo.meta_loss(episode)
        loss.backward()
        return {name: p.grad for name, p in algo.named_parameters()}

    default, nhwc = gradients(False), gradients(True)
    # atol covers the conv biases, whose true gradient is 0 (batch norm cancels them).
    for name, grad in default.items():
        torch.testing.assert_close(nhwc[name], grad, rtol=1e-3, atol=1e-4, msg=name)
    assert min(default[f"backbone.features.{i}.weight"].abs().max() for i in (0, 4, 8, 12)) > 1e-2
