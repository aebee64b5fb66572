"""Episode sampler invariants, on small hand-made pools and on the real Omniglot splits."""

from __future__ import annotations

import pytest
import torch

from metarun.data.episodes import ClassPool, EpisodeError, EpisodeSampler


def numbered_pool(n_classes: int, per_class: list[int] | int) -> ClassPool:
    """A pool whose image ``i`` is filled with the value ``i`` (so images identify themselves)."""
    counts = per_class if isinstance(per_class, list) else [per_class] * n_classes
    width = max(counts)
    items = torch.full((n_classes, width), -1, dtype=torch.long)
    start = 0
    for c, n in enumerate(counts):
        items[c, :n] = torch.arange(start, start + n)
        start += n
    images = torch.arange(start).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).to(torch.int64)
    return ClassPool(images.contiguous(), items, [f"c{c}" for c in range(n_classes)])


def image_ids(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].tolist()


def owner(pool: ClassPool) -> dict[int, int]:
    return {int(i): c for c in range(pool.n_classes) for i in pool.class_items[c] if i >= 0}


@pytest.mark.parametrize("ways,shots,query", [(5, 1, 15), (3, 2, 3), (20, 5, 1)])
def test_support_query_disjoint_and_labelled_by_class(ways, shots, query):
    pool = numbered_pool(30, 20)
    who = owner(pool)
    sampler = EpisodeSampler(pool, ways, shots, query, seed=0)
    for _ in range(50):
        ep = sampler.sample()
        s_ids, q_ids = image_ids(ep.support_x), image_ids(ep.query_x)
        assert len(set(s_ids) | set(q_ids)) == ways * (shots + query)  # no image twice
        assert ep.support_y.tolist() == [y for y in range(ways) for _ in range(shots)]
        assert sorted(ep.query_y.tolist()) == sorted(y for y in range(ways) for _ in range(query))
        for i, y in zip(s_ids + q_ids, ep.support_y.tolist() + ep.query_y.tolist(), strict=True):
            assert who[i] == int(ep.classes[y])  # label y is class classes[y]
        assert len(set(ep.classes.tolist())) == ways


def test_label_assignment_is_shuffled_per_episode():
    sampler = EpisodeSampler(numbered_pool(10, 5), 5, 1, 1, seed=0)
    label0_classes = {int(sampler.sample().classes[0]) for _ in range(100)}
    assert len(label0_classes) >= 8


def test_same_seed_same_episodes_other_seed_other_episodes():
    pool = numbered_pool(50, 20)
    a, b, c = (EpisodeSampler(pool, 5, 1, 5, seed=s) for s in (7, 7, 8))
    for _ in range(10):
        ea, eb, ec = a.sample(), b.sample(), c.sample()
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
    assert not torch.equal(ea.query_x, ec.query_x)


def test_state_round_trip_continues_the_same_sequence():
    pool = numbered_pool(50, 20)
    a = EpisodeSampler(pool, 5, 1, 5, seed=1)
    a.sample()
    state = a.get_state()
    expected = a.sample()
    b = EpisodeSampler(pool, 5, 1, 5, seed=99)
    b.set_state(state)
    assert torch.equal(b.sample().query_x, expected.query_x)


def test_unequal_class_sizes_never_yield_padding_and_skip_small_classes():
    pool = numbered_pool(6, [3, 10, 2, 10, 10, 4])
    sampler = EpisodeSampler(pool, 3, 2, 2, seed=0)  # needs 4 images: classes 1, 3, 4, 5
    for _ in range(100):
        ep = sampler.sample()
        assert set(ep.classes.tolist()) <= {1, 3, 4, 5}
        assert min(image_ids(ep.support_x) + image_ids(ep.query_x)) >= 0


def test_impossible_episodes_are_clear_errors():
    pool = numbered_pool(4, 20)
    with pytest.raises(EpisodeError, match="only 4 classes"):
        EpisodeSampler(pool, 5, 1, 1, seed=0)
    with pytest.raises(EpisodeError, match="21 images per class"):
        EpisodeSampler(pool, 2, 1, 20, seed=0)
    with pytest.raises(EpisodeError, match=">= 1"):
        EpisodeSampler(pool, 2, 0, 1, seed=0)


def test_real_omniglot_episodes_stay_in_their_split(omniglot):
    pools = {s: omniglot.pool(s) for s in ("train", "val", "test")}
    names = {s: set(p.class_names) for s, p in pools.items()}
    assert not names["train"] & names["test"] and not names["val"] & names["test"]
    sampler = EpisodeSampler(pools["test"], 20, 5, 15, seed=0)
    for _ in range(20):
        ep = sampler.sample()
        assert all(pools["test"].class_names[c] in names["test"] for c in ep.classes.tolist())
        assert ep.support_x.shape == (100, 1, 28, 28) and ep.query_x.shape == (300, 1, 28, 28)
    with pytest.raises(EpisodeError, match="the largest has 20"):
        EpisodeSampler(pools["test"], 5, 5, 16, seed=0)  # Omniglot has 20 drawings a class
