"""Within-alphabet episodes with support and query by different drawers (Lake et al. 2015).

Lake, Salakhutdinov & Tenenbaum's one-shot runs (Science 2015) are 20-way within one
alphabet: the distractors of a query are the other characters of its own alphabet, the
hardest there are, and the training image and the query of a character come from
different people. :class:`WithinAlphabetSampler` draws such episodes from any
:class:`~metarun.data.episodes.ClassPool` that records the group (alphabet) of each class
and the drawer of each image (Omniglot's pools do):

1. an alphabet, uniformly among those that can provide the episode;
2. ``ways`` of its characters, without replacement, in random label order;
3. ``shots + query_shots`` distinct drawers among those who drew every character of the
   alphabet: the first ``shots`` drawers give the support images of every character and
   the other ``query_shots`` drawers give its queries. So each support drawer and each
   query drawer drew one image of every class of the episode, and a query is never by a
   support drawer (with ``shots = query_shots = 1``: one person's drawings are the 20
   training images and another person's are the 20 queries).

An alphabet with fewer than ``ways`` characters, or with fewer than ``shots +
query_shots`` drawers who drew all its characters, cannot give an episode and is skipped
(the sampler's ``skipped`` says which and why; it is logged once per process); a pool in
which no alphabet can give one is refused with an :class:`EpisodeError` that names the
largest alphabet. Episodes are drawn with the sampler's own seeded ``torch.Generator``:
the same pool, shape and seed give the same episodes in every run and process.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from metarun.data.episodes import ClassPool, Episode, EpisodeError

log = logging.getLogger(__name__)
_reported: set[tuple] = set()  # skipped-alphabet messages already logged in this process


class WithinAlphabetSampler:
    """Samples within-alphabet episodes (see the module docstring) from ``pool``.

    Args:
        pool: a class pool with ``groups`` (the alphabet of each class) and ``drawers``
            (the drawer of each image).
        ways: characters per episode, all from one alphabet.
        shots: support drawers, hence support images per character.
        query_shots: query drawers (none of them a support drawer), hence queries per
            character.
        seed: seed of the sampler's ``torch.Generator``.

    Raises:
        EpisodeError: the pool lacks alphabets or drawers, or no alphabet can provide an
            episode of this shape.
    """

    def __init__(self, pool: ClassPool, ways: int, shots: int, query_shots: int, seed: int):
        if ways < 1 or shots < 1 or query_shots < 1:
            raise EpisodeError(
                f"an episode needs ways, shots and query_shots >= 1, got ways={ways}, "
                f"shots={shots}, query_shots={query_shots}"
            )
        if pool.groups is None or pool.drawers is None:
            raise EpisodeError(
                "within-alphabet episodes need a dataset whose classes know their alphabet "
                "and whose images know their drawer (Omniglot's do); this dataset's do not. "
                "Use episodes: standard for it."
            )
        self.pool = pool
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        drawers_needed = shots + query_shots
        by_group = pool.group_classes
        # Per usable alphabet: (its classes, items (n_classes, n_common_drawers)), the
        # columns being the drawers who drew every one of its classes.
        self._alphabets: list[tuple[np.ndarray, np.ndarray]] = []
        self.alphabets: list[str] = []
        self.skipped: dict[str, str] = {}
        items, drawers = pool.class_items.numpy(), pool.drawers.numpy()
        for group, classes in sorted(by_group.items()):
            if len(classes) < ways:
                self.skipped[group] = f"{len(classes)} characters < {ways} ways"
                continue
            common = set.intersection(
                *(
                    {int(d) for d, i in zip(drawers[c], items[c], strict=True) if i >= 0}
                    for c in classes
                )
            )
            if len(common) < drawers_needed:
                self.skipped[group] = (
                    f"{len(common)} drawers drew all its characters < shots + query_shots "
                    f"= {drawers_needed}"
                )
                continue
            columns = sorted(common)
            table = np.empty((len(classes), len(columns)), dtype=np.int64)
            for row, c in enumerate(classes):
                by_drawer = {int(d): int(i) for d, i in zip(drawers[c], items[c], strict=True)}
                table[row] = [by_drawer[d] for d in columns]
            self._alphabets.append((np.asarray(classes), table))
            self.alphabets.append(group)
        if not self._alphabets:
            largest = max(by_group.items(), key=lambda kv: len(kv[1]))
            raise EpisodeError(
                f"cannot sample {ways}-way within-alphabet episodes with {shots} support and "
                f"{query_shots} query drawers: no alphabet of this split can provide one (the "
                f"largest, {largest[0]}, has {len(largest[1])} characters; "
                f"{self._describe_skipped()}). Lower `ways` (or shots/query_shots), or use "
                f"episodes: standard."
            )
        key = (tuple(self.skipped.items()), ways, drawers_needed)
        if self.skipped and key not in _reported:
            _reported.add(key)
            log.info(
                "%d-way within-alphabet episodes: %d alphabets used, %d skipped (%s)",
                ways,
                len(self.alphabets),
                len(self.skipped),
                self._describe_skipped(),
            )
        self.generator = torch.Generator().manual_seed(seed)
        self._images = pool.images.numpy() if pool.images.device.type == "cpu" else None
        labels = torch.arange(ways)
        self._support_y = labels.repeat_interleave(shots)
        self._query_y = labels.repeat_interleave(query_shots)

    def _describe_skipped(self) -> str:
        return "; ".join(f"{g}: {why}" for g, why in self.skipped.items()) or "none skipped"

    def _gather(self, idx: np.ndarray) -> torch.Tensor:
        if self._images is None:
            return self.pool.images.index_select(
                0, torch.from_numpy(idx).to(self.pool.images.device)
            )
        return torch.from_numpy(self._images[idx])

    def sample(self) -> Episode:
        """Draws one episode; see :class:`~metarun.data.episodes.Episode` for the shapes
        (support and query are class-major: ``shots`` images of label 0, then label 1...)."""
        g = self.generator
        which = int(torch.randint(len(self._alphabets), (1,), generator=g))
        classes, table = self._alphabets[which]
        rows = torch.randperm(len(classes), generator=g)[: self.ways].numpy()
        cols = torch.randperm(table.shape[1], generator=g)[: self.shots + self.query_shots]
        picked = table[rows][:, cols.numpy()]  # (ways, shots + query_shots)
        return Episode(
            support_x=self._gather(picked[:, : self.shots].ravel()),
            support_y=self._support_y.clone(),
            query_x=self._gather(picked[:, self.shots :].ravel()),
            query_y=self._query_y.clone(),
            classes=torch.from_numpy(classes[rows]),
        )

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
