"""algo=ensemble: the mean class probabilities of trained runs, through the meta-learning
recipe and the loader of trained runs that metarun-lake uses (metarun.trained)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metarun import checkpoint, run, trained
from metarun.algorithms import Ensemble
from metarun.data.omniglot import Omniglot
from metarun.errors import ConfigError
from metarun.evaluation import fixed_episodes
from metarun.hardware import Hardware

MEMBER = ("algo=protonet", "dataset.split=lake_proxy")


def write_member(make_cfg, folder: Path, seed: int, *overrides: str) -> Path:
    """A run folder with checkpoints/best.pt: a ProtoNet initialised from ``seed`` whose
    batch-norm statistics are perturbed, so members differ."""
    cfg = make_cfg(*MEMBER, *overrides)
    torch.manual_seed(seed)
    size = cfg.dataset.image_size
    algo = instantiate(cfg.algo)(backbone=instantiate(cfg.model)(input_shape=(1, size, size)))
    for name, buffer in algo.named_buffers():
        if name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
    path = folder / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.save({"algo": algo.state_dict(), "config": config}, path)
    return folder


def member_model(folder: Path) -> torch.nn.Module:
    ckpt = checkpoint.load(folder / "checkpoints" / "best.pt")
    cfg = OmegaConf.create(ckpt["config"])
    algo = instantiate(cfg.algo)(backbone=instantiate(cfg.model)(input_shape=(1, 28, 28)))
    algo.load_state_dict(ckpt["algo"])
    return algo.eval()


@pytest.fixture
def members(make_cfg, tmp_path) -> list[Path]:
    return [write_member(make_cfg, tmp_path / f"m{k}", seed=k) for k in range(3)]


@pytest.fixture(scope="module")
def episode(data_dir, cache_dir):
    pool = Omniglot(str(data_dir), str(cache_dir), split="lake_proxy").pool("val")
    return fixed_episodes(pool, 20, 1, 1, 0, "within_alphabet").sample().to("cpu")


def test_logits_are_the_log_of_the_members_mean_probabilities(members, episode):
    ensemble = Ensemble([str(m) for m in members], "lake_proxy", 28).eval()
    logits = ensemble.adapt(episode.support_x, episode.support_y)(episode.query_x)
    probs = [
        member_model(m).adapt(episode.support_x, episode.support_y)(episode.query_x).softmax(dim=-1)
        for m in members
    ]
    expected = torch.stack(probs).mean(dim=0)
    torch.testing.assert_close(logits.exp(), expected)
    assert not all(torch.equal(probs[0], p) for p in probs[1:])  # the members differ


def test_runs_through_the_recipe_and_loads_like_metarun_lake(make_cfg, members, episode, tmp_path):
    cfg = make_cfg(
        "algo=ensemble",
        f"algo.members=[{','.join(str(m) for m in members)}]",
        "dataset.split=lake_proxy",
        "train.iterations=0",
        "eval.episodes=within_alphabet",
        "eval.ways=20",
        "eval.query_shots=1",
    )
    run(cfg, tmp_path / "ensemble")
    results = json.loads((tmp_path / "ensemble" / "results.json").read_text())
    assert results["training"]["iterations"] == 0 and results["test"]["episodes"] == 6
    assert results["val"]["best_iteration"] == 0 and 0 <= results["val"]["best_acc"] <= 1
    assert results["protocol"]["eval_episode"]["episodes"] == "within_alphabet"
    assert (tmp_path / "ensemble" / "checkpoints" / "last.pt").is_file()
    saved = trained.read(tmp_path / "ensemble")  # as metarun-lake reads a run
    loaded, size = trained.restore(saved, Hardware("cpu")), saved.input_shape()[-1]
    assert size == 28 and isinstance(loaded, Ensemble) and len(loaded.members) == 3
    direct = Ensemble([str(m) for m in members], "lake_proxy", 28).eval()
    x, y, q = episode.support_x, episode.support_y, episode.query_x
    torch.testing.assert_close(loaded.eval().adapt(x, y)(q), direct.adapt(x, y)(q))


def test_members_of_another_split_or_too_few_are_refused(make_cfg, members, tmp_path):
    other = write_member(make_cfg, tmp_path / "vinyals", 5, "dataset.split=vinyals")
    with pytest.raises(ValueError, match="trained with dataset.split=vinyals"):
        Ensemble([str(members[0]), str(other)], "lake_proxy", 28)
    with pytest.raises(ValueError, match="at least two"):
        Ensemble([str(members[0])], "lake_proxy", 28)
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        Ensemble([str(members[0]), str(tmp_path / "missing")], "lake_proxy", 28)
    with pytest.raises(RuntimeError, match="train.iterations=0"):
        Ensemble([str(m) for m in members], "lake_proxy", 28).meta_loss(None)


def test_members_and_iterations_are_checked_before_any_data_is_loaded(make_cfg, members, tmp_path):
    empty = tmp_path / "empty"  # no data at all: a DataError would mean it got that far
    empty.mkdir()
    listed = f"algo.members=[{','.join(str(m) for m in members)}]"
    base = ("algo=ensemble", "dataset.split=lake_proxy", f"data_dir={empty}")
    refusals = [
        (("train.iterations=0",), "algo.members is not set"),
        ((listed, "train.iterations=5"), "Ensemble has nothing to train"),
        (("algo.members=[" + str(members[0]) + "]", "train.iterations=0"), "at least two"),
        ((f"algo.members=[{members[0]},{tmp_path / 'gone'}]", "train.iterations=0"),
         "gone does not exist"),
        ((listed, "train.iterations=0", "dataset.split=vinyals"),
         "trained with dataset.split=lake_proxy"),
    ]  # fmt: skip
    for overrides, message in refusals:
        with pytest.raises(ConfigError, match=message):
            run(make_cfg(*base, *overrides), tmp_path / "run")
        assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="train.iterations=0 is out of range for ProtoNet"):
        run(make_cfg("algo=protonet", "train.iterations=0", f"data_dir={empty}"), tmp_path / "p")
