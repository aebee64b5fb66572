"""Shared fixtures: the real Omniglot from ../shared/data (or METARUN_DATA), one cache per
test session, and the real config composed with shrinking overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from metarun.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "metarun" / "configs"


def _data_dir() -> Path:
    configured = os.environ.get("METARUN_DATA")
    return Path(configured).resolve() if configured else (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "omniglot" / "images_background.zip").exists():
        pytest.fail(
            f"the real Omniglot is not at {path}/omniglot: set METARUN_DATA to the data folder "
            f"(the one with omniglot/images_background.zip inside)"
        )
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Omniglot tensor cache for the whole session (built once, ~15 s)."""
    configured = os.environ.get("METARUN_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def omniglot(data_dir: Path, cache_dir: Path):
    from metarun.data.omniglot import Omniglot

    return Omniglot(str(data_dir), str(cache_dir))


def tiny_overrides(data_dir: Path, cache_dir: Path) -> list[str]:
    """Shrinks a run to seconds: a narrow conv4, a few iterations and episodes."""
    return [
        "hardware=cpu",
        "model.hidden=8",
        "train.iterations=4",
        "train.meta_batch_size=2",
        "train.query_shots=2",
        "eval.val_every=2",
        "eval.val_episodes=4",
        "eval.test_episodes=6",
        "eval.query_shots=2",
        "log_every=2",
        "checkpoint_every=2",
        f"data_dir={data_dir}",
        f"cache_dir={cache_dir}",
    ]


@pytest.fixture
def make_cfg(data_dir: Path, cache_dir: Path):
    """``make_cfg(*overrides)`` composes configs/config.yaml with the tiny overrides first;
    Hydra's global state is cleared afterwards."""

    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        register_configs()
        base = tiny_overrides(data_dir, cache_dir) if tiny else []
        if any(o.startswith("model=") and o != "model=conv4" for o in overrides):
            base.remove("model.hidden=8")
        if any(o.startswith("hardware=") for o in overrides):
            base.remove("hardware=cpu")
        if tiny and "model=resnet12" in overrides:  # 12.4M parameters is too slow for tests
            if not any(o.startswith("model.channels=") for o in overrides):
                base.append("model.channels=[8,8,16,16]")
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name="config", overrides=[*base, *overrides])

    return make


@pytest.fixture
def one_thread():
    """The override ``hardware.num_threads=1`` (tiny models only lose from threading on a
    busy CPU); torch's thread count is restored after the test."""
    import torch

    threads = torch.get_num_threads()
    yield "hardware.num_threads=1"
    torch.set_num_threads(threads)


def diverge_after(monkeypatch: pytest.MonkeyPatch, algo_class: type, calls: int) -> None:
    """Makes ``algo_class.meta_loss`` return a NaN loss from its ``calls + 1``-th call on
    (each call is one task of a meta-batch)."""
    original = algo_class.meta_loss
    count = {"n": 0}

    def diverging(self, episode):
        loss, acc = original(self, episode)
        count["n"] += 1
        return (loss * float("nan"), acc) if count["n"] > calls else (loss, acc)

    monkeypatch.setattr(algo_class, "meta_loss", diverging)
