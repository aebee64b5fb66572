"""Within-alphabet episodes (eval.episodes / train.episodes = within_alphabet), the
lake_proxy split, Omniglot's drawers and the affine distortions, on the real Omniglot."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from metarun.data.augment import AffineAugmented, distort
from metarun.data.episodes import ClassPool, EpisodeError, EpisodeSampler
from metarun.data.omniglot import PROXY_DRAWERS, VINYALS_VAL_ALPHABETS, Omniglot
from metarun.data.within_alphabet import WithinAlphabetSampler
from metarun.evaluation import fixed_episodes

HELD_OUT = set(VINYALS_VAL_ALPHABETS)


@pytest.fixture(scope="module")
def proxy(data_dir, cache_dir) -> Omniglot:
    return Omniglot(str(data_dir), str(cache_dir), split="lake_proxy")


def indexed(pool: ClassPool) -> ClassPool:
    """The pool with each image replaced by its own index, so a sampled episode tells
    exactly which items (and so which drawers) it was made of."""
    index = torch.arange(pool.images.shape[0]).view(-1, 1, 1, 1)
    return ClassPool(
        index, pool.class_items, pool.class_names, groups=pool.groups, drawers=pool.drawers
    )


def drawers_of(pool: ClassPool, items: torch.Tensor) -> torch.Tensor:
    """The drawer of each item index in ``items``."""
    flat = torch.full((pool.images.shape[0],), -1, dtype=torch.long)
    valid = pool.class_items >= 0
    flat[pool.class_items[valid]] = pool.drawers[valid].long()
    return flat[items.flatten()].view(items.shape)


def test_every_episode_is_one_alphabet_and_distinct_characters(proxy):
    pool = proxy.pool("val")
    sampler = WithinAlphabetSampler(pool, ways=20, shots=1, query_shots=1, seed=3)
    seen = set()
    for _ in range(60):
        ep = sampler.sample()
        alphabets = {pool.groups[c] for c in ep.classes.tolist()}
        assert len(alphabets) == 1
        seen |= alphabets
        assert len(set(ep.classes.tolist())) == 20
        assert ep.support_x.shape == (20, 1, 28, 28) and ep.query_x.shape == (20, 1, 28, 28)
        assert ep.support_y.tolist() == list(range(20)) == ep.query_y.tolist()
    assert seen == HELD_OUT  # every held-out alphabet is drawn from, and nothing else


@pytest.mark.parametrize("shots,query_shots", [(1, 1), (2, 3)])
def test_support_and_query_come_from_different_drawers(proxy, shots, query_shots):
    pool = indexed(proxy.pool("test"))
    sampler = WithinAlphabetSampler(pool, 20, shots, query_shots, seed=0)
    for _ in range(40):
        ep = sampler.sample()
        support = drawers_of(pool, ep.support_x.flatten()).view(20, shots)
        query = drawers_of(pool, ep.query_x.flatten()).view(20, query_shots)
        # Each image is of its label's class.
        for images, labels in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
            rows = pool.class_items[ep.classes[labels]]
            assert (rows == images.flatten()[:, None]).any(dim=1).all()
        # The same drawers for every character of the episode, and none on both sides.
        assert (support == support[0]).all() and (query == query[0]).all()
        assert len(set(support[0].tolist())) == shots
        assert len(set(query[0].tolist())) == query_shots
        assert not set(support[0].tolist()) & set(query[0].tolist())
        assert set(support[0].tolist()) | set(query[0].tolist()) <= set(PROXY_DRAWERS["test"])


def test_held_out_alphabets_are_never_in_training(proxy, data_dir, cache_dir):
    lake = Omniglot(str(data_dir), str(cache_dir), split="lake")
    for omniglot in (proxy, lake):
        train = omniglot.pool("train")
        assert not set(train.groups) & HELD_OUT
        assert set(omniglot.pool("val").groups) == HELD_OUT
        # ... and a 20-way within-alphabet training sampler never draws them either.
        sampler = fixed_episodes(train, 20, 1, 5, 0, "within_alphabet")
        assert not set(sampler.alphabets) & HELD_OUT
    val, test = proxy.pool("val"), proxy.pool("test")
    assert val.class_names == test.class_names
    assert all(n.startswith("images_background/") for n in test.class_names)  # no eval set
    assert set(val.drawers.flatten().tolist()) == set(PROXY_DRAWERS["val"])
    assert set(test.drawers.flatten().tolist()) == set(PROXY_DRAWERS["test"])
    # Validation and test share no drawing.
    full = lake.pool("val")
    assert torch.equal(val.images, full.images.view(172, 20, 1, 28, 28)[:, :10].flatten(0, 1))
    assert torch.equal(test.images, full.images.view(172, 20, 1, 28, 28)[:, 10:].flatten(0, 1))


def test_drawers_are_the_file_names_mm(proxy, data_dir):
    """The cached drawer of each image is the MM of its file NNNN_MM.png, read here from the
    zip independently of the loader, and images are stored in drawer order."""
    with zipfile.ZipFile(data_dir / "omniglot" / "images_background.zip") as archive:
        names = [n for n in archive.namelist() if n.endswith(".png")]
        by_char: dict[str, list[int]] = {}
        for n in names:
            by_char.setdefault(n.rsplit("/", 1)[0], []).append(int(n[-6:-4]))
        some = sorted(by_char)[::97]
        for char in some:
            i = proxy.characters.index(char)
            assert proxy.drawers[i].tolist() == sorted(by_char[char]) == list(range(1, 21))
        from metarun.data.omniglot import decode_image

        char = some[1]
        i = proxy.characters.index(char)
        member = next(n for n in names if n.startswith(char + "/") and n.endswith("_07.png"))
        assert torch.equal(proxy.images[i, 6], decode_image(archive.read(member), 28))


def test_mm_identifies_a_drawer_within_an_alphabet(proxy):
    """The claim behind support and query "by different drawers": within an alphabet,
    drawings that share MM share a style (size and ink of the drawing), far more than
    chance. Per alphabet, the share of per-character variance explained by MM against the
    same share with MM shuffled within each character."""
    pool = proxy.pool("train")
    images = pool.images.view(pool.n_classes, 20, 28, 28).float()
    ink = images.sum(dim=(2, 3))
    rows = (images.amax(dim=3) > 64).float()
    height = rows.shape[-1] - rows.argmax(-1) - rows.flip(-1).argmax(-1)
    gen = torch.Generator().manual_seed(0)

    def share(x: torch.Tensor) -> float:
        r = x - x.mean(dim=1, keepdim=True)
        return float((r.mean(0) ** 2).sum() * r.shape[0] / (r**2).sum())

    groups = np.array(pool.groups)
    for alphabet in sorted(set(pool.groups))[:8]:
        members = torch.from_numpy(np.nonzero(groups == alphabet)[0])
        for feature in (ink, height.float()):
            x = feature[members]
            shuffled = [
                share(torch.stack([row[torch.randperm(20, generator=gen)] for row in x]))
                for _ in range(20)
            ]
            assert share(x) > 3 * max(shuffled), alphabet


def test_fixed_episodes_are_the_same_in_another_process(proxy, data_dir, cache_dir):
    def digest(sampler) -> str:
        h = hashlib.sha256()
        for _ in range(25):
            ep = sampler.sample()
            for t in (ep.support_x, ep.query_x, ep.classes, ep.query_y):
                h.update(t.numpy().tobytes())
        return h.hexdigest()

    here = digest(fixed_episodes(proxy.pool("val"), 20, 1, 1, 7, "within_alphabet"))
    torch.manual_seed(123)  # the global RNG plays no part
    assert digest(fixed_episodes(proxy.pool("val"), 20, 1, 1, 7, "within_alphabet")) == here
    assert digest(fixed_episodes(proxy.pool("val"), 20, 1, 1, 8, "within_alphabet")) != here
    code = (
        "import hashlib, sys\n"
        "from metarun.data.omniglot import Omniglot\n"
        "from metarun.evaluation import fixed_episodes\n"
        "o = Omniglot(sys.argv[1], sys.argv[2], split='lake_proxy')\n"
        "s = fixed_episodes(o.pool('val'), 20, 1, 1, 7, 'within_alphabet')\n"
        "h = hashlib.sha256()\n"
        "for _ in range(25):\n"
        "    ep = s.sample()\n"
        "    for t in (ep.support_x, ep.query_x, ep.classes, ep.query_y):\n"
        "        h.update(t.numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(data_dir), str(cache_dir)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.stdout.strip() == here


def test_small_alphabets_are_skipped_and_impossible_requests_refused(proxy):
    train = proxy.pool("train")
    sampler = WithinAlphabetSampler(train, 20, 1, 5, seed=0)
    small = {g for g in set(train.groups) if train.groups.count(g) < 20}
    assert set(sampler.skipped) == small and len(small) == 4  # 14, 14, 16, 17 characters
    drawn = {train.groups[int(sampler.sample().classes[0])] for _ in range(200)}
    assert not drawn & small
    val = proxy.pool("val")  # the largest held-out alphabet, Bengali, has 46 characters
    with pytest.raises(EpisodeError, match=r"Bengali, has 46 characters"):
        WithinAlphabetSampler(val, 47, 1, 1, seed=0)
    with pytest.raises(EpisodeError, match=r"10 drawers drew all its characters < .* = 11"):
        WithinAlphabetSampler(val, 20, 1, 10, seed=0)
    plain = ClassPool(val.images, val.class_items, val.class_names)
    with pytest.raises(EpisodeError, match="know their alphabet"):
        fixed_episodes(plain, 20, 1, 1, 0, "within_alphabet")
    with pytest.raises(ValueError, match="unknown episodes"):
        fixed_episodes(val, 20, 1, 1, 0, "within")


def test_vinyals_rotations_are_alphabets_of_their_own(omniglot):
    pool = omniglot.pool("val")
    ep = WithinAlphabetSampler(pool, 20, 1, 1, seed=0).sample()
    groups = {pool.groups[c] for c in ep.classes.tolist()}
    assert len(groups) == 1 and groups.pop().rsplit("/", 1)[1] in {
        "rot000",
        "rot090",
        "rot180",
        "rot270",
    }


def test_affine_distortions_keep_the_strokes_and_resume_exactly(proxy):
    images = proxy.pool("train").images[:200]
    gen = torch.Generator().manual_seed(0)
    out = distort(images, gen)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    before, after = images.float().sum(dim=(1, 2, 3)) / 255, out.sum(dim=(1, 2, 3))
    ratio = after / before
    assert 0.5 < ratio.min() and ratio.max() < 1.8  # scales in [0.8, 1.2] per axis
    assert (out - images.float() / 255).abs().amax(dim=(1, 2, 3)).gt(0.1).float().mean() > 0.6
    base = EpisodeSampler(proxy.pool("train"), 5, 1, 2, seed=0)
    sampler = AffineAugmented(base, seed=1)
    sampler.sample()
    state = sampler.get_state()
    expected = sampler.sample()
    sampler.set_state(state)
    again = sampler.sample()
    torch.testing.assert_close(again.support_x, expected.support_x)
    torch.testing.assert_close(again.query_x, expected.query_x)


def test_runs_end_to_end_with_within_alphabet_episodes(data_dir, cache_dir, tmp_path):
    """The real entry point: a lake_protonet run trained on within-alphabet episodes with
    affine distortions, validated and tested 20-way within the held-out alphabets."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "metarun.cli",
        "experiment=lake_protonet",
        "hardware=cpu",
        "hardware.amp=off",
        "hardware.num_threads=1",
        "model.hidden=8",
        "train.episodes=within_alphabet",
        "train.augment=affine",
        "train.ways=20",
        "train.meta_batch_size=2",
        "train.query_shots=2",
        "train.iterations=4",
        "eval.val_every=2",
        "eval.val_episodes=5",
        "eval.test_episodes=7",
        f"data_dir={data_dir}",
        f"cache_dir={cache_dir}",
        f"hydra.run.dir={run}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path)
    results = json.loads((run / "results.json").read_text())
    protocol = results["protocol"]
    assert protocol["split"] == "lake_proxy"
    assert protocol["train_episode"]["episodes"] == "within_alphabet"
    assert protocol["train_episode"]["augment"] == "affine"
    assert protocol["eval_episode"] == {
        "ways": 20,
        "shots": 1,
        "query_shots": 1,
        "episodes": "within_alphabet",
    }
    assert results["test"]["episodes"] == 7
    scores = json.loads((run / "test_scores.json").read_text())["episodes"]
    assert all(abs(s * 20 - round(s * 20)) < 1e-6 for s in scores)  # 20 queries each
    bad = subprocess.run(cmd[:-1] + ["eval.episodes=within"], capture_output=True, text=True)
    assert bad.returncode != 0 and "within_alphabet" in bad.stderr
    # test= tests the run again on the same kind of episodes (its saved eval.episodes).
    retest = [*cmd[:3], f"test={run}", "eval.test_episodes=3", f"hydra.run.dir={run}-again"]
    subprocess.run(retest, check=True, capture_output=True, text=True, cwd=tmp_path)
    again = json.loads((tmp_path / "run-again" / "results.json").read_text())
    assert again["protocol"]["eval_episode"]["episodes"] == "within_alphabet"
    assert again["test"]["episodes"] == 3
    assert again["test"]["acc"] == pytest.approx(sum(scores[:3]) / 3)  # the same 3 episodes


