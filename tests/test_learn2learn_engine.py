"""``algo.engine=l2l`` (learn2learn's own MAML and Meta-SGD) gives the native engines'
meta-gradient from the same initial weights and episodes.

learn2learn is an optional extra; ``scripts/test.sh`` installs it (through
``scripts/install_learn2learn.sh``), so in CI these tests run rather than skip.
"""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms import MAML, MetaSGD
from metarun.data.episodes import Episode
from metarun.models import Conv4

pytest.importorskip("learn2learn")


def _episodes(tasks: int = 3, ways: int = 3) -> list[Episode]:
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64)  # noqa: E731
    return [
        Episode(
            rand(ways),
            torch.randperm(ways, generator=g),
            rand(2 * ways),
            torch.arange(ways).repeat(2),
            torch.arange(ways),
        )
        for _ in range(tasks)
    ]


def _meta_gradient(algo: torch.nn.Module, episodes: list[Episode]) -> dict[str, torch.Tensor]:
    algo.zero_grad()
    for episode in episodes:
        loss, _ = algo.meta_loss(episode)
        (loss / len(episodes)).backward()
    return {name: p.grad.clone() for name, p in algo.named_parameters()}


@pytest.mark.parametrize("cls", [MAML, MetaSGD])
@pytest.mark.parametrize("first_order", [False, True])
def test_l2l_engine_gives_the_native_meta_gradient(cls, first_order):
    def make(engine: str) -> torch.nn.Module:
        torch.manual_seed(0)
        backbone = Conv4(input_shape=(1, 16, 16), hidden=4)
        return cls(backbone, 3, 0.4, 2, 3, first_order=first_order, engine=engine).double()

    episodes = _episodes()
    native, l2l = _meta_gradient(make("loop"), episodes), _meta_gradient(make("l2l"), episodes)
    assert native.keys() == l2l.keys()
    for name, grad in native.items():
        torch.testing.assert_close(l2l[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    assert any(g.abs().max() > 1e-3 for g in native.values())


def test_l2l_engine_runs_in_the_runner(make_cfg, tmp_path):
    from metarun import run

    summary = run(make_cfg("algo.engine=l2l"), tmp_path)
    assert 0.0 <= summary["test/acc"] <= 1.0