def test_train_rotations_add_rotated_alphabets_to_training_only(data_dir, cache_dir, proxy):
    rotated = Omniglot(str(data_dir), str(cache_dir), split="lake_proxy", train_rotations=True)
    train, plain = rotated.pool("train"), proxy.pool("train")
    assert train.n_classes == 4 * plain.n_classes
    assert rotated.pool("test").class_names == proxy.pool("test").class_names
    assert len(set(train.groups)) == 4 * len(set(plain.groups))
    first = train.images[train.class_items[0]]
    torch.testing.assert_close(train.images[train.class_items[1]], torch.rot90(first, 1, (-2, -1)))
    sampler = WithinAlphabetSampler(train, 20, 1, 1, seed=0)
    for _ in range(20):
        ep = sampler.sample()
        assert len({train.groups[c] for c in ep.classes.tolist()}) == 1
    with pytest.raises(ValueError, match="vinyals split has them already"):
        Omniglot(str(data_dir), str(cache_dir), split="vinyals", train_rotations=True)


def test_test_time_views_average_the_logits_of_distorted_copies(proxy):
    """``eval.test_views``: each episode is predicted on itself and on ``views`` copies with
    every image distorted (one seeded generator, support then query), and the logits are
    averaged; by hand with a ProtoNet on a flattening backbone."""
    from torch import nn

    from metarun.algorithms import ProtoNet
    from metarun.data.augment import warp
    from metarun.evaluation import evaluate
    from metarun.hardware import Hardware

    class Flatten(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    pool = proxy.pool("test")
    algo, hardware = ProtoNet(Flatten()), Hardware("cpu")
    sampler = lambda: fixed_episodes(pool, 20, 1, 1, 0, "within_alphabet")  # noqa: E731
    plain = evaluate(algo, sampler(), 30, hardware)
    seen = evaluate(algo, sampler(), 30, hardware, views=3)
    g, accs, episodes = torch.Generator().manual_seed(0), [], sampler()
    for _ in range(30):
        ep = episodes.sample().to("cpu")
        logits = 0
        for view in range(4):
            s, q = ep.support_x, ep.query_x
            if view:
                s, q = warp(s, g), warp(q, g)
            protos = s.flatten(1)[ep.support_y.argsort()]
            logits = logits - torch.cdist(q.flatten(1), protos).pow(2) / 4
        accs.append((logits.argmax(1) == ep.query_y).float().mean().item())
    assert seen.scores == pytest.approx(accs, abs=1e-6)
    assert seen.scores != plain.scores  # the views change some predictions
